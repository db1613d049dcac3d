"""`polymodal analyze MODEL --task NAME`: how much the model uses each modality."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from polymodal.cli.eval import add_task_options, task_options
from polymodal.errors import UserError


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "analyze", help="measure how much a model relies on the image and the question",
        description="Ablations (blank image, shuffled images, no question) and EMAP; "
                    "prints one JSON object.")
    add_task_options(parser)
    parser.add_argument("--emap-size", type=int, default=50, metavar="N",
                        help="EMAP on N questions x N images (0: skip)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from polymodal.cli.loading import load_for_command
    from polymodal.eval.analyze import analyze

    task, options = task_options(args)
    if args.emap_size < 0 or args.emap_size == 1:
        raise UserError("--emap-size must be 0 (skip) or at least 2")
    if not task.generative:
        raise UserError(f"analyze needs a task a generative model answers, not {task.name}")
    task.items(options)  # bad data fails here, before the model loads
    model = load_for_command(args.model, args.set, args.quantize)
    command = "polymodal " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["analyze"] else ""
    results = analyze(model, task, options, args.batch_size, args.emap_size, args.out, command)
    print(json.dumps(results))
    return 0
