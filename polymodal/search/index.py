"""ImageIndex: FAISS HNSW over L2-normalised image embeddings (inner product = cosine),
with each row's path, and the fingerprint of the model that made them.

Why FAISS: the standard library for vector search, a wheel on PyPI (faiss-cpu), exact
and approximate indexes behind one interface, its own on-disk format. HNSW because it
grows by `add` without retraining (an IVF index needs its clusters trained first) and
answers in logarithmic time; `benchmarks/search.py` measures its recall against exact
search.

On disk, each version of an index is a set of three files that must agree: index.faiss,
items.jsonl (row, path) and meta.json (the model's path and fingerprint, dimension, count).
They are written as a set: INDEX/versions/NNNNNN/ holds one version, written whole into a
temp folder, fsynced and renamed; then the pointer file INDEX/current (the version's name)
is replaced atomically. A crash at any point leaves the pointer on the last good version,
which stays on disk (with the one before it, for readers that read the old pointer). An
index of the older layout (the three files directly in INDEX/) still loads. Writers hold
`index_lock(INDEX)` across load, add and save, so two of them cannot lose each other's rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polymodal.contrastive.embed import embed_images, embed_texts, image_files, require_dual_encoder
from polymodal.errors import UserError
from polymodal.locks import exclusive
from polymodal.safe_files import atomic_write, fsync_file

HNSW_NEIGHBOURS = 32  # graph degree M: recall vs memory
SEARCH_DEPTH = 128  # efSearch: candidates examined per query
POINTER = "current"  # INDEX/current names the version in INDEX/versions/ that is the index
VERSION_NAME = re.compile(r"\d{6,}")  # versions/000001, ...: anything else is not ours to read
KEEP_VERSIONS = 2  # the current one and the one before it (a reader may have just opened it)


@contextlib.contextmanager
def index_lock(directory: str | Path, create: bool = True) -> Iterator[None]:
    """Hold the writer's lock of the index folder `directory` (created if missing and
    `create`) for the block. Raises UserError naming the index and the process holding it,
    if one does, or naming the folder if it is missing and not `create`."""
    directory = Path(directory)
    if not create and not directory.is_dir():
        raise UserError(f"not an image index (no such folder): {directory}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{directory}: cannot create the index folder: {error.strerror}") from None
    with exclusive(directory / ".lock", f"the index {directory}"):
        yield


def _write_file(path: Path, write) -> None:
    """write(path), then fsync it: a version's file is whole on disk before the pointer moves."""
    write(path)
    fsync_file(path)


def _fsync_directory(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _versions(directory: Path) -> list[int]:
    folder = directory / "versions"
    if not folder.is_dir():
        return []
    return sorted(int(entry.name) for entry in folder.iterdir() if VERSION_NAME.fullmatch(entry.name))


def _current_version(directory: Path) -> Path | None:
    """The folder INDEX/current points to, or None for an index of the older layout."""
    pointer = directory / POINTER
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    if not VERSION_NAME.fullmatch(name):  # never a path of the file's choosing
        raise UserError(f"{pointer}: not a version name ({name[:40]!r}); the index is damaged")
    return directory / "versions" / name


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
        """Write this index to the folder `directory` as a new version (see the module
        docstring); the previous version stays readable until this one is whole. Hold
        `index_lock(directory)` across load/add/save where other processes may write."""
        import faiss

        directory = Path(directory)
        versions = directory / "versions"
        versions.mkdir(parents=True, exist_ok=True)
        try:
            current = _current_version(directory)
        except UserError:  # a damaged pointer: this save writes a good one
            current = None
        number = max([*_versions(directory), int(current.name) if current else 0]) + 1
        name = f"{number:06d}"
        temp = versions / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir()
        try:
            _write_file(temp / "index.faiss", lambda path: faiss.write_index(self.index, str(path)))
            lines = "".join(json.dumps({"row": row, "path": path}) + "\n" for row, path in enumerate(self.paths))
            _write_file(temp / "items.jsonl", lambda path: path.write_text(lines))
            meta = {"format": "polymodal-image-index", "model": self.model_path, "fingerprint": self.fingerprint,
                    "dim": self.dim, "count": len(self.paths), "kind": f"HNSW{HNSW_NEIGHBOURS},IP"}
            _write_file(temp / "meta.json", lambda path: path.write_text(json.dumps(meta, indent=2)))
            _fsync_directory(temp)
            os.replace(temp, versions / name)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        _fsync_directory(versions)
        atomic_write(directory / POINTER, lambda path: path.write_text(name + "\n"))
        _fsync_directory(directory)
        self._tidy(directory, number)

    @staticmethod
    def _tidy(directory: Path, current: int) -> None:
        """Remove versions older than the last KEEP_VERSIONS, temp folders of crashed writes
        (only writers holding the lock call this) and the files of the older layout."""
        versions = directory / "versions"
        for entry in versions.iterdir():
            stale = entry.name.startswith(".tmp-") or (
                VERSION_NAME.fullmatch(entry.name) and int(entry.name) <= current - KEEP_VERSIONS)
            if stale and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
        for name in ("meta.json", "items.jsonl", "index.faiss"):  # meta.json first: no half old index
            (directory / name).unlink(missing_ok=True)

    @classmethod
    def load(cls, directory: str | Path) -> ImageIndex:
        """The index in the folder `directory` (its current version, or the older layout).
        Raises UserError, naming the file, for a folder that is not an index or a damaged one."""
        directory = Path(directory)
        if not directory.is_dir():
            raise UserError(f"not an image index (no such folder): {directory}")
        folder = _current_version(directory) or directory
        if not (folder / "meta.json").is_file():
            raise UserError(f"not an image index (no meta.json): {folder}")
        return cls._load_files(folder)

    @classmethod
    def _load_files(cls, folder: Path) -> ImageIndex:
        import faiss

        try:
            meta = json.loads((folder / "meta.json").read_text())
            index = cls(int(meta["dim"]), str(meta["model"]), str(meta["fingerprint"]))
            count = int(meta["count"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
            raise UserError(f"{folder / 'meta.json'}: damaged index metadata ({error})") from None
        if not (folder / "index.faiss").is_file():
            raise UserError(f"{folder / 'index.faiss'}: missing")
        try:
            index.index = faiss.read_index(str(folder / "index.faiss"))
            index.index.hnsw.efSearch = SEARCH_DEPTH
        except (RuntimeError, AttributeError) as error:
            problem = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"{folder / 'index.faiss'}: not a readable HNSW index ({problem})") from None
        try:
            index.paths = [str(json.loads(line)["path"])
                           for line in (folder / "items.jsonl").read_text().splitlines()]
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
            raise UserError(f"{folder / 'items.jsonl'}: damaged item list ({error})") from None
        if len(index.paths) != index.index.ntotal or len(index.paths) != count or index.index.d != index.dim:
            raise UserError(f"{folder}: index.faiss, items.jsonl and meta.json disagree on the count")
        return index
