"""polymodal's int8/int4 kernels (issue 20 §1; AVX-512 VNNI or AVX2, whichever this CPU runs):
exact against an emulation of their integer arithmetic, rows independent of the batch, the
layers' two kernels agree, the instruction set chosen, and the fallback where the CPU has
neither."""

import copy

import pytest
import torch

from polymodal.errors import UserError
from polymodal.kernels import quantized_matmul
from polymodal.quantization import (
    Int4Linear,
    Int8Linear,
    kernel_plan,
    project,
    quantize_int4,
    quantize_int8,
)

needs_kernels = pytest.mark.skipif(not quantized_matmul.available(), reason="no AVX-512 VNNI or AVX2 (or no compiler) here")


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output - reference).norm() / reference.norm()).item()


def activations_as_the_kernel_sees_them(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] rounded as the kernel quantizes it: symmetric int8 per block of 32 inputs."""
    blocks = x.view(x.shape[0], -1, 32)
    scales = blocks.abs().amax(-1, keepdim=True) / 127
    codes = torch.where(scales > 0, torch.round(blocks / scales), torch.zeros_like(blocks))
    return (codes * scales).view_as(x)


@needs_kernels
@pytest.mark.parametrize("inputs, outputs", [(576, 192), (128, 37)])
def test_int8_kernel_computes_exactly_the_quantized_activations_against_the_codes(inputs, outputs):
    torch.manual_seed(0)
    weight, x = torch.randn(outputs, inputs), torch.randn(5, inputs)
    codes, scales = quantize_int8(weight)
    output = quantized_matmul.int8_linear(x, codes, scales.float())
    expected = activations_as_the_kernel_sees_them(x) @ (codes.float() * scales.float()[:, None]).t()
    assert relative_error(output, expected) < 1e-5  # only float summation order differs
    assert relative_error(output, x @ weight.t()) < 0.015  # and it is a good product


@needs_kernels
@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_kernel_computes_exactly_codes_times_scales_plus_mins(group_size):
    torch.manual_seed(1)
    weight, x = torch.randn(48, 256), torch.randn(3, 256)
    codes, table = quantize_int4(weight, group_size)
    scales, mins = table.unbind(-1)  # float16 [N, K/group]
    output = quantized_matmul.int4_linear(x, quantized_matmul.int4_layout(codes), scales.contiguous(),
                                          mins.contiguous(), group_size)
    dequantized = codes.float().view(48, -1, group_size) * scales[..., None] + mins.float()[..., None]
    expected = activations_as_the_kernel_sees_them(x) @ dequantized.view(48, 256).t()
    assert relative_error(output, expected) < 1e-5


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
def test_a_nan_in_an_activation_row_makes_its_outputs_nan_as_torch_and_leaves_other_rows(bits):
    torch.manual_seed(2)
    weight, x = torch.randn(40, 128), torch.randn(3, 128)
    if bits == 8:
        codes, scales = quantize_int8(weight)
        run = lambda inputs: quantized_matmul.int8_linear(inputs, codes, scales.float())  # noqa: E731
    else:
        codes, table = quantize_int4(weight, 32)
        scales, mins = (part.contiguous() for part in table.unbind(-1))
        packed = quantized_matmul.int4_layout(codes)
        run = lambda inputs: quantized_matmul.int4_linear(inputs, packed, scales, mins, 32)  # noqa: E731
    clean = run(x)
    x[1, 70] = float("nan")  # in the second block of the second chunk: not the block's max
    output = run(x)
    assert torch.isnan(output[1]).all()  # torch: F.linear gives NaN in every column
    assert torch.equal(output[[0, 2]], clean[[0, 2]])


@needs_kernels
@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_each_row_is_the_same_alone_or_in_a_batch_and_both_kernels_agree(bits):
    torch.manual_seed(2)
    rows = 130 if bits == "int8" else 144  # int8: a last block of 2 rows; torch's int4 wants N % 16 == 0
    weight, x = torch.randn(rows, 192), torch.randn(6, 192)
    layer = Int8Linear.from_float(weight) if bits == "int8" else Int4Linear.from_float(weight, 32)
    assert layer.own_kernel
    batched = layer(x)
    for row in range(6):  # bitwise: the engine's batched decode must equal one by one
        assert torch.equal(layer(x[row:row + 1]), batched[row:row + 1])
    layer.use_kernel(False)
    torch_kernel = layer(x)  # torch's, on bfloat16 activations
    assert not layer.own_kernel and relative_error(batched, torch_kernel) < 0.01


def test_int4_layout_puts_inputs_j_and_j_plus_32_of_each_chunk_in_one_byte():
    codes = torch.randint(0, 16, (3, 128), dtype=torch.uint8)
    packed = quantized_matmul.int4_layout(codes).view(3, 2, 32)
    chunks = codes.view(3, 2, 2, 32)
    assert torch.equal(packed & 0x0F, chunks[:, :, 0]) and torch.equal(packed >> 4, chunks[:, :, 1])


AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2", "fma", "f16c"}


def test_the_widest_instruction_set_the_cpu_has_is_built_and_the_switch_narrows_or_stops_it(monkeypatch):
    monkeypatch.delenv("POLYMODAL_KERNELS", raising=False)
    assert quantized_matmul.instruction_set(AVX512) == "avx512"
    assert quantized_matmul.instruction_set({"avx2", "fma", "f16c"}) == "avx2"  # AMD EPYC, older Intel
    assert quantized_matmul.instruction_set({"avx2", "fma"}) is None  # no float16 widening: none
    monkeypatch.setenv("POLYMODAL_KERNELS", "avx2")
    assert quantized_matmul.instruction_set(AVX512) == "avx2"
    monkeypatch.setenv("POLYMODAL_KERNELS", "off")
    assert quantized_matmul.instruction_set(AVX512) is None


@pytest.mark.skipif("avx2" not in quantized_matmul.instruction_sets(), reason="no AVX2 here")
def test_a_compiler_that_refuses_avx512_gets_the_avx2_build_and_none_is_one_line(monkeypatch, tmp_path, capsys):
    import subprocess

    monkeypatch.delenv("POLYMODAL_KERNELS", raising=False)
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path))  # nothing cached: every set compiles
    monkeypatch.setattr(quantized_matmul, "cpu_flags", lambda: AVX512)
    real_compile, built = quantized_matmul._compile, []

    def old_compiler(target, flags, refused=("-mavx512vnni",)):
        if set(refused) & set(flags):
            raise subprocess.CalledProcessError(1, "cc", stderr=f"cc: error: unrecognized option '{flags[-1]}'")
        built.append(target.name)
        real_compile(target, flags)

    monkeypatch.setattr(quantized_matmul, "_compile", old_compiler)
    quantized_matmul._library.cache_clear()
    try:
        assert quantized_matmul.available() and built[0].startswith("quantized_matmul-avx2-")
        monkeypatch.setattr(quantized_matmul, "_compile", lambda target, flags: old_compiler(target, flags, flags))
        monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "empty"))
        quantized_matmul._library.cache_clear()
        assert not quantized_matmul.available()
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith("polymodal: the int8/int4 kernels could not be built (avx512: ") and "; avx2: " in line
    finally:
        monkeypatch.undo()
        quantized_matmul._library.cache_clear()


def test_without_avx2_or_when_switched_off_the_layers_run_torchs_kernels(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx fma\n")  # a machine before AVX2
    assert quantized_matmul.cpu_flags(cpuinfo) == {"fpu", "sse2", "avx", "fma"}
    old_flags = quantized_matmul.cpu_flags(cpuinfo)
    monkeypatch.setattr(quantized_matmul, "cpu_flags", lambda: old_flags)
    quantized_matmul._library.cache_clear()
    try:
        assert not quantized_matmul.available()
        torch.manual_seed(3)
        weight, x = torch.randn(64, 128), torch.randn(2, 128)
        layer = Int8Linear.from_float(weight)
        assert not layer.own_kernel and relative_error(layer(x), x @ weight.t()) < 0.015
        monkeypatch.undo()
        monkeypatch.setenv("POLYMODAL_KERNELS", "off")
        quantized_matmul._library.cache_clear()
        assert not quantized_matmul.available()
    finally:
        monkeypatch.undo()
        quantized_matmul._library.cache_clear()


@needs_kernels
@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_layers_sharing_an_input_run_in_one_call_with_the_numbers_of_one_by_one(bits):
    torch.manual_seed(4)

    def layer(rows, bias):
        weight, b = torch.randn(rows, 128), torch.randn(rows) if bias else None
        return Int8Linear.from_float(weight, b) if bits == "int8" else Int4Linear.from_float(weight, 32, b)

    layers = (layer(96, True), layer(32, False), layer(32, True))  # q, k, v with Qwen2-style biases
    x = torch.randn(2, 3, 128)
    fused = project(x, layers)
    assert [tuple(out.shape) for out in fused] == [(2, 3, 96), (2, 3, 32), (2, 3, 32)]
    for out, one in zip(fused, layers):
        assert torch.equal(out, one(x))
    plan = kernel_plan(layers)
    project(x, layers)
    assert plan is not None and kernel_plan(layers) is plan  # kept while the operands stand
    copies = copy.deepcopy(layers)  # a copy never reads the original's tensors
    assert kernel_plan(copies) is None
    replacement = layer(32, False)
    layers[1].load_state_dict(replacement.state_dict())  # new weights: a new plan that reads them
    assert torch.equal(project(x, layers)[1], replacement(x))
    assert kernel_plan(layers) is not plan
    assert torch.equal(project(x, copies)[1], fused[1])
    plain = torch.nn.Linear(128, 16)  # not quantized: every layer runs as itself
    mixed = project(x, (layers[0], plain))
    assert torch.equal(mixed[0], layers[0](x)) and torch.equal(mixed[1], plain(x))


@needs_kernels
def test_moved_operands_wrong_inputs_and_gradients_are_caught_not_read_blindly():
    torch.manual_seed(5)
    layer, x = Int8Linear.from_float(torch.randn(64, 128)), torch.randn(2, 128)
    layer(x)
    fresh = Int8Linear.from_float(torch.randn(64, 128))
    layer.weight.data = fresh.weight.clone()  # new memory under the same tensors: the plan is rebuilt
    layer.kernel_scales.data = fresh.kernel_scales.clone()
    assert torch.equal(layer(x), fresh(x))
    with pytest.raises(ValueError, match="float32 \\[M, 128\\]"):
        quantized_matmul.Plan("int8", [layer.kernel_operands()])(torch.randn(2, 64))
    with pytest.raises(UserError, match="without gradients"):
        layer(x.requires_grad_())
    state = layer.state_dict()
    state["weight"][0, 0] = -128  # a code outside what quantize_int8 makes: clamped on load
    layer.load_state_dict(state)
    assert layer.weight.min() >= -127


@needs_kernels
def test_a_plan_refuses_operands_of_another_kind_before_c_reads_them():
    weight = torch.zeros(64, 128, dtype=torch.int8)
    for bits, matrix in (("float32", (weight,)), ("float32", (weight.float(), torch.ones(64))),
                         ("int8", (weight, torch.ones(64, dtype=torch.bfloat16))), ("int2", (weight,))):
        with pytest.raises(ValueError, match="tuples"):
            quantized_matmul.Plan(bits, [matrix])
    weight[3, 5] = -128  # the kernels negate weight bytes: -128 would keep its sign
    with pytest.raises(ValueError, match="-128"):
        quantized_matmul.Plan("int8", [(weight, torch.ones(64))])
