"""Make the tricky and hostile image files of issue 21 §1 (run from the repository root;
bad_exif_*.jpg are kept as found: 8×8 JPEGs whose EXIF bytes a fuzzer damaged):

    .venv/bin/python tests/data/faults/make_images.py
"""

import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw

OUT = "tests/data/faults/"


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def main() -> None:
    # RGBA: a transparent background stored as (0, 0, 0, 0), an opaque blue circle.
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).ellipse((12, 12, 52, 52), fill=(30, 30, 220, 255))
    rgba.save(OUT + "rgba_blue_circle.png")
    # A palette PNG whose transparent index (0) is black.
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([0, 0, 0, 30, 30, 220] + [0] * (254 * 3))
    ImageDraw.Draw(palette).ellipse((12, 12, 52, 52), fill=1)
    palette.save(OUT + "palette_transparent_black.png", transparency=0)
    # 16-bit greyscale: background 16384, a square of 49152.
    grey = np.full((64, 64), 16384, dtype=np.uint16)
    grey[16:48, 16:48] = 49152
    Image.fromarray(grey).save(OUT + "grey16_square.png")
    # A tiny PNG whose header claims 20000×20000.
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00")) \
        + chunk(b"IEND", b"")
    with open(OUT + "bomb_20000x20000.png", "wb") as handle:
        handle.write(bomb)
    # A six-line EPS and a TIFF, both named .png.
    eps = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\n"
           b"newpath 0 0 moveto\n64 64 lineto stroke\n%%EOF\n")
    with open(OUT + "eps_named.png", "wb") as handle:
        handle.write(eps)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buffer, format="TIFF")
    with open(OUT + "tiff_named.png", "wb") as handle:
        handle.write(buffer.getvalue())


if __name__ == "__main__":
    main()
