"""`polymodal` command line: one subcommand per module; a user's mistake exits 2 with one line."""

from __future__ import annotations

import argparse
import errno
import os
import sys

from polymodal.errors import UserError

COMMANDS = ("info", "chat", "generate", "train", "eval", "analyze", "embed", "index", "search", "serve", "export", "quantize")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each subcommand's parser by name."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="polymodal",
        description="Build, train, evaluate and serve multimodal LLMs from pretrained parts.",
    )
    from polymodal import __version__

    parser.add_argument("--version", action="version", version=f"polymodal {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"polymodal.cli.{name}").add_parser(commands)
    return parser, dict(commands.choices)


def parse(argv: list[str]) -> argparse.Namespace:
    parser, subcommands = build_parser()
    if argv and argv[0] in subcommands:
        # Intermixed, so that a positional may follow an option: `chat MODEL --image X "prompt"`.
        args = subcommands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse(sys.argv[1:] if argv is None else argv)
    _quiet_libraries()
    try:
        return args.run(args) or 0
    except UserError as error:
        print(f"polymodal: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # every command's writes are atomic: the file keeps its last complete version
        where = f" writing {error.filename}" if error.filename else ""
        print(f"polymodal: error: disk full{where}; the last complete files are kept", file=sys.stderr)
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
