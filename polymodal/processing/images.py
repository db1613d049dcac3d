"""Images -> pixel tensors [3, S, S] in [0, 1]; a bad file is a UserError naming it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from polymodal.errors import UserError


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file as RGB, or raise a UserError naming the file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"image not found: {path}")
    if not path.is_file():
        raise UserError(f"not a file: {path}")
    try:
        with Image.open(path) as image:
            image.load()  # decode now: truncated files fail here, not later in a batch
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        kind = "not an image" if isinstance(error, UnidentifiedImageError) else "unreadable image"
        raise UserError(f"{kind}: {path}") from None


def to_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> [3, size, size] float32 in [0, 1] (bicubic resize to a square)."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def load_image(image: str | Path | Image.Image, size: int) -> torch.Tensor:
    """A path or PIL image -> [3, size, size] in [0, 1]."""
    if not isinstance(image, Image.Image):
        image = open_image(image)
    return to_pixels(image.convert("RGB"), size)
