"""A cache of dequantized GGUF models, so that only the first load pays for dequantizing.

transformers dequantizes a GGUF file tensor by tensor on every load, slowly (times in
docs/experiments.md). The first load saves the result as a safetensors model directory
under `$POLYMODAL_CACHE` (default `~/.cache/polymodal`), keyed by the file's path,
size and modification time; later loads read that directory, which is much faster.
Set `POLYMODAL_CACHE=off` to disable it.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_model


def cache_root() -> Path | None:
    setting = os.environ.get("POLYMODAL_CACHE", "")
    if setting.lower() in ("off", "0", "false", "none"):
        return None
    return Path(setting or Path.home() / ".cache" / "polymodal")


def cached_directory(gguf_path: Path) -> Path | None:
    """Where this GGUF file's dequantized copy lives (it may not exist yet)."""
    root = cache_root()
    if root is None:
        return None
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    return root / "gguf" / f"{gguf_path.stem}-{key[:16]}"


def is_complete(directory: Path | None) -> bool:
    return directory is not None and (directory / "model.safetensors").is_file() and (
        directory / "config.json").is_file()


def store(directory: Path, model, tokenizer) -> None:
    """Save atomically: into a temp folder beside the target, then one rename. Failures are ignored."""
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
        try:
            # transformers refuses save_pretrained on a GGUF-loaded model; the weights are plain
            # float tensors by now, so write the config without its GGUF marker and the tensors.
            config = copy.deepcopy(model.config)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.save_pretrained(temp)
            save_model(model, str(temp / "model.safetensors"))  # drops tied duplicates
            tokenizer.save_pretrained(temp)
            os.replace(temp, directory)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    except OSError:
        pass  # a read-only or full disk only costs the next load its speed
