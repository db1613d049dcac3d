"""Images as a viewer shows them, and hostile image files refused in one line (issue 21, §1).

The files under tests/data/faults/ are made by tests/data/faults/make_images.py.
"""

import io

import numpy as np
import pytest
from PIL import Image

from conftest import DATA, RECIPES
from polymodal.cli.main import main
from polymodal.data.sample import Sample
from polymodal.data.validate import check_samples, media_problem
from polymodal.errors import UserError
from polymodal.processing.images import (
    ImageTooLarge,
    as_viewed,
    image_from_bytes,
    load_image,
    open_image,
)

FAULTS = f"{DATA}/faults"
BLUE = (30, 30, 220)
WHITE = (255, 255, 255)


@pytest.mark.parametrize("name", ["rgba_blue_circle.png", "palette_transparent_black.png"])
def test_transparent_background_is_white_as_a_viewer_shows_it(name):
    pixels = np.asarray(open_image(f"{FAULTS}/{name}"))
    assert tuple(pixels[0, 0]) == WHITE  # stored as black (0, 0, 0[, 0])
    assert tuple(pixels[32, 32]) == BLUE


def test_sixteen_bit_grey_is_scaled_not_clipped():
    pixels = np.asarray(open_image(f"{FAULTS}/grey16_square.png"))
    background, square = pixels[0, 0, 0], pixels[32, 32, 0]
    assert background == round(16384 / 257) and square == round(49152 / 257)  # 64 and 191


def test_pixel_tensors_follow_the_same_rules():
    tensor = load_image(f"{FAULTS}/rgba_blue_circle.png", 32)  # [3, 32, 32]
    assert tensor.shape == (3, 32, 32) and tensor[:, 0, 0].tolist() == [1.0, 1.0, 1.0]
    rgba = Image.open(f"{FAULTS}/rgba_blue_circle.png")  # a PIL image handed over directly
    assert load_image(rgba, 32)[:, 0, 0].tolist() == [1.0, 1.0, 1.0]


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert image_from_bytes(buffer.getvalue(), "photo.jpg").size == (10, 20)


@pytest.mark.parametrize("name", ["bad_exif_type.jpg", "bad_exif_struct.jpg"])
def test_a_damaged_exif_block_keeps_the_stored_pixels(name):
    """Two 8×8 JPEGs with an orientation tag whose EXIF bytes were damaged (Pillow's
    exif_transpose raises TypeError / struct.error on them; a viewer shows them as stored)."""
    assert open_image(f"{FAULTS}/{name}").size == (8, 8)


def test_a_header_that_claims_a_huge_image_is_refused_before_decoding():
    with pytest.raises(ImageTooLarge, match=r"bomb_20000x20000\.png"):
        open_image(f"{FAULTS}/bomb_20000x20000.png")  # Pillow: DecompressionBombError
    big = _png_header_only(12000, 12000)  # within Pillow's warning range: it would decode it
    with pytest.raises(ImageTooLarge, match="12000×12000"):
        image_from_bytes(big, "big.png")
    assert as_viewed(Image.new("RGB", (4, 4))).size == (4, 4)


@pytest.mark.parametrize("name", ["eps_named.png", "tiff_named.png"])
def test_only_accepted_formats_are_opened_whatever_the_name(name):
    with pytest.raises(UserError, match="accepted formats"):
        open_image(f"{FAULTS}/{name}")


@pytest.mark.parametrize("fmt", ["TIFF", "ICO", "TGA", "PCX", "PPM", "SGI", "IM", "SPIDER"])
def test_other_formats_sent_as_png_are_refused(fmt):
    buffer = io.BytesIO()
    Image.new("L" if fmt == "SPIDER" else "RGB", (16, 16)).save(buffer, format=fmt)
    Image.open(io.BytesIO(buffer.getvalue())).load()  # Pillow itself would decode it
    with pytest.raises(UserError, match="accepted formats"):
        image_from_bytes(buffer.getvalue(), "upload.png")


def test_a_bomb_is_a_bad_sample_in_training_and_the_others_stay(tmp_path):
    good = [Sample(f"good{i}", _conversation(), [f"{DATA}/red_circle.png"]) for i in range(11)]
    bomb = Sample("bomb", _conversation(), [f"{FAULTS}/bomb_20000x20000.png"])
    kept = check_samples([*good, bomb], "<image>", tmp_path / "bad.jsonl", max_bad_fraction=0.1)
    assert [s.id for s in kept] == [s.id for s in good]
    assert "too large" in (tmp_path / "bad.jsonl").read_text()
    assert "too large" in media_problem(f"{FAULTS}/bomb_20000x20000.png")


def test_chat_with_a_bomb_is_one_line_and_exit_2(capsys):
    code = main(["chat", f"{RECIPES}/tiny-llava.yaml", "--image",
                 f"{FAULTS}/bomb_20000x20000.png", "What shape?"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "too large" in err


def _conversation():
    return [{"role": "user", "content": "<image>\nWhat shape?"},
            {"role": "assistant", "content": "circle"}]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR declaring width×height, and no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
