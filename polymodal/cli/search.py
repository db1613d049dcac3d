"""`polymodal search INDEX (--text "a red circle" | --image PATH) -k 5 [--sheet OUT.png]`."""

from __future__ import annotations

import argparse


def add_parser(commands) -> None:
    parser = commands.add_parser("search", help="search an image index by text or by image",
                                 description="Print the k nearest images, best first: rank, score, path.")
    parser.add_argument("index", help="an index folder (polymodal index build)")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a text query")
    query.add_argument("--image", metavar="PATH", help="an image query")
    parser.add_argument("-k", type=int, default=5, help="how many hits (default 5)")
    parser.add_argument("--sheet", metavar="OUT.png", help="also write a contact sheet of the hits")
    parser.add_argument("--model", help="the model to embed the query (default: the index's own)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from polymodal.build import load_any
    from polymodal.search import ImageIndex
    from polymodal.search.sheet import contact_sheet

    index = ImageIndex.load(args.index)
    model_path = args.model or index.model_path
    index.check_model(model_path)
    hits = index.search(load_any(model_path), text=args.text, image=args.image, k=args.k)
    for hit in hits:
        print(f"{hit.rank}\t{hit.score:.4f}\t{hit.path}")
    if args.sheet:
        query = f"text: {args.text}" if args.text is not None else f"image: {args.image}"
        contact_sheet(hits, args.sheet, query)
    return 0
