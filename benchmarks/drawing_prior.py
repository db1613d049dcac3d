"""How many drawings does it take to draw easy-VQA's shapes from their image codes? A
calibration for issue 17's target (90% of drawings with the asked shape and colour).

A small transformer (`--layers` 4, `--dim` 192, trained from scratch, no LLM) learns the
same task the drawing LLM learns: a class (one of the 24 captions; a 25th, empty class for 10%
of samples, for classifier-free guidance) then the image's K codes in raster order, next-code
cross entropy, from the tokenizer of a saved drawing or tokenizer model. It is graded as
`polymodal eval --task text-to-image` grades a model (the same judge, prompts, guidance and
metrics), at each of `--eval-at` steps of one run (AdamW, constant learning rate after a
50-step warmup, so the checkpoints form a learning curve). The prior sees only drawings and
costs a few milliseconds a drawing, so it shows how many drawings raster code drawing needs
at all; the LLM's curve is in docs/image-generation.md.

    .venv/bin/python benchmarks/drawing_prior.py runs/easy-vqa-tokenizer/model \\
        [--eval-at 600,2000] [--batch-size 32] [--positions raster|grid] [--foreground-weight 1]
        [--out DIR]

`--positions grid` adds a learned row and column embedding to each position (the code
above is then one embedding away, not K/side tokens back); `--foreground-weight W` weighs the
loss of every code but the image's most frequent one (its background) W times. Prints a markdown table;
`--out` gets grid.png (prompts against samples at the last checkpoint).
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from polymodal.build import load_model
from polymodal.data.easy_vqa import (
    COLORS,
    SHAPES,
    attributes_by_image,
    easy_vqa_folder,
    full_captions,
)
from polymodal.errors import UserError
from polymodal.eval.judge import load_judge, read_pixels
from polymodal.eval.tasks import TaskOptions
from polymodal.eval.text_to_image import Drawings, TextToImage, drawing_metrics, plot_grid

CLASSES = len(SHAPES) * len(COLORS)  # 24; index CLASSES is the empty (unconditional) class


class CodePrior(nn.Module):
    """class [N] -> logits [N, K, C] of each code given the class and the codes before it."""

    def __init__(self, codebook_size: int, num_codes: int, dim: int, layers: int, grid_positions: bool):
        super().__init__()
        side = math.isqrt(num_codes)
        self.classes = nn.Embedding(CLASSES + 1, dim)
        self.codes = nn.Embedding(codebook_size, dim)
        self.positions = nn.Parameter(torch.randn(num_codes, dim) * 0.02)
        # grid: position k (which predicts code k) also gets code k's row and column embedding,
        # shared along the row and the column
        self.rows = nn.Parameter(torch.randn(side, dim) * 0.02) if grid_positions else None
        self.columns = nn.Parameter(torch.randn(side, dim) * 0.02) if grid_positions else None
        self.register_buffer("cells", torch.arange(num_codes), persistent=False)
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, codebook_size)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(num_codes), persistent=False)

    def forward(self, classes: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """classes [N], codes [N, k] (k < K: the codes so far) -> logits [N, k + 1, C]."""
        inputs = torch.cat([self.classes(classes)[:, None], self.codes(codes)], 1)[:, : len(self.positions)]
        length = inputs.shape[1]
        positions = self.positions[:length]
        if self.rows is not None:
            cells = self.cells[:length]
            positions = positions + self.rows[cells // len(self.rows)] + self.columns[cells % len(self.rows)]
        hidden = self.body(inputs + positions, mask=self.causal[:length, :length], is_causal=True)
        return self.head(self.norm(hidden))


def training_codes(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """easy-VQA's training images whose questions tell both attributes -> (codes [N, K],
    classes [N]: shape index * 8 + colour index)."""
    found = [(image, a) for image, a in attributes_by_image(easy_vqa_folder("train")) if len(a) == 2]
    pixels = read_pixels([image for image, _ in found]).float() / 255
    with torch.no_grad():
        codes = torch.cat([tokenizer.encode(pixels[i : i + 256]) for i in range(0, len(pixels), 256)])
    classes = torch.tensor([SHAPES.index(a["shape"]) * len(COLORS) + COLORS.index(a["color"]) for _, a in found])
    return codes, classes


@torch.no_grad()
def sample(prior: CodePrior, classes: torch.Tensor, num_codes: int, scale: float, seed: int) -> torch.Tensor:
    """classes [N] -> codes [N, K], sampled at temperature 1 from u + scale (c - u) (scale 1:
    the conditional logits alone)."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.zeros(len(classes), 0, dtype=torch.long)
    empty = torch.full_like(classes, CLASSES)
    for _ in range(num_codes):
        logits = prior(classes, codes)[:, -1]
        if scale != 1:
            unconditional = prior(empty, codes)[:, -1]
            logits = unconditional + scale * (logits - unconditional)
        codes = torch.cat([codes, torch.multinomial(logits.softmax(-1), 1, generator=generator)], 1)
    return codes


@torch.no_grad()
def judged(prior: CodePrior, tokenizer, per_prompt: int, scale: float, seed: int) -> tuple[dict, Drawings]:
    """Draw `per_prompt` images of each of the 24 prompts and grade them as text-to-image does."""
    items = TextToImage().items(TaskOptions())
    classes = torch.tensor([SHAPES.index(item.info["shape"]) * len(COLORS) + COLORS.index(item.info["color"])
                            for item in items]).repeat_interleave(per_prompt)
    prior.eval()
    pixels = tokenizer.decode(sample(prior, classes, tokenizer.num_codes, scale, seed)).float()
    prior.train()
    shapes, colors = load_judge(progress=False).classify(pixels)
    drawings = Drawings(items, per_prompt, pixels, shapes, colors)
    return drawing_metrics(drawings, full_captions(easy_vqa_folder("test"))), drawings


def parse_arguments() -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """The command line, each value checked (a mistake: usage and one error line, exit 2)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a saved model with an image tokenizer (kind fsq)")
    parser.add_argument("--eval-at", default="600,2000", help="steps at which to judge, comma-separated")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dim", type=int, default=192, help="a multiple of the 4 attention heads")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--positions", choices=["raster", "grid"], default="raster")
    parser.add_argument("--foreground-weight", type=float, default=1.0,
                        help="loss weight of codes other than the image's most frequent one (its background)")
    parser.add_argument("--images-per-prompt", type=int, default=8)
    parser.add_argument("--cfg", type=float, default=3.0, help="judged at guidance 1 and at this scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="a folder for grid.png")
    args = parser.parse_args()
    try:
        args.eval_at = sorted({int(step) for step in args.eval_at.split(",")})
    except ValueError:
        parser.error(f"--eval-at: expected steps such as 600,2000, got {args.eval_at!r}")
    for name in ("batch_size", "layers", "images_per_prompt", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.eval_at[0] < 1:
        parser.error(f"--eval-at: steps must be at least 1, got {args.eval_at[0]}")
    if args.dim < 4 or args.dim % 4:
        parser.error(f"--dim must be a positive multiple of 4 (the attention heads), got {args.dim}")
    for name in ("lr", "foreground_weight", "cfg"):
        if not 0 <= getattr(args, name) < math.inf:  # also refuses NaN
            parser.error(f"--{name.replace('_', '-')} must be a number of at least 0, got {getattr(args, name)}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        parser.error(f"--out: {args.out} is a file; give a folder for grid.png")
    try:  # now, not after the training
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--out: cannot create {args.out}: {error.strerror or error}")
    return args, parser


def load_codes(parser: argparse.ArgumentParser, model: str, positions: str):
    """(tokenizer, codes [N, K], classes [N]) of a saved model; a model that cannot serve is
    one error line (exit 2)."""
    try:
        tokenizer = load_model(model).image_tokenizer
        if tokenizer is None:
            raise UserError(f"{model} has no image tokenizer (train recipes/easy-vqa-tokenizer.yaml)")
        if positions == "grid" and math.isqrt(tokenizer.num_codes) ** 2 != tokenizer.num_codes:
            raise UserError(f"--positions grid needs a square grid of codes; this tokenizer has "
                            f"{tokenizer.num_codes} (a 1-D tokenizer?)")
        return (tokenizer.eval(), *training_codes(tokenizer.eval()))
    except UserError as error:
        parser.error(str(error))


def main() -> None:
    args, parser = parse_arguments()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tokenizer, codes, classes = load_codes(parser, args.model, args.positions)
    prior = CodePrior(tokenizer.codebook_size, tokenizer.num_codes, args.dim, args.layers, args.positions == "grid")
    optimizer = torch.optim.AdamW(prior.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 50))
    checkpoints = args.eval_at
    generator = torch.Generator().manual_seed(args.seed)
    print(f"{len(codes)} training images, {tokenizer.num_codes} codes of {tokenizer.codebook_size}; "
          f"{platform.processor() or platform.machine()}, {args.threads} threads\n")
    print("| steps | drawings seen | epochs | train seconds | guidance | shape | colour | both |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    seconds, drawings = 0.0, None
    for step in tqdm(range(1, checkpoints[-1] + 1), desc="prior", unit="step"):
        started = time.perf_counter()
        rows = torch.randint(len(codes), (args.batch_size,), generator=generator)
        batch_classes = classes[rows].masked_fill(torch.rand(args.batch_size, generator=generator) < 0.1, CLASSES)
        logits = prior(batch_classes, codes[rows])
        targets = codes[rows]
        losses = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        weights = 1 + (args.foreground_weight - 1) * (targets != targets.mode(1).values[:, None]).float()
        loss = (losses * weights.flatten()).sum() / weights.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        warmup.step()
        seconds += time.perf_counter() - started
        if step in checkpoints:
            for scale in (1.0, args.cfg):
                metrics, drawings = judged(prior, tokenizer, args.images_per_prompt, scale, args.seed)
                seen = step * args.batch_size
                tqdm.write(f"| {step} | {seen} | {seen / len(codes):.1f} | {seconds:.0f} | {scale:g} | "
                           f"{metrics['shape']:.1%} | {metrics['color']:.1%} | {metrics['both']:.1%} |")
    if args.out is not None and drawings is not None:
        plot_grid(drawings, args.out / "grid.png", f"code prior, {checkpoints[-1]} steps, guidance {args.cfg:g}")


if __name__ == "__main__":
    main()
