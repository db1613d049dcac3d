"""ImageIndex: FAISS HNSW over L2-normalised image embeddings (inner product = cosine),
with each row's path, and the fingerprint of the model that made them.

Why FAISS: the standard library for vector search, a wheel on PyPI (faiss-cpu), exact
and approximate indexes behind one interface, its own on-disk format. HNSW because it
grows by `add` without retraining (an IVF index needs its clusters trained first) and
answers in logarithmic time; `benchmarks/search.py` measures its recall against exact
search.

On disk, INDEX/ holds index.faiss, items.jsonl (row, path) and meta.json (the model's
path and fingerprint, dimension, count); each file is written atomically, meta.json last.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polymodal.contrastive.embed import embed_images, embed_texts, image_files, require_dual_encoder
from polymodal.errors import UserError
from polymodal.model import atomic_write

HNSW_NEIGHBOURS = 32  # graph degree M: recall vs memory
SEARCH_DEPTH = 128  # efSearch: candidates examined per query


@dataclass
class Hit:
    rank: int
    score: float  # cosine similarity
    path: str


def model_fingerprint(model_dir: str | Path) -> str:
    """A hash of a saved model's config and weights: the same model gives the same one."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    with open(model_dir / "model.safetensors", "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


class ImageIndex:
    def __init__(self, dim: int, model_path: str, fingerprint: str):
        import faiss

        self.index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efSearch = SEARCH_DEPTH
        self.paths: list[str] = []
        self.dim, self.model_path, self.fingerprint = dim, model_path, fingerprint

    @classmethod
    def build(cls, model, model_path: str | Path, images: str | Path, batch_size: int = 64):
        """(index, skipped [(path, reason)]) of every image file under the folder `images`."""
        require_dual_encoder(model, "an image index")
        index = cls(model.text.dim, str(Path(model_path).resolve()), model_fingerprint(model_path))
        return index, index.add(model, images, batch_size)

    def add(self, model, images: str | Path, batch_size: int = 64) -> list[tuple[str, str]]:
        """Embed and add the image files under `images` not indexed yet; returns the skipped."""
        known = set(self.paths)
        paths = [str(path.resolve()) for path in image_files(images)]
        paths = [path for path in paths if path not in known]
        embeddings, kept, skipped = embed_images(model, paths, batch_size, skip_bad=True, desc="indexing")
        if len(kept):
            self.index.add(np.ascontiguousarray(embeddings.numpy(), dtype=np.float32))
            self.paths += kept
        return skipped

    def search(self, model, text: str | None = None, image: str | Path | None = None,
               k: int = 5) -> list[Hit]:
        """The k nearest images to a text or an image query."""
        if (text is None) == (image is None):
            raise UserError("give one query: a text or an image")
        if text is not None and not text.strip():
            raise UserError("the query text is empty")
        if k < 1:
            raise UserError("k must be at least 1")
        if not self.paths:
            raise UserError("the index holds no images")
        if image is not None:
            query, _, _ = embed_images(model, [image], desc="query")
        else:
            query = embed_texts(model, [text])
        scores, rows = self.index.search(np.ascontiguousarray(query.numpy(), dtype=np.float32),
                                         min(k, len(self.paths)))
        return [Hit(rank, float(score), self.paths[row])
                for rank, (score, row) in enumerate(zip(scores[0], rows[0]), start=1) if row >= 0]

    def check_model(self, model_path: str | Path) -> None:
        """A clear error when `model_path` is not the model this index was built with."""
        if model_fingerprint(model_path) != self.fingerprint:
            raise UserError(f"this index was built with another model ({self.model_path}, fingerprint "
                            f"{self.fingerprint}); {model_path} embeds into a different space")

    def __len__(self) -> int:
        return len(self.paths)

    # ------------------------------------------------------------ files

    def save(self, directory: str | Path) -> None:
        import faiss

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / "index.faiss", lambda path: faiss.write_index(self.index, str(path)))
        lines = "".join(json.dumps({"row": row, "path": path}) + "\n" for row, path in enumerate(self.paths))
        atomic_write(directory / "items.jsonl", lambda path: path.write_text(lines))
        meta = {"format": "polymodal-image-index", "model": self.model_path, "fingerprint": self.fingerprint,
                "dim": self.dim, "count": len(self.paths), "kind": f"HNSW{HNSW_NEIGHBOURS},IP"}
        atomic_write(directory / "meta.json", lambda path: path.write_text(json.dumps(meta, indent=2)))

    @classmethod
    def load(cls, directory: str | Path) -> ImageIndex:
        import faiss

        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise UserError(f"not an image index (no meta.json): {directory}")
        meta = json.loads(meta_path.read_text())
        index = cls(meta["dim"], meta["model"], meta["fingerprint"])
        index.index = faiss.read_index(str(directory / "index.faiss"))
        index.index.hnsw.efSearch = SEARCH_DEPTH
        index.paths = [json.loads(line)["path"] for line in (directory / "items.jsonl").read_text().splitlines()]
        if len(index.paths) != index.index.ntotal or len(index.paths) != meta["count"]:
            raise UserError(f"{directory}: index.faiss, items.jsonl and meta.json disagree on the count")
        return index
