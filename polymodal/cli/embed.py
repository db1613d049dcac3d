"""`polymodal embed MODEL (--images DIR | --texts FILE) --out FILE.npz`: embeddings to a file."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from polymodal.errors import UserError


def add_parser(commands) -> None:
    parser = commands.add_parser("embed", help="embed images or texts with a dual-encoder model",
                                 description="Write embeddings [N, D] and their ids (paths or texts) "
                                             "to an .npz file.")
    parser.add_argument("model", help="a saved dual-encoder model directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="DIR", help="every image file under DIR")
    source.add_argument("--texts", metavar="FILE", help="a text file, one text per line")
    parser.add_argument("--out", required=True, metavar="FILE", help="the .npz to write")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.set_defaults(run=run)


def report_skipped(skipped: list[tuple[str, str]]) -> None:
    """Files that are not images, listed and counted on stderr."""
    if skipped:
        print(f"skipped {len(skipped)} file(s) that are not readable images:", file=sys.stderr)
        for path, reason in skipped:
            print(f"  {path}: {reason}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from polymodal.build import load_any
    from polymodal.contrastive.embed import (
        embed_images,
        embed_texts,
        image_files,
        require_dual_encoder,
    )
    from polymodal.safe_files import atomic_write

    if args.texts:
        path = Path(args.texts)
        if not path.is_file():
            raise UserError(f"text file not found: {path}")
        ids = [line for line in path.read_text().splitlines() if line.strip()]
        if not ids:
            raise UserError(f"{path}: no texts")
    else:
        ids = [str(p.resolve()) for p in image_files(args.images)]
    model = load_any(args.model)
    require_dual_encoder(model, "polymodal embed")
    if args.texts:
        embeddings, skipped = embed_texts(model, ids, args.batch_size), []
    else:
        embeddings, ids, skipped = embed_images(model, ids, args.batch_size, skip_bad=True)
    buffer = io.BytesIO()
    np.savez(buffer, embeddings=embeddings.numpy().astype(np.float32), ids=np.array(ids))
    atomic_write(Path(args.out), lambda p: p.write_bytes(buffer.getvalue()))
    report_skipped(skipped)
    print(json.dumps({"out": args.out, "count": len(ids), "dim": int(embeddings.shape[1]),
                      "skipped": len(skipped)}))
    return 0
