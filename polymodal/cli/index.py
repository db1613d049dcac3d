"""`polymodal index build MODEL --images DIR --out INDEX` and `polymodal index add INDEX --images DIR`."""

from __future__ import annotations

import argparse
import json

from polymodal.cli.embed import report_skipped
from polymodal.errors import UserError


def add_parser(commands) -> None:
    parser = commands.add_parser("index", help="build or grow an image search index",
                                 description="build: index every image under DIR with MODEL. "
                                             "add: add the new images under DIR to INDEX.")
    parser.add_argument("action", choices=["build", "add"])
    parser.add_argument("target", help="build: a dual-encoder model directory; add: an index")
    parser.add_argument("--images", required=True, metavar="DIR")
    parser.add_argument("--out", metavar="INDEX", help="build: the index folder to write")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from polymodal.build import load_any
    from polymodal.search import ImageIndex
    from polymodal.search.index import index_lock

    if args.action == "build" and not args.out:
        raise UserError("index build needs --out INDEX")
    destination = args.out if args.action == "build" else args.target
    # One writer at a time from load to save: a second `index add` would otherwise save an
    # index without the first one's images (it loaded the index before they were added).
    with index_lock(destination, create=args.action == "build"):
        if args.action == "build":
            model = load_any(args.target)
            index, skipped = ImageIndex.build(model, args.target, args.images, args.batch_size)
        else:
            index = ImageIndex.load(args.target)
            model = load_any(index.model_path)
            index.check_model(index.model_path)  # the model at that path is still the same one
            skipped = index.add(model, args.images, args.batch_size)
        index.save(destination)
    report_skipped(skipped)
    print(json.dumps({"index": destination, "count": len(index), "skipped": len(skipped)}))
    return 0
