"""`polymodal chat`: answer one prompt, or a REPL with /image, /audio, /series, /reset and /quit. Tokens stream.

An answer that draws (a model with image_output) saves each image as a PNG in --image-dir (the
current folder unless given), named chat-DATE-TIME-K.png for the session's K-th image, and
prints `image: PATH` after the answer's text. The model's own pixels, not scaled.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from polymodal.cli.loading import add_quantize_option
from polymodal.errors import UserError
from polymodal.processing.processor import with_placeholders

HELP = "commands: /image PATH, /audio PATH, /series PATH (attach to the next message), /reset, /help, /quit"


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "chat", help="chat with a model (text, images, audio, series)",
        description="MODEL is a saved model directory, a recipe YAML (built as configured) or an "
                    "LLM source (text only). With PROMPT it answers once; without, a REPL.")
    parser.add_argument("model")
    parser.add_argument("prompt", nargs="?", default=None,
                        help="answer this once and exit ('' with media alone, e.g. a spoken question); "
                             "'<image>', '<audio>' and '<series>' mark where media go")
    parser.add_argument("--image", action="append", default=[], metavar="PATH", help="attach an image (repeatable)")
    parser.add_argument("--audio", action="append", default=[], metavar="PATH",
                        help="attach a WAV clip (repeatable), for a model with an audio encoder")
    parser.add_argument("--series", action="append", default=[], metavar="PATH",
                        help="attach a time series, .csv or .npy, time first (repeatable), for a model "
                             "with a series encoder")
    parser.add_argument("--system", help="a system message")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    parser.add_argument("--image-dir", default=".", metavar="DIR",
                        help="where images the model draws are saved (default: the current folder)")
    add_quantize_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from polymodal.cli.loading import load_for_command
    from polymodal.engine.generate import Engine
    from polymodal.engine.sampling import SamplingParams
    from polymodal.processing.audio import read_wav
    from polymodal.processing.images import open_image
    from polymodal.processing.series import read_series

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop)
    images = [open_image(path) for path in args.image]  # fail on a bad path before a slow load
    for path in args.audio:
        read_wav(path)
    for path in args.series:
        read_series(path)
    if Path(args.image_dir).exists() and not Path(args.image_dir).is_dir():
        raise UserError(f"--image-dir: {args.image_dir} is not a folder")
    session = ChatSession(Engine(load_for_command(args.model, args.set, args.quantize)), params, args.system,
                          Path(args.image_dir))
    if args.prompt is not None:
        session.ask(args.prompt, images, args.audio, args.series)
        return 0
    return session.repl(images, args.audio, args.series)


class ChatSession:
    """A conversation: history, pending images, and streaming the answers to stdout."""

    def __init__(self, engine, params, system: str | None, image_dir: Path = Path(".")):
        self.engine = engine
        self.image_dir = image_dir  # where drawn images go
        self.stamp = time.strftime("%Y%m%d-%H%M%S")  # this session's images: chat-STAMP-K.png
        self.drawn = 0
        self.params = params
        self.system = system
        self.messages: list[dict] = []
        self.images: list = []
        self.audio: list = []  # clips of earlier messages, in placeholder order
        self.series: list = []  # series files of earlier messages, in placeholder order
        self.token = engine.model.llm.image_token
        self.audio_token = engine.model.config.llm.placeholder("audio")
        self.series_token = engine.model.config.llm.placeholder("series")

    def ask(self, text: str, images: list, audio: list = (), series: list = ()) -> str:
        # the media sent with this message go in it (the conversation's earlier ones are
        # placed): images first, then clips, then series, then the text, unless the text marks them
        text = with_placeholders(text, len(series), self.series_token, alone=True)
        spoken = with_placeholders(text, len(audio), self.audio_token, alone=True)  # a clip may be the question
        content = with_placeholders(spoken, len(images), self.token)
        messages = [*self.messages, {"role": "user", "content": content}]
        if self.system:
            messages.insert(0, {"role": "system", "content": self.system})
        prompt = {"messages": messages, "images": [*self.images, *images],
                  "media": {"audio": [*self.audio, *audio], "series": [*self.series, *series]}}
        encoded = self.engine.encode(prompt)  # placeholders and length checked before streaming
        answer, images = self.stream(encoded)
        for pixels in images:
            print(f"image: {self.save(pixels)}")
        self.messages = [*messages[1 if self.system else 0 :], {"role": "assistant", "content": answer}]
        self.images, self.audio, self.series = prompt["images"], prompt["media"]["audio"], prompt["media"]["series"]
        return answer

    def stream(self, encoded: dict) -> tuple[str, list]:
        """Write the answer's text to stdout as it comes; (the text, the images it drew:
        pixels [3, S, S] in [0, 1])."""
        pieces, row = [], None
        for [row] in self.engine.steps([encoded], self.params):
            text = row.tracker.text[: row.tracker.emitted]
            shown = sum(map(len, pieces))
            if len(text) > shown:
                pieces.append(text[shown:])
                sys.stdout.write(pieces[-1])
                sys.stdout.flush()
        sys.stdout.write("\n")
        return "".join(pieces), self.engine.decode_images(row.drawn)

    def save(self, pixels) -> Path:
        """A drawn image -> the next chat-STAMP-K.png in the image folder (made if missing),
        never over an existing file; written whole or not at all.

        Raises:
            UserError: the folder cannot be made or written.
        """
        from polymodal.cli.generate import write_png

        try:
            self.image_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"--image-dir: cannot make {self.image_dir}: {error.strerror or error}") from None
        while True:
            self.drawn += 1
            path = self.image_dir / f"chat-{self.stamp}-{self.drawn}.png"
            if not path.exists():
                return write_png(path, pixels)

    def repl(self, images: list, audio: list = (), series: list = ()) -> int:
        from polymodal.processing.audio import read_wav
        from polymodal.processing.images import open_image

        pending, clips, pending_series = list(images), list(audio), list(series)
        print(HELP, file=sys.stderr)
        while True:
            try:
                line = input(">>> ").strip()
            except EOFError:
                print(file=sys.stderr)
                return 0
            if not line:
                continue
            if line in ("/quit", "/exit"):
                return 0
            if line in ("/help", "/?"):
                print(HELP, file=sys.stderr)
                continue
            if line == "/reset":
                self.messages, self.images, self.audio, self.series = [], [], [], []
                pending, clips, pending_series = [], [], []
                print("(conversation cleared)", file=sys.stderr)
                continue
            try:
                if line.startswith("/image"):
                    path = line.removeprefix("/image").strip()
                    if not path:
                        raise UserError("usage: /image PATH")
                    pending.append(open_image(path))
                    print(f"(image attached; {len(pending)} pending)", file=sys.stderr)
                    continue
                if line.startswith("/audio"):
                    path = line.removeprefix("/audio").strip()
                    if not path:
                        raise UserError("usage: /audio PATH")
                    read_wav(path)  # a bad file is named now, not at the next message
                    clips.append(path)
                    print(f"(audio attached; {len(clips)} pending)", file=sys.stderr)
                    continue
                if line.startswith("/series"):
                    pending_series.append(attached_series(line))
                    print(f"(series attached; {len(pending_series)} pending)", file=sys.stderr)
                    continue
                if line.startswith("/"):
                    raise UserError(f"unknown command {line.split()[0]}; {HELP}")
                self.ask(line, pending, clips, pending_series)
                pending, clips, pending_series = [], [], []
            except UserError as error:  # the REPL survives a mistake
                print(f"error: {error}", file=sys.stderr)


def attached_series(line: str) -> str:
    """`/series PATH` -> PATH, read once so that a bad file is named now, not at the next message."""
    from polymodal.processing.series import read_series

    path = line.removeprefix("/series").strip()
    if not path:
        raise UserError("usage: /series PATH")
    read_series(path)
    return path
