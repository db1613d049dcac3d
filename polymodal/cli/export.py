"""`polymodal export MODEL --format FORMAT OUT`: a stock checkpoint that loads without polymodal."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from polymodal.cli.loading import add_model_out_arguments
from polymodal.errors import UserError

FORMATS = ("llava", "smolvlm", "gguf")  # help text only: polymodal.interop's table decides


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "export", help="write a model as a stock checkpoint (transformers LLaVA or SmolVLM, GGUF)",
        description="Write a saved model (or a recipe, or an LLM source) as a checkpoint that "
                    "plain transformers or llama.cpp loads: LoRA merged, a model card beside it. "
                    "A composition the format has no stock class for is refused with the part named.")
    add_model_out_arguments(parser, "a saved model directory, a recipe YAML or an LLM source")
    parser.add_argument("--format", required=True, metavar="FORMAT", help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="floating-point type of the written weights (default float32)")
    parser.add_argument("--eval", action="append", default=[], metavar="RESULTS",
                        help="an evaluation's results.json (or its --out folder) for the model card; repeatable")
    parser.add_argument("--license", default="other", help="the license id the model card declares")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from polymodal.cli.loading import load_for_command
    from polymodal.interop import EXPORT_FORMATS, export_model

    if args.format not in EXPORT_FORMATS:  # before the model loads
        raise UserError(f"unknown export format {args.format!r}; known: {', '.join(sorted(EXPORT_FORMATS))}")
    facts = card_facts(args.model, args.eval, args.license)
    model = load_for_command(args.model, args.set)
    out = export_model(model, args.format, Path(args.out), overwrite=args.overwrite, dtype=args.dtype,
                       facts=facts)
    print(f"wrote {args.format} to {out}", file=sys.stderr)
    return 0


def card_facts(source: str, eval_files: list[str], license: str):
    """The model card's recipe (a run's recipe.yaml beside its model/ folder, or the recipe
    MODEL itself) and evaluation figures (each results.json's numbers by task).

    Raises:
        UserError: an --eval path that is not a readable results.json.
    """
    from polymodal.interop.common import CardFacts, read_json

    path = Path(source)
    if path.is_dir():  # a run's model/ folder: the run's recipe.yaml is beside it
        candidates = (path / "recipe.yaml", path.parent / "recipe.yaml")
    else:
        candidates = (path,) if path.suffix in (".yaml", ".yml") else ()
    recipe = next((candidate.read_text(encoding="utf-8") for candidate in candidates if candidate.is_file()), None)
    evaluations = {}
    for name in eval_files:
        results = Path(name) / "results.json" if Path(name).is_dir() else Path(name)
        record = read_json(results)
        task = record.get("task") if isinstance(record.get("task"), str) else results.parent.name
        evaluations[task] = {key: value for key, value in record.items()
                             if isinstance(value, int | float) and not isinstance(value, bool)}
    return CardFacts(recipe=recipe, evaluations=evaluations, license=license)
