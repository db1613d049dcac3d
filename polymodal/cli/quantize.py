"""`polymodal quantize MODEL OUT`: a model directory whose LLM runs int8 or int4 weights."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from polymodal.cli.loading import add_model_out_arguments


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "quantize", help="write a model with int8 or int4 LLM weights (loads as any model directory)",
        description="Quantize the LLM's decoder linear layers (and LM head) of a model, LoRA merged "
                    "first, and write it as a model directory (safetensors); see docs/quantization.md.")
    add_model_out_arguments(parser, "a saved model directory (or a recipe / LLM source)")
    parser.add_argument("--bits", default="int8", metavar="BITS", help="int8 (per channel, the default) or int4")
    parser.add_argument("--group-size", type=int, default=32, metavar="N",
                        help="int4: inputs per scale and minimum (default 32)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from polymodal.cli.loading import load_for_command, quantization_settings
    from polymodal.interop.common import atomic_directory
    from polymodal.quantization import quantize_model

    settings = quantization_settings(args.bits, args.group_size, option="--bits")  # before the model loads
    model = load_for_command(args.model, args.set)
    quantize_model(model, settings)
    with atomic_directory(Path(args.out), overwrite=args.overwrite) as temp:
        model.save_pretrained(temp)
    print(f"wrote the {settings.bits} model to {args.out}", file=sys.stderr)
    return 0
