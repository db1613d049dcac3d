"""Evaluation tasks; each writes results.json, predictions.jsonl and pictures to an output folder."""
