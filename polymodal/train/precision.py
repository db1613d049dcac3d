"""A stage's `precision: auto`: bfloat16 autocast where the device computes it natively,
float32 elsewhere.

On a CPU without bfloat16 instructions (AVX2 only) autocast's bfloat16 matrix products
are emulated and ~30x slower than float32 (benchmarks/RESULTS.md, "Training speed
against transformers' LLaVA"); with AVX-512 BF16 or AMX they are native. So the choice
is detected on the machine that trains, never assumed.
"""

from __future__ import annotations

from pathlib import Path

import torch

# x86 flags (Linux /proc/cpuinfo names) whose instructions multiply bfloat16 natively.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> set[str]:
    """The CPU's feature flags: /proc/cpuinfo's `flags` line where there is one (Linux);
    an empty set elsewhere, so that `auto` keeps float32 where it cannot tell (torch 2.13 has
    no public query for native bfloat16 on a CPU)."""
    try:
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def choose_precision(requested: str, device: torch.device, flags: set[str] | None = None) -> tuple[str, str]:
    """The precision a stage trains in, and why: `requested` ("float32", "bfloat16" or
    "auto") and the device it trains on. `auto` is "bfloat16" on CUDA where
    `torch.cuda.is_bf16_supported()` says so and on a CPU with one of `BF16_CPU_FLAGS`
    (`flags`: the CPU's; detected by `cpu_flags()` when None), "float32" otherwise.
    Returns e.g. ("bfloat16", "auto: CPU has avx512_bf16, amx_bf16")."""
    if requested != "auto":
        return requested, "set in the recipe"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "auto: CUDA device supports bfloat16"
        return "float32", "auto: CUDA device without bfloat16 support"
    if device.type == "cpu":
        native = [flag for flag in BF16_CPU_FLAGS if flag in (cpu_flags() if flags is None else flags)]
        if native:
            return "bfloat16", f"auto: CPU has {', '.join(native)}"
        return "float32", "auto: CPU has no bfloat16 instructions (avx512_bf16, amx_bf16)"
    return "float32", f"auto: no native bfloat16 known for device {device.type!r}"
