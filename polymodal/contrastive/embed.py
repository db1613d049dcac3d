"""Embedding many images or texts with a DualEncoder, in batches, with a progress bar."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from polymodal.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def require_dual_encoder(model, what: str) -> None:
    if not hasattr(model, "encode_texts"):
        raise UserError(f"{what} needs a contrastive (dual-encoder) model, e.g. one trained "
                        f"with recipes/clip-easyvqa.yaml")


def image_files(folder: str | Path) -> list[Path]:
    """Every file under `folder` (recursively), sorted; the caller decides what is an image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"not a folder: {folder}")
    return sorted(path for path in folder.rglob("*") if path.is_file() and not path.name.startswith("."))


@torch.inference_mode()
def embed_images(model, paths: list, batch_size: int = 64, skip_bad: bool = False,
                 desc: str = "images") -> tuple[torch.Tensor, list, list[tuple[str, str]]]:
    """(embeddings [N, D], the paths embedded, [(path, reason)] skipped).

    A file that is not a decodable image is a UserError naming it, or with `skip_bad`
    is skipped and listed.
    """
    require_dual_encoder(model, "embedding images")
    kept, skipped, chunks, pending = [], [], [], []
    for path in tqdm(paths, desc=desc, unit="img"):
        try:
            pending.append(model.encoder.load_media(path))  # [3, S, S], or log-mel for audio
            kept.append(path)
        except UserError as error:
            if not skip_bad:
                raise
            skipped.append((str(path), str(error)))
        if len(pending) == batch_size:
            chunks.append(model.encode_images(torch.stack(pending)))
            pending = []
    if pending:
        chunks.append(model.encode_images(torch.stack(pending)))
    dim = model.text.dim
    return (torch.cat(chunks) if chunks else torch.zeros(0, dim)), kept, skipped


@torch.inference_mode()
def embed_texts(model, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """[N, D], L2-normalised; an empty text is a UserError."""
    require_dual_encoder(model, "embedding texts")
    if any(not text.strip() for text in texts):
        raise UserError("an empty text cannot be embedded")
    return torch.cat([model.encode_texts(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)])
