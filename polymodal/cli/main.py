"""`polymodal` command line: one subcommand per module; a user's mistake exits 2 with one line."""

from __future__ import annotations

import argparse
import os
import sys

from polymodal.errors import UserError

COMMANDS = ("info", "chat")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="polymodal",
        description="Build, train, evaluate and serve multimodal LLMs from pretrained parts.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"polymodal.cli.{name}").add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return args.run(args) or 0
    except UserError as error:
        print(f"polymodal: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def _quiet_libraries() -> None:
    # Library warnings about our own deliberate choices (inputs_embeds, GGUF dequantizing) are
    # noise to a user; real failures still raise.
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


if __name__ == "__main__":
    sys.exit(main())
