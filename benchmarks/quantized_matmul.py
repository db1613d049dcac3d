"""The matrix products alone: polymodal's int8/int4 kernels against torch's and float32, at
the shapes of one SmolLM2-135M decode step (issue 20 §1: "write your own only where it wins,
and say by how much").

For each side: the 210 layer products of one step (30 layers of q 576x576, k and v 192x576,
o 576x576, gate and up 1536x576, down 576x1536; random weights), M activation rows, median
of `--repeats` passes; weight bytes read per pass / time = GB/s. Sides run interleaved.
"int8 plan only" calls polymodal's kernel straight (a `quantized_matmul.Plan` per layer, x
already float32), without the layer's Python around it: the kernel's own speed.

    python benchmarks/quantized_matmul.py [--rows 1 8 64] [--repeats 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from polymodal.kernels import quantized_matmul
from polymodal.quantization import Int4Linear, Int8Linear

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30


def sides(weights: list[torch.Tensor]) -> dict:
    """name -> (layers, bytes of weights one pass reads)."""
    count = sum(w.numel() for w in weights)

    def quantized(kernel: str) -> dict:
        int8 = [Int8Linear.from_float(w) for w in weights]
        int4 = [Int4Linear.from_float(w, 32) for w in weights]
        for layer in int8 + int4:
            layer.use_kernel(kernel == "polymodal")
        return {f"int8 {kernel}": (int8, count), f"int4 {kernel}": (int4, count * 5 // 8)}

    result = {"float32": (weights, 4 * count)}
    if quantized_matmul.available():
        result |= quantized("polymodal")
        int8 = result["int8 polymodal"][0]
        result["int8 plan only"] = ([quantized_matmul.Plan("int8", [layer.kernel_operands()]) for layer in int8], count)
    return result | quantized("torch")


def one_pass(layers, inputs) -> float:
    start = time.perf_counter()
    for layer, x in zip(layers, inputs):
        if isinstance(layer, torch.Tensor):
            F.linear(x, layer)
        else:
            layer(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = [torch.randn(n, k) * 0.02 for n, k in SHAPES]
    by_side = sides(weights)
    print(f"{args.threads} threads, median of {args.repeats}; polymodal's kernels "
          f"{'available' if quantized_matmul.available() else 'NOT available here'}")
    print(f"{'side':<16} {'rows':>4} {'ms/pass':>8} {'GB/s':>6} {'vs torch':>8}")
    with torch.inference_mode():
        for rows in args.rows:
            inputs = [torch.randn(rows, k) for _, k in SHAPES]
            times = {name: [] for name in by_side}
            for layers, _ in by_side.values():
                one_pass(layers, inputs)  # warm up
            for _ in range(args.repeats):
                for name, (layers, _) in by_side.items():
                    times[name].append(one_pass(layers, inputs))
            medians = {name: statistics.median(values) for name, values in times.items()}
            for name, (_, size) in by_side.items():
                peer = name.replace("polymodal", "torch").replace("plan only", "torch")
                ratio = f"{medians[peer] / medians[name]:.2f}x" if peer != name else ""
                print(f"{name:<16} {rows:>4} {medians[name] * 1e3:>8.2f} {size / medians[name] / 1e9:>6.1f} {ratio:>8}")


if __name__ == "__main__":
    main()
