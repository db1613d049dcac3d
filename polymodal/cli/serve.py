"""`polymodal serve MODEL`: the OpenAI-compatible API and the chat page on one port."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from polymodal.cli.loading import add_quantize_option
from polymodal.errors import UserError
from polymodal.serve.connections import ConnectionLimits


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
    parser.add_argument("--allow-remote-host", action="append", default=[], metavar="HOST[:PORT]",
                        help="fetch image URLs from HOST on ports 80/443, or on PORT only "
                             "(repeatable; off by default)")
    limits = ConnectionLimits()
    parser.add_argument("--header-timeout", type=float, default=limits.header_timeout, metavar="S",
                        help="seconds a connection may take to send a request's headers")
    parser.add_argument("--body-timeout", type=float, default=limits.body_timeout, metavar="S",
                        help="seconds a request may take to send its body (408 after)")
    parser.add_argument("--keep-alive", type=float, default=limits.keep_alive, metavar="S",
                        help="seconds an idle keep-alive connection stays open")
    parser.add_argument("--max-connections", type=int, default=limits.max_connections,
                        help="open connections before new requests get 503")
    parser.add_argument("--shutdown-timeout", type=float, default=limits.shutdown_timeout, metavar="S",
                        help="seconds a shutdown waits for requests in flight")
    parser.add_argument("--name", help="the model name the API reports (default: the folder name)")
    add_quantize_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from polymodal.cli.loading import load_for_command
    from polymodal.engine.batching import BatchingEngine
    from polymodal.serve.app import create_app, server_config
    from polymodal.serve.media import MediaLimits

    if args.max_batch < 1 or args.max_queue < 1:
        raise UserError("--max-batch and --max-queue must be at least 1")
    connections = ConnectionLimits(args.header_timeout, args.body_timeout, args.keep_alive,
                                   args.max_connections, shutdown_timeout=args.shutdown_timeout)
    if min(args.header_timeout, args.body_timeout, args.keep_alive, args.shutdown_timeout) <= 0 \
            or args.max_connections < 1:
        raise UserError("--header-timeout, --body-timeout, --keep-alive, --shutdown-timeout and "
                        "--max-connections must be positive")
    model = load_for_command(args.model, quantize=args.quantize)
    generative = not hasattr(model, "encode_texts")
    engine = BatchingEngine(model, args.max_batch, args.max_queue).start() if generative else None
    limits = MediaLimits(max_image_pixels=args.max_image_pixels, max_images=args.max_images,
                         allowed_hosts={h.lower() for h in args.allow_remote_host})
    name = args.name or Path(args.model.rstrip("/")).name
    app = create_app(model, name, engine, limits, int(args.max_body_mb * 1024 * 1024), args.body_timeout)
    print(f"serving {name} on http://{args.host}:{args.port}/  (OpenAI API at /v1)", file=sys.stderr)
    try:
        uvicorn.Server(server_config(app, args.host, args.port, connections)).run()
    finally:
        if engine is not None:
            engine.stop()
    return 0
