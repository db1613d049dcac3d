"""The judge of drawn images (polymodal/eval/judge.py), trained from scratch: its training
seconds and its accuracy per head on easy-VQA's test images, as they are and degraded as a
drawing model's images may be (blurred: down-sampled and back; pixel noise), so that a reader
knows how far its verdicts on imperfect drawings can be trusted; and how often it answers
"none" for images with no shape (the same kinds its training's synthetic negatives have,
drawn afresh: a check that the class works, not a test on unseen kinds).

    .venv/bin/python benchmarks/judge.py [--threads 2] [--epochs 6] [--width 16]

Prints a markdown table; nothing is cached (the eval task trains and caches its own).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from polymodal.data.easy_vqa import easy_vqa_folder
from polymodal.eval.judge import (
    IGNORE,
    NO_COLOR,
    NO_SHAPE,
    JudgeSettings,
    blurred,
    labelled_images,
    train_judge,
)


def degraded(pixels: torch.Tensor, kind: str, amount: float) -> torch.Tensor:
    """pixels [N, 3, 64, 64] in [0, 1] -> blurred (down to 64 / amount and back, bilinear) or
    with Gaussian noise of standard deviation `amount`, clamped to [0, 1]."""
    if kind == "blur":
        return blurred(pixels, int(amount)).clamp(0, 1)
    generator = torch.Generator().manual_seed(0)
    return (pixels + amount * torch.randn(pixels.shape, generator=generator)).clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=JudgeSettings.epochs)
    parser.add_argument("--width", type=int, default=JudgeSettings.width)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = JudgeSettings(width=args.width, epochs=args.epochs)
    started = time.perf_counter()
    judge = train_judge(easy_vqa_folder("train"), easy_vqa_folder("test"), settings)
    total = time.perf_counter() - started
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads; "
          f"settings {settings}; {judge.info['train_images']} training images")
    print(f"training {judge.info['train_seconds']} s (reading the images included), "
          f"with measuring the test split {total:.1f} s\n")
    pixels, shapes, colors = labelled_images(easy_vqa_folder("test"))
    pixels = pixels.float() / 255
    print("| test images | shape | colour |\n| --- | ---: | ---: |")
    for name, kind, amount in [("as they are", "noise", 0.0), ("blurred: 32 px and back", "blur", 2),
                               ("blurred: 16 px and back", "blur", 4), ("blurred: 8 px and back", "blur", 8),
                               ("noise σ 0.1", "noise", 0.1), ("noise σ 0.2", "noise", 0.2)]:
        predicted_shapes, predicted_colors = judge.classify(degraded(pixels, kind, amount))
        cells = []
        for labels, predicted in ((shapes, predicted_shapes), (colors, predicted_colors)):
            known = labels != IGNORE
            cells.append(f"{(predicted[known] == labels[known]).float().mean():.1%} of {int(known.sum())}")
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    print("\n| images with no shape (64 each) | judged shape none | judged colour none |\n| --- | ---: | ---: |")
    generator = torch.Generator().manual_seed(1)
    for name, images in [("white", torch.ones(64, 3, 64, 64)),
                         ("a light tint (a background)", (0.85 + 0.15 * torch.rand(64, 3, 1, 1, generator=generator))
                          .expand(-1, -1, 64, 64)),
                         ("uniform noise", torch.rand(64, 3, 64, 64, generator=generator)),
                         ("one colour filling the frame", torch.rand(64, 3, 1, 1, generator=generator).expand(-1, -1, 64, 64)),
                         ("black", torch.zeros(64, 3, 64, 64))]:
        judged_shapes, judged_colors = judge.classify(images)
        print(f"| {name} | {(judged_shapes == NO_SHAPE).float().mean():.0%} | "
              f"{(judged_colors == NO_COLOR).float().mean():.0%} |")


if __name__ == "__main__":
    main()
