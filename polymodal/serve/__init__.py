"""Serving: an OpenAI-compatible HTTP API (FastAPI + uvicorn) and a web chat page, in
front of `engine.batching.BatchingEngine`. No model code here; no HTTP code there."""
