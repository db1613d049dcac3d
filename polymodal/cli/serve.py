"""`polymodal serve MODEL`: the OpenAI-compatible API and the chat page on one port."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from polymodal.errors import UserError


def add_parser(commands) -> None:
    parser = commands.add_parser("serve", help="serve a model behind an OpenAI-compatible HTTP API",
                                 description="POST /v1/chat/completions, GET /v1/models, POST /v1/embeddings, "
                                             "GET /health, GET /metrics, and a chat page at /.")
    parser.add_argument("model", help="a saved model directory (or a recipe / LLM source)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=16, help="requests decoded together (1: no batching)")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    parser.add_argument("--max-body-mb", type=float, default=20.0)
    parser.add_argument("--max-image-pixels", type=int, default=4096 * 4096)
    parser.add_argument("--max-images", type=int, default=4, help="images per request")
    parser.add_argument("--allow-remote-host", action="append", default=[], metavar="HOST",
                        help="fetch image URLs from HOST (repeatable; off by default)")
    parser.add_argument("--name", help="the model name the API reports (default: the folder name)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from polymodal.engine.batching import BatchingEngine
    from polymodal.model import load_any
    from polymodal.serve.app import create_app
    from polymodal.serve.media import MediaLimits

    if args.max_batch < 1 or args.max_queue < 1:
        raise UserError("--max-batch and --max-queue must be at least 1")
    model = load_any(args.model)
    generative = not hasattr(model, "encode_texts")
    engine = BatchingEngine(model, args.max_batch, args.max_queue).start() if generative else None
    limits = MediaLimits(max_image_pixels=args.max_image_pixels, max_images=args.max_images,
                         allowed_hosts={h.lower() for h in args.allow_remote_host})
    name = args.name or Path(args.model.rstrip("/")).name
    app = create_app(model, name, engine, limits, int(args.max_body_mb * 1024 * 1024))
    print(f"serving {name} on http://{args.host}:{args.port}/  (OpenAI API at /v1)", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        if engine is not None:
            engine.stop()
    return 0
