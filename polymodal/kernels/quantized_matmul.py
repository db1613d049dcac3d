"""polymodal's own CPU kernels: int8 and int4 matrix products on integer dot instructions
(AVX-512 VNNI, or AVX2's vpmaddubsw), for the quantized LLM's batch-1 decode
(`polymodal.quantization`).

Why our own: torch's `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` widen each weight
to float and read ~6 GB/s at batch 1 on 2 cores, so 4x fewer bytes than float32 bought only
1.5x. These kernels quantize the activations in blocks of 32 (llama.cpp's Q8_0) and take
byte dot products (vpdpbusd) instead; measured against torch's in benchmarks/RESULTS.md.

The C sources (`quantized_matmul.c`, and `decoder_step.c`, a whole decoding step that calls
them: `polymodal.kernels.decoder_step`) are compiled on first use with the system's C compiler
(`$CC`, default `cc`) for this CPU, into `$POLYMODAL_CACHE/kernels/` (default
`~/.cache/polymodal`; with `POLYMODAL_CACHE=off`, a private temporary folder), keyed by the
source's hash; later processes load that file. They are built for the widest instruction set
the CPU has (`instruction_set()`): AVX-512 with VNNI, else AVX2 with FMA and F16C (AMD EPYC and
older Intel machines; the float code is shared through `simd.h`, the byte dot products have a
body each). `POLYMODAL_KERNELS=avx2` builds the AVX2 one on an AVX-512 machine too (to test
it). Where the CPU has neither, no compiler is found, or `POLYMODAL_KERNELS=off`,
`available()` is False and callers use torch's kernels; a failed build says so once on stderr.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from polymodal.gguf_cache import cache_root

# one library: the products, and the decoder step that calls them (decoder_step.c)
SOURCES = (Path(__file__).with_name("quantized_matmul.c"), Path(__file__).with_name("decoder_step.c"))
HEADERS = (Path(__file__).with_name("simd.h"),)  # part of the build's hash
# per instruction set, widest first: the CPU flags its code executes, and the compiler's flags
INSTRUCTION_SETS = {
    "avx512": (("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma"),
               ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma")),
    "avx2": (("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c")),
}
COMPILE_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
_pointer, _size = ctypes.c_void_p, ctypes.c_int64
# what each kind of Plan reads per matrix (the C side trusts it)
OPERAND_DTYPES = {"float32": (torch.float32,), "int8": (torch.int8, torch.float32),
                  "int4": (torch.uint8, torch.float16, torch.float16)}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def instruction_sets(flags: set[str] | None = None) -> list[str]:
    """"avx512", "avx2": the sets the CPU (`flags`, default this one's) runs, widest first, as
    `POLYMODAL_KERNELS` allows ("avx2": no wider; "off": none)."""
    switch = os.environ.get("POLYMODAL_KERNELS", "").lower()
    if switch in ("off", "0", "false", "none"):
        return []
    flags = cpu_flags() if flags is None else flags
    return [name for name, (required, _) in INSTRUCTION_SETS.items()
            if (switch != "avx2" or name == "avx2") and set(required) <= flags]


def instruction_set(flags: set[str] | None = None) -> str | None:
    """The widest of `instruction_sets`, or None where the CPU runs neither."""
    return next(iter(instruction_sets(flags)), None)


def available() -> bool:
    """Whether this process can run the kernels (CPU, compiler, switch; see the module doc)."""
    return _library() is not None


def library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first call), or None where they cannot run here."""
    return _library()


@functools.cache
def _library() -> ctypes.CDLL | None:
    problems = []
    for name in instruction_sets():  # a compiler too old for AVX-512 VNNI may still build AVX2
        library, problem = _build(name)
        if library is not None:
            return _declare(library)
        problems.append(f"{name}: {problem}")
    if problems:
        print(f"polymodal: the int8/int4 kernels could not be built ({'; '.join(problems)}); "
              f"using torch's slower kernels", file=sys.stderr)
    return None


def _build(name: str) -> tuple[ctypes.CDLL | None, str | None]:
    """The library for instruction set `name`, compiled unless cached: (it, None) or (None, why)."""
    flags = (*COMPILE_FLAGS, *INSTRUCTION_SETS[name][1])
    source = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    key = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:16]
    # with the cache off, a private folder: a shared, predictable path could be planted
    root = cache_root() or Path(tempfile.mkdtemp(prefix="polymodal-"))
    target = root / "kernels" / f"quantized_matmul-{name}-{key}.so"
    try:
        if not target.is_file():
            _compile(target, flags)
        return ctypes.CDLL(str(target)), None
    except (OSError, subprocess.SubprocessError) as error:
        detail = (getattr(error, "stderr", None) or "").strip() or str(error) or type(error).__name__
        return None, detail.splitlines()[-1]


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    """The C functions' argument types."""
    library.int8_linear.argtypes = [_pointer, _size, _size, ctypes.c_int, _pointer, _pointer, _pointer,
                                    _pointer, _size, ctypes.c_int]
    library.int4_linear.argtypes = [_pointer, _size, _size, ctypes.c_int, _pointer, _pointer, _pointer,
                                    ctypes.c_int, _pointer, _pointer, _size, ctypes.c_int]
    library.float32_linear.argtypes = [_pointer, _size, _size, ctypes.c_int, _pointer, _pointer, _pointer, _size,
                                       ctypes.c_int]
    library.llama_decode_step.argtypes = [_pointer, ctypes.c_int, _pointer, _pointer, _size, _pointer, _pointer,
                                          _pointer, _pointer, _pointer, _size, _pointer, _pointer, ctypes.c_int]
    return library


def _compile(target: Path, flags: tuple[str, ...]) -> None:
    """Compile SOURCES into `target` atomically (a temp file beside it, then one rename), so that
    two processes building at once never load a half-written library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=".tmp-", suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        subprocess.run([os.environ.get("CC", "cc"), *flags, "-o", temp, *map(str, SOURCES), "-lm"],
                       check=True, capture_output=True, text=True, timeout=120)
        os.replace(temp, target)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


class Plan:
    """One kernel call over up to 8 weight matrices that share their input (a layer's q, k and v:
    one activation quantization, one parallel region), with the matrices' pointers fixed.

    The plan holds the tensors it points into and records their data pointers: `valid()` is
    False once one has moved (`.data =`, `set_`), and the caller builds a new plan
    (`polymodal.quantization` does).

    Call: x [M, K] float32, contiguous -> y [M, sum of N] float32, matrix j's outputs in
    columns sizes[0] + ... + sizes[j-1] onwards.
    """

    MAX_MATRICES = 8  # the C side's limit

    def __init__(self, bits: str, matrices: list[tuple[torch.Tensor, ...]], group_size: int = 0):
        """matrices: int8 (weight int8 [N, K], scales float32 [N]) each, int4 (packed uint8
        [N, K/2] in `int4_layout`, scales float16 [N, K/group], mins float16 [N, K/group]), or
        float32 (weight float32 [N, K]: the float product of decoder_step.c, ~1.15x torch's
        F.linear on SmolLM2's LM head at batch 1).

        Raises ValueError if the kernels are unavailable, K is not a multiple of 64, the
        matrices do not share K, there are more than 8, an operand has another dtype, an int8
        weight holds -128, or int4's group is not 32 or 64."""
        inputs = {matrix[0].shape[1] * (2 if bits == "int4" else 1) for matrix in matrices}  # int4: 2 per byte
        if len(inputs) != 1 or not 1 <= len(matrices) <= self.MAX_MATRICES:
            raise ValueError(f"quantized kernels: 1 to 8 matrices of one K, got {len(matrices)} of K {inputs}")
        if bits == "int4" and group_size not in (32, 64):
            raise ValueError(f"quantized kernels: int4 group size 32 or 64, got {group_size}")
        kinds = OPERAND_DTYPES.get(bits)
        if kinds is None or any(tuple(tensor.dtype for tensor in matrix) != kinds for matrix in matrices):
            raise ValueError(f"quantized kernels: {bits} matrices are {kinds} tuples")
        if bits == "int8" and any(bool((matrix[0] == -128).any()) for matrix in matrices):
            # the kernels negate weight bytes by the activations' signs; -128 has no negation
            raise ValueError("quantized kernels: int8 weight codes must be in [-127, 127], got -128")
        self.bits, self.group_size, self.inputs = bits, group_size, inputs.pop()
        self.library = _checked_library(self.inputs)
        if any(not tensor.is_cpu for matrix in matrices for tensor in matrix):
            raise ValueError("quantized kernels: operands must be on the CPU")
        self.tensors = [tensor.contiguous() for matrix in matrices for tensor in matrix]
        self._pointers = [tensor.data_ptr() for tensor in self.tensors]
        self.sizes = [matrix[0].shape[0] for matrix in matrices]
        self.outputs = sum(self.sizes)
        count = len(matrices)
        self.count = count
        self._sizes = (ctypes.c_int64 * count)(*self.sizes)
        # one array of pointers per operand kind: weights/packed, scales, (mins); passed by address
        kinds = len(matrices[0])
        self._arrays = [(ctypes.c_void_p * count)(*self._pointers[kind::kinds]) for kind in range(kinds)]
        self._addresses = [ctypes.addressof(array) for array in self._arrays]

    def valid(self) -> bool:
        """Whether every operand still lives where the plan points."""
        return all(tensor.data_ptr() == pointer for tensor, pointer in zip(self.tensors, self._pointers))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not (x.dim() == 2 and x.dtype == torch.float32 and x.is_cpu and x.is_contiguous()
                and x.shape[1] == self.inputs):
            raise ValueError(f"quantized kernels: x must be float32 [M, {self.inputs}], contiguous, on the "
                             f"CPU; got {x.dtype} {tuple(x.shape)} on {x.device}")
        rows = x.shape[0]
        out = torch.empty(rows, self.outputs, dtype=torch.float32)
        arrays = self._addresses
        threads = torch.get_num_threads()
        if self.bits == "float32":
            failed = self.library.float32_linear(x.data_ptr(), rows, self.inputs, self.count, *arrays,
                                                 ctypes.addressof(self._sizes), out.data_ptr(), self.outputs, threads)
        elif self.bits == "int8":
            failed = self.library.int8_linear(x.data_ptr(), rows, self.inputs, self.count, *arrays,
                                              ctypes.addressof(self._sizes), out.data_ptr(), self.outputs, threads)
        else:
            failed = self.library.int4_linear(x.data_ptr(), rows, self.inputs, self.count, *arrays, self.group_size,
                                              ctypes.addressof(self._sizes), out.data_ptr(), self.outputs, threads)
        if failed:
            raise MemoryError(f"{self.bits}_linear: out of memory")
        return out


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 @ (weight int8 [N, K] * scales float32 [N, 1])^T -> [M, N] float32,
    the activations quantized to int8 per block of 32 inputs (llama.cpp's Q8_0). A one-off
    call; layers keep a `Plan`.

    Raises ValueError if K is not a multiple of 64 or the kernels are unavailable.
    """
    return Plan("int8", [(weight, scales)])(x.float().contiguous())


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x [M, K] float32 @ w^T -> [M, N] float32 with w = code * scale + min per group of
    `group_size` (32 or 64) inputs: packed uint8 [N, K/2] in `int4_layout`, scales and mins
    float16 [N, K/group]. Activations quantized as in `int8_linear`. A one-off call.

    Raises ValueError if K is not a multiple of 64, the group is not 32 or 64, or the kernels
    are unavailable.
    """
    return Plan("int4", [(packed, scales, mins)], group_size)(x.float().contiguous())


def int4_layout(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] in 0..15 -> the kernel's uint8 [N, K/2]: per chunk of 64 inputs,
    byte j holds input j (low nibble) and input j + 32 (high nibble)."""
    rows, inputs = codes.shape
    chunks = codes.view(rows, inputs // 64, 2, 32)
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(rows, inputs // 2).contiguous()


def supports(inputs: int) -> bool:
    """Whether a layer of `inputs` (K) runs on these kernels here."""
    return inputs % 64 == 0 and available()


def _checked_library(inputs: int) -> ctypes.CDLL:
    library = _library()
    if library is None or inputs % 64:
        raise ValueError(f"quantized kernels: unavailable here or K={inputs} not a multiple of 64")
    return library
