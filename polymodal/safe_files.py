"""Files written whole or not at all, and checks on a saved model's files before anything
is allocated or loaded from them.

Every write that matters goes through `atomic_write`: a temp file in the same folder,
fsync, then `os.replace`, so a crash or a full disk leaves the last complete file.

A damaged model directory (a truncated or zero-byte model.safetensors, a pickle or
`torch.save` file under that name, a tensor of the wrong shape or dtype, a config.json
whose sizes would allocate tens of GB) must end in one line naming the file, never in a
traceback or an out-of-memory kill. The order is: the safetensors header alone (its 8-byte
length within the file, JSON, every tensor's dtype, shape and offsets within the file);
layer counts of config.json against the number of tensors the file holds; the model built
on the meta device (shapes only, no memory) against the header and the memory available;
only then the real model and the weights. Nothing here unpickles or runs code from a file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from polymodal.errors import UserError

# dtype name in a safetensors header -> (torch dtype, bytes per element)
DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit on its JSON header
# config.json fields that count repeated blocks: each block has at least one saved tensor.
LAYER_FIELDS = {"num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers",
                "decoder_layers", "depth"}


def fsync_file(path: Path) -> None:
    """Flush a written file to the disk, so that a rename after it never exposes a hole."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(temp)` to a temp file in the same folder, fsync, then rename it over `path`;
    the temp file is removed if anything fails (the error propagates, e.g. OSError ENOSPC)."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temp)
        fsync_file(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


@dataclass(frozen=True)
class TensorEntry:
    dtype: str  # safetensors name: F32, BF16, ...
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data section
    end: int


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors a safetensors file declares, each checked against the file: the 8-byte
    header length within the file, the header valid JSON, each dtype known, each shape of
    non-negative ints whose byte size equals its offsets' span, each span within the file.
    Raises UserError naming `path` and the first problem found."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if length < 2 or length > min(size - 8, MAX_HEADER_BYTES):
                raise UserError(f"{path}: not a safetensors file (empty, truncated, or another format "
                                f"such as a pickle or torch.save file: header length {length}, file "
                                f"{size} bytes)")
            raw = handle.read(length)
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (its header is not a JSON object)")
    data_size = size - 8 - length
    return {name: _entry(path, name, info, data_size) for name, info in header.items()
            if name != "__metadata__"}


def _entry(path: Path, name: str, info, data_size: int) -> TensorEntry:
    """One header entry, checked; UserError naming the file and the tensor otherwise."""
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        ints = [*shape, begin, end]
        if dtype not in DTYPES or not all(isinstance(n, int) and n >= 0 for n in ints):
            raise ValueError
    except (TypeError, ValueError, KeyError):
        raise UserError(f"{path}: damaged header entry for tensor {name!r}") from None
    if end > data_size or begin > end:
        raise UserError(f"{path}: tensor {name!r} lies past the end of the file (bytes {begin}-{end} "
                        f"of {data_size}): the file is truncated or damaged")
    if math.prod(shape) * DTYPES[dtype][1] != end - begin:
        raise UserError(f"{path}: tensor {name!r} of shape {shape} ({dtype}) does not fit its "
                        f"{end - begin} bytes")
    return TensorEntry(dtype, tuple(shape), begin, end)


def available_memory() -> int:
    """Bytes of memory this process could still allocate (MemAvailable, else physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _fields(record, prefix: str = ""):
    """(dotted path, value) of every field of a JSON record, depth first."""
    items = record.items() if isinstance(record, dict) else enumerate(record) if isinstance(record, list) else ()
    for key, value in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        yield path, value
        yield from _fields(value, path)


def _fields_equal_to(record: dict, value: int) -> list[str]:
    return [path for path, field in _fields(record) if type(field) is int and field == value][:3]


def check_layer_counts(record: dict, config_path: Path, tensors: int) -> None:
    """Refuse a layer count that the weights file cannot hold (one tensor per layer at
    least), before building: building 10^7 layers would exhaust memory on its own."""
    for path, value in _fields(record):
        leaf = path.rsplit(".", 1)[-1]
        if leaf in LAYER_FIELDS and type(value) is int and value > tensors:
            raise UserError(f"{config_path}: {path} is {value}, but model.safetensors holds only "
                            f"{tensors} tensors; the config is damaged")


def _gb(size: int) -> str:
    return f"{size / 1e9:.1f} GB"


def check_skeleton(skeleton: nn.Module, header: dict[str, TensorEntry], record: dict,
                   config_path: Path, weights_path: Path) -> None:
    """The model as config.json builds it (on the meta device) against the memory available
    and against the weights file: every tensor in both of one shape and dtype."""
    state = skeleton.state_dict()
    total = sum(t.numel() * t.element_size() for t in state.values())
    if total > available_memory():
        name, largest = max(state.items(), key=lambda item: item[1].numel() * item[1].element_size())
        # The culprit sizes are those no tensor in the file has (the file holds the real model).
        saved_sizes = {size for entry in header.values() for size in entry.shape}
        fields = [f for size in largest.shape if size not in saved_sizes
                  for f in _fields_equal_to(record, size)]
        named = f" (see {', '.join(fields)})" if fields else ""
        raise UserError(f"{config_path}: describes a model of {_gb(total)}, more than the "
                        f"{_gb(available_memory())} of memory available; its largest tensor {name} "
                        f"is {list(largest.shape)}{named}")
    for name, entry in header.items():
        tensor = state.get(name)
        if tensor is None:
            continue  # counted as unexpected when the weights load
        if tuple(tensor.shape) != entry.shape:
            fields = [f for size in tensor.shape if size not in entry.shape
                      for f in _fields_equal_to(record, size)]
            named = f" (see {', '.join(fields)} in config.json)" if fields else ""
            raise UserError(f"{weights_path}: tensor {name} has shape {list(entry.shape)} but "
                            f"config.json makes it {list(tensor.shape)}{named}")
        if tensor.dtype != DTYPES[entry.dtype][0]:
            raise UserError(f"{weights_path}: tensor {name} is {entry.dtype} but the model "
                            f"holds {str(tensor.dtype).removeprefix('torch.')}")


def build_checked(build: Callable[[], nn.Module], directory: Path, record: dict) -> nn.Module:
    """`build()` (an untrained model from config.json's `record`) after the checks above.

    Raises UserError naming config.json or model.safetensors when either is damaged or
    they disagree; a `build` that fails on a damaged config gives one line too.
    """
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    header = read_safetensors_header(weights_path)
    check_layer_counts(record, config_path, len(header))
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            skeleton = build()
    except UserError:
        raise
    except Exception:  # a part that cannot be built on meta: the real build below says why
        skeleton = None
    if skeleton is not None:
        check_skeleton(skeleton, header, record, config_path, weights_path)
        del skeleton
    try:
        return build()
    except UserError:
        raise
    except Exception as error:  # a damaged config: one line, not the trace of a part's init
        raise UserError(f"{config_path}: cannot build the model it describes "
                        f"({type(error).__name__}: {_first_line(error)})") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else "no message"
