"""Images -> pixel tensors [3, S, S] in [0, 1], with the pixels an image viewer shows.

One decoder serves training, eval, chat, the search index and the server:
- only the formats we accept are opened (PNG, JPEG, WebP, GIF, BMP): bytes of another format
  (TIFF, EPS, ICO, ...) are refused, whatever their file name or MIME type says, so Pillow never
  runs a parser we did not choose (EPS ran Ghostscript, and looped forever in Pillow 12.0-12.2);
- the size in the header is checked before decoding, so a 74-byte PNG that claims 20000×20000
  is refused in microseconds instead of allocating gigabytes;
- transparent pixels are composited onto white, as viewers and transformers' `convert_to_rgb` do
  (a plain `convert("RGB")` keeps the stored colour of a transparent pixel, usually black);
- 16-bit samples are scaled to 8 bits (`convert` clips them, so 16384 and 49152 both become 255);
- the EXIF orientation is applied, as viewers do for photos from phones.
Each refusal is a `UserError` with one line naming the file.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from polymodal.errors import UserError

# Pillow's names of the formats we open (a multi-picture JPEG opens through "JPEG").
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# 64 megapixels: an 8K frame (33 MP) passes; Pillow itself only warns up to 179 MP, which for
# an RGB image is over 500 MB decoded. The server sets its own, lower limit.
MAX_PIXELS = 64 * 1024 * 1024
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class ImageTooLarge(UserError):
    """An image whose header declares more pixels than the limit; nothing was decoded."""


def open_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image file as RGB, as a viewer shows it.

    Raises:
        UserError: the file is missing, not a file, not an accepted format, corrupt, or
            (`ImageTooLarge`) declares more than `max_pixels` pixels. The message names `path`.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"image not found: {path}")
    if not path.is_file():
        raise UserError(f"not a file: {path}")
    try:
        with open(path, "rb") as handle:
            return _decode(handle, str(path), max_pixels)
    except OSError as error:  # unreadable file (permissions, I/O)
        raise UserError(f"unreadable image: {path} ({error.strerror or error})") from None


def image_from_bytes(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode image bytes (an upload, a data: URI) as RGB; the same rules as `open_image`.

    Raises:
        UserError: not an accepted format, corrupt, or (`ImageTooLarge`) too many pixels;
            the message names `name`.
    """
    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(handle, name: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own pixel limit decides; Pillow's warning would only repeat it on stderr.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(handle, formats=ACCEPTED_FORMATS)  # reads the header only
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"image too large: {name} is {width}×{height} pixels "
                                    f"(the limit is {max_pixels:,})")
            image.load()  # decode now: truncated files fail here, not later in a batch
    except UnidentifiedImageError:
        accepted = ", ".join(ACCEPTED_FORMATS)
        raise UserError(f"not an image: {name} (accepted formats: {accepted})") from None
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"image too large: {name} (a decompression bomb)") from None
    except UserError:
        raise
    except Exception:  # Pillow's plugins raise many kinds on hostile bytes (struct.error, ...)
        raise UserError(f"unreadable image: {name} (corrupt or truncated)") from None
    try:
        return as_viewed(image)
    except Exception:  # a damaged palette or mode that cannot be converted
        raise UserError(f"unreadable image: {name} (its colours cannot be converted)") from None


def as_viewed(image: Image.Image) -> Image.Image:
    """An RGB image with the pixels a viewer shows: EXIF orientation applied, 16-bit samples
    scaled to 8 bits, transparency composited onto white."""
    with contextlib.suppress(Exception):  # a damaged EXIF block (odd tag values): as stored
        image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        image = _to_eight_bits(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")  # applies a palette's or a tRNS chunk's transparency
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def _to_eight_bits(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale image ('I;16*', or 'I' as PNG decodes it) -> 'L', scaled 65535 -> 255."""
    samples = np.asarray(image).astype(np.float64)  # [H, W]
    eight = np.clip(np.rint(samples / 257.0), 0, 255).astype(np.uint8)  # 257 = 65535 / 255
    flat = Image.fromarray(eight)  # uint8 [H, W] -> mode "L"
    if "transparency" in image.info:  # a tRNS grey level, given in 16-bit units
        flat.info["transparency"] = round(image.info["transparency"] / 257)
    return flat


def to_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> [3, size, size] float32 in [0, 1] (bicubic resize to a square)."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def load_image(image: str | Path | Image.Image, size: int) -> torch.Tensor:
    """A path or PIL image -> [3, size, size] in [0, 1]; a PIL image is read as a viewer shows it."""
    image = open_image(image) if not isinstance(image, Image.Image) else as_viewed(image)
    return to_pixels(image, size)
