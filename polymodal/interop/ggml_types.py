"""GGML tensor types for the GGUF files (interop/gguf.py, interop/mmproj.py): what `--dtype`
writes, and tensors into a gguf writer in their type."""

from __future__ import annotations

import numpy as np

# --dtype -> (llama.cpp file type, the type of the matrices)
FILE_TYPES = {"float32": ("ALL_F32", "F32"), "float16": ("MOSTLY_F16", "F16"),
              "bfloat16": ("MOSTLY_BF16", "BF16")}


def add_tensors(writer, tensors: dict[str, tuple]) -> None:
    """Each (array, type name) into the writer: F32 and F16 as numpy arrays, BF16 through gguf's
    quantizer (numpy has no bfloat16)."""
    import gguf

    for name, (array, kind) in tensors.items():
        if kind == "F32":
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        elif kind == "F16":
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float16))
        else:
            quant = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(name, gguf.quants.quantize(array, quant), raw_dtype=quant)
