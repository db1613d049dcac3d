"""`polymodal eval MODEL --task NAME`: one JSON object with the headline metrics on stdout."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys

from polymodal.cli.loading import add_quantize_option
from polymodal.errors import UserError


def add_task_options(parser: argparse.ArgumentParser) -> None:
    """The options every task takes (`eval` and `analyze` share them)."""
    parser.add_argument("model", help="a saved model directory (or a recipe / LLM source)")
    parser.add_argument("--task", required=True,
                        help="easy-vqa, vqa, pope, caption, multiple-choice, series-classification, text-to-image; for dual encoders "
                             "zeroshot, retrieval, audio-image (`polymodal info --list` lists them)")
    parser.add_argument("--split", default="test",
                        help="without a task file: the split of the built-in dataset (easy-VQA: train or test)")
    parser.add_argument("--data", metavar="PATH",
                        help="the task's JSONL file, or a folder in the built-in dataset's layout, or "
                             "FORMAT:NAME for a set a dataset format knows by name (aeon:BasicMotions)")
    parser.add_argument("--limit", type=int, help="a fixed, seeded sample of N questions")
    parser.add_argument("--seed", type=int, default=0, help="seed of --limit and of built probes")
    parser.add_argument("--setting", default="all", help="pope: random, popular, adversarial or all")
    parser.add_argument("--prompt", help="caption: the instruction (default: Describe the image.)")
    parser.add_argument("--templates", nargs="+", metavar="TEMPLATE",
                        help='zeroshot: prompt templates, {} for the label ("a photo of a {}.")')
    parser.add_argument("--image-model", metavar="DIR", help="audio-image: the image dual encoder")
    parser.add_argument("--system", help="a system message before every question")
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help="tokens an answer may take (default: the task's own)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field (when MODEL is a recipe)")
    parser.add_argument("--batch-size", type=int, default=64)
    add_quantize_option(parser)
    parser.add_argument("--out", metavar="DIR", help="write results.json, predictions.jsonl, report.md and pictures")


def add_parser(commands) -> None:
    parser = commands.add_parser("eval", help="evaluate a model on a task",
                                 description="Evaluate a model; prints one JSON object of metrics.")
    add_task_options(parser)
    parser.add_argument("--show", type=int, default=0, metavar="N",
                        help="also print N example answers (to stderr, stdout keeps the JSON)")
    parser.add_argument("--shots", type=int, default=0, metavar="K",
                        help="K solved examples with their images as earlier turns before each question "
                             "(few-shot prompting; drawn seeded from the task's other questions)")
    parser.add_argument("--images-per-prompt", type=int, metavar="N",
                        help="text-to-image: images drawn per prompt (default 8)")
    parser.add_argument("--cfg", type=float, metavar="SCALE",
                        help="text-to-image: classifier-free guidance scale (default 1: none)")
    parser.add_argument("--temperature", type=float,
                        help="text-to-image: sampling temperature of the image codes (default 1)")
    parser.add_argument("--top-k", type=int, metavar="K",
                        help="text-to-image: sample among the K likeliest codes (default 0: all)")
    parser.set_defaults(run=run)


def task_options(args: argparse.Namespace):
    """The task and its options from the command line; mistakes are UserErrors."""
    from polymodal.eval.tasks import TaskOptions, get_task

    task = get_task(args.task)
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if getattr(args, "show", 0) < 0:
        raise UserError("--show must be at least 0")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    shots = getattr(args, "shots", 0)  # eval's option; analyze asks the questions alone
    if shots < 0:
        raise UserError("--shots must be at least 0")
    if shots and not task.generative:
        raise UserError(f"--shots: task {task.name} embeds with a dual encoder; shots are for generative tasks")
    drawing = drawing_options(args, task)
    return task, TaskOptions(split=args.split, data=args.data, limit=args.limit, seed=args.seed,
                             setting=args.setting, prompt=args.prompt,
                             templates=args.templates, image_model=args.image_model,
                             system=args.system, max_new_tokens=args.max_new_tokens, shots=shots, **drawing)


# eval's options of task text-to-image: flag -> TaskOptions field (absent: the field's default)
DRAWING_FLAGS = {"images_per_prompt": "images_per_prompt", "cfg": "guidance_scale",
                 "temperature": "temperature", "top_k": "top_k"}


def drawing_options(args: argparse.Namespace, task) -> dict:
    """The drawing options given on the command line, as TaskOptions fields.

    Raises:
        UserError: one is given to a task that does not draw (it would be ignored silently).
    """
    given = {field: getattr(args, flag) for flag, field in DRAWING_FLAGS.items()
             if getattr(args, flag, None) is not None}  # analyze has none of these options
    if given and not task.draws:
        flag = "--" + next(flag for flag, field in DRAWING_FLAGS.items() if field in given).replace("_", "-")
        raise UserError(f"{flag}: only a task that draws (text-to-image) takes it; task {task.name} does not")
    return given


def run(args: argparse.Namespace) -> int:
    from polymodal.cli.loading import load_for_command
    from polymodal.cli.signals import stop_on
    from polymodal.eval.run import evaluate

    task, options = task_options(args)
    items = task.items(options) if task.generative else None  # bad data fails before the model loads
    make_out_folder(args.out)  # so does an --out that cannot hold the results
    model = load_for_command(args.model, args.set, args.quantize)
    command = "polymodal " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["eval"] else ""
    with stop_on(signal.SIGTERM) as stopped:
        try:
            results, rows = evaluate(model, task, options, args.batch_size, args.out, command, items)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through stop_on
            name = stopped[0] if stopped else "SIGINT"
            print(f"stopped by {name}; nothing was written (the results are written once every "
                  f"question is answered); run the same command again", file=sys.stderr)
            return 128 + int(getattr(signal, name))
    show_examples(rows, args.show)
    print(json.dumps(results))
    return 0


def make_out_folder(out: str | None) -> None:
    """Create the --out folder (and its parents) now, before a long evaluation whose results
    would otherwise be lost at the end.

    Raises:
        UserError: `out` is a file, or the folder cannot be created or written in.
    """
    from pathlib import Path

    if out is None:
        return
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out: {out} is a file; give a folder for the results")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--out: cannot create {out}: {error.strerror or error}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--out: cannot write in {out} (permission denied)")


def show_examples(rows: list[dict], count: int) -> None:
    """A seeded handful of answers, right and wrong, for a person to read."""
    import random

    for row in random.Random(0).sample(rows, min(count, len(rows))):
        mark = "ok   " if row["correct"] else "WRONG"
        print(f"{mark} {row['id']:>10}  {row['prompt'][:60]:<42} -> {row['prediction'][:30]:<10} "
              f"(reference: {row['reference']})", file=sys.stderr)
