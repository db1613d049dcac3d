"""A contact sheet: the hits of a search as one picture, each with its rank and score."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from polymodal.processing.images import open_image
from polymodal.safe_files import atomic_write

THUMB = 160  # pixels per side
CAPTION = 34  # pixels of text under each thumbnail


def contact_sheet(hits, out: str | Path, title: str, columns: int = 5) -> None:
    rows = max(1, -(-len(hits) // columns))
    width = columns * THUMB
    sheet = Image.new("RGB", (width, 24 + rows * (THUMB + CAPTION)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 6), title[:120], fill="black")
    for index, hit in enumerate(hits):
        x, y = (index % columns) * THUMB, 24 + (index // columns) * (THUMB + CAPTION)
        thumb = open_image(hit.path)
        scale = (THUMB - 8) / max(thumb.size)  # small images are enlarged, large ones shrunk
        thumb = thumb.resize((max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale))))
        sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        draw.text((x + 4, y + THUMB), f"#{hit.rank}  {hit.score:.3f}", fill="black")
        draw.text((x + 4, y + THUMB + 14), Path(hit.path).name[:24], fill="gray")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda path: sheet.save(path, format="PNG"))
