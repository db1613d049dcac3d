"""`polymodal train RECIPE`: run a recipe's stages into a run directory."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
from pathlib import Path


def add_parser(commands) -> None:
    parser = commands.add_parser("train", help="train a recipe's stages",
                                 description="Train the stages of a recipe; the final model goes to RUN_DIR/model.")
    parser.add_argument("recipe", help="a recipe YAML with stages")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. stages.0.steps=50")
    parser.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/<recipe name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in RUN_DIR")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the model and checkpoints already in RUN_DIR (else refused)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from polymodal.cli.signals import stop_on
    from polymodal.config import load_recipe
    from polymodal.errors import UserError
    from polymodal.train.loop import NonFiniteLoss
    from polymodal.train.run import train

    recipe = load_recipe(args.recipe, args.set)
    run_dir = args.out or f"runs/{recipe.name}"
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite: give one (continue the run, or replace it)")
    with stop_on(signal.SIGTERM) as stopped:
        try:
            summary = train(recipe, run_dir, resume=args.resume, overwrite=args.overwrite)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through stop_on
            name = stopped[0] if stopped else "SIGINT"
            print(stopped_line(args, run_dir, name), file=sys.stderr)
            return 128 + int(getattr(signal, name))
        except NonFiniteLoss as error:  # training diverged: not a typo of the user's, so 1, not 2
            print(f"polymodal: error: {error} (the training diverged: lower the stage's lr, keep clip "
                  "on, or check its data)", file=sys.stderr)
            return 1
    print(json.dumps({"run_dir": run_dir, "train_seconds": round(summary["train_seconds"], 1),
                      "final_loss": summary["final_loss"], "model": f"{run_dir}/model"}))
    return 0


def stopped_line(args: argparse.Namespace, run_dir: str, name: str) -> str:
    """What a stopped run kept and the exact command that continues it."""
    from polymodal.train.run_files import resume_point

    kept = resume_point(Path(run_dir))
    if kept is None:
        return f"stopped by {name} before the first checkpoint; run the same command to start again"
    command = ["polymodal", "train", args.recipe, *[part for item in args.set for part in ("--set", item)],
               "--out", run_dir, "--resume"]
    return f"stopped by {name}; kept checkpoint {kept}; resume with: {shlex.join(command)}"
