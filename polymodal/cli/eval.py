"""`polymodal eval MODEL --task easy-vqa`: one JSON object with the headline metrics on stdout."""

from __future__ import annotations

import argparse
import json

from polymodal.errors import UserError

TASKS = ("easy-vqa",)


def add_parser(commands) -> None:
    parser = commands.add_parser("eval", help="evaluate a model on a task",
                                 description="Evaluate a model; prints one JSON object of metrics.")
    parser.add_argument("model", help="a saved model directory (or a recipe / LLM source)")
    parser.add_argument("--task", required=True, help=f"one of: {', '.join(TASKS)}")
    parser.add_argument("--split", default="test", help="easy-vqa split from its package (train or test)")
    parser.add_argument("--data", metavar="DIR", help="a folder in the easy-VQA layout instead of --split")
    parser.add_argument("--limit", type=int, help="a fixed, seeded sample of N questions")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", metavar="DIR", help="write results.json, predictions.jsonl and pictures here")
    parser.add_argument("--show", type=int, default=0, metavar="N",
                        help="also print N example answers (to stderr, stdout keeps the JSON)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.task not in TASKS:
        raise UserError(f"unknown task {args.task!r}; tasks: {', '.join(TASKS)}")
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")
    from polymodal.eval.easy_vqa import evaluate_easy_vqa
    from polymodal.model import load_any

    model = load_any(args.model)
    rows: list[dict] = []
    results = evaluate_easy_vqa(model, args.split, args.data, args.limit, args.batch_size, args.out, rows=rows)
    show_examples(rows, args.show)
    print(json.dumps(results))
    return 0


def show_examples(rows: list[dict], count: int) -> None:
    """A seeded handful of answers, right and wrong, for a person to read."""
    import random
    import sys

    for row in random.Random(0).sample(rows, min(count, len(rows))):
        mark = "ok   " if row["correct"] else "WRONG"
        print(f"{mark} image {row['image']:>4}  {row['question']:<42} -> {row['prediction']:<10} "
              f"(reference: {row['reference']})", file=sys.stderr)
