"""`polymodal generate`: draw images from a prompt with a model that draws (issue 17).

    polymodal generate runs/easy-vqa-draw/model "Draw a red circle." --out red_circle.png \\
        --n 4 --cfg 3.0 --seed 0 --contact-sheet

writes red_circle-0.png ... red_circle-3.png (one image: red_circle.png itself) and, with
--contact-sheet, red_circle-sheet.png (the images in a grid, 2 grey pixels apart), then
prints the paths. Each file holds the model's own pixels (64x64 for the easy-VQA recipe), not
scaled: a viewer zooms, the file keeps what the model drew. Writes are atomic.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from tqdm import tqdm

from polymodal.errors import UserError

SHEET_GAP = 2  # pixels between the images of a contact sheet
SHEET_GREY = 0.5  # the gaps' shade: drawings on white backgrounds stay apart
BATCH_SIZE = 16  # images per engine call: a large --n keeps a bounded KV cache


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "generate", help="draw images from a prompt (a model that draws: image_output)",
        description="MODEL is a saved model directory or a recipe YAML of a model that draws. "
                    "Writes the model's own pixels (not scaled) as PNG and prints the paths.")
    parser.add_argument("model")
    parser.add_argument("prompt", help='what to draw, e.g. "Draw a red circle."')
    parser.add_argument("--out", required=True, metavar="PATH.png",
                        help="the PNG to write; with --n > 1, PATH-0.png ... PATH-{n-1}.png")
    parser.add_argument("--n", type=int, default=1, help="images to draw (each its own seed: seed + j)")
    parser.add_argument("--cfg", type=float, default=1.0,
                        help="classifier-free guidance scale: 1 is none (the default), 3 a usual choice")
    parser.add_argument("--seed", type=int, help="the same seed draws the same images (default: fresh)")
    parser.add_argument("--temperature", type=float, default=1.0, help="of the code sampling; 0 is greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest codes (0: all)")
    parser.add_argument("--contact-sheet", action="store_true",
                        help="also write PATH-sheet.png: the images in a grid, at their own size")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from polymodal.cli.loading import load_for_command
    from polymodal.engine.generate import Engine
    from polymodal.engine.images import MAX_IMAGES_PER_PROMPT
    from polymodal.engine.sampling import SamplingParams

    if not 1 <= args.n <= MAX_IMAGES_PER_PROMPT:
        raise UserError(f"--n must be in [1, {MAX_IMAGES_PER_PROMPT}], got {args.n}")
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                            guidance_scale=args.cfg)
    paths = output_paths(Path(args.out), args.n)  # refused before a slow load
    sheet = paths[0].parent / f"{Path(args.out).stem}-sheet.png" if args.contact_sheet else None
    refuse_folders([*paths, sheet] if sheet else paths)
    engine = Engine(load_for_command(args.model, args.set))
    prompt = {"messages": [{"role": "user", "content": [{"type": "text", "text": args.prompt}]}]}
    with tqdm(total=args.n, desc="drawing", unit="image", disable=args.n <= BATCH_SIZE) as bar:
        images = engine.generate_images_in_batches([prompt], params, args.n, BATCH_SIZE, bar.update)  # [n, 3, S, S]
    written = [write_png(path, pixels) for path, pixels in zip(paths, images)]
    if sheet is not None:
        written.append(write_png(sheet, contact_sheet(images)))
    side = images.shape[-1]
    print(f"drew {args.n} image(s) of {side}x{side} pixels (the model's own size, not scaled)", file=sys.stderr)
    for path in written:
        print(path)
    return 0


def output_paths(out: Path, n: int) -> list[Path]:
    """`out` for one image, else out-0.png ... out-{n-1}.png beside it.

    Raises:
        UserError: `out` is not a .png name, is a folder, or its folder is missing or not writable.
    """
    if out.suffix.lower() != ".png":
        raise UserError(f"--out: {out} is not a .png file name (generate writes PNG)")
    if out.is_dir():
        raise UserError(f"--out: {out} is a folder; give a file name such as {out / 'image.png'}")
    folder = out.parent
    if not folder.is_dir():
        raise UserError(f"--out: {folder} is not a folder" if folder.exists() else
                        f"--out: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--out: cannot write in {folder} (permission denied)")
    if n == 1:
        return [out]
    return [folder / f"{out.stem}-{index}{out.suffix}" for index in range(n)]


def refuse_folders(paths: list[Path]) -> None:
    """Raises UserError when a file to write is an existing folder, before anything is drawn or
    written (a set half written over earlier files is worse than none)."""
    for path in paths:
        if path.is_dir():
            raise UserError(f"--out: {path} is a folder in the way of an image to write")


def write_png(path: Path, pixels) -> Path:
    """pixels [3, H, W] in [0, 1] -> a PNG at `path`, written whole or not at all.

    Raises:
        UserError: the file cannot be written (permission, a folder in the way).
    """
    import errno

    from polymodal.safe_files import atomic_write
    from polymodal.serve.pictures import to_image

    try:
        atomic_write(path, lambda temp: to_image(pixels).save(temp, format="PNG"))
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # the CLI's one line for a full disk
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    return path


def contact_sheet(images):
    """images [N, 3, S, S] -> one picture [3, H, W]: a grid of ceil(sqrt(N)) columns, each image
    at its own size, SHEET_GAP grey pixels between them (and in the empty cells)."""
    import torch

    count, _, side, _ = images.shape
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    step = side + SHEET_GAP
    sheet = torch.full((3, rows * step - SHEET_GAP, columns * step - SHEET_GAP), SHEET_GREY)
    for index, image in enumerate(images):
        top, left = (index // columns) * step, (index % columns) * step
        sheet[:, top : top + side, left : left + side] = image
    return sheet
