"""Weight-only quantization (issue 20 §1): int8/int4 layers against float, a quantized model
through every decode path, save and load, the commands, and the training refusal."""

import pytest
import torch

from conftest import tiny_model
from polymodal.cli.main import main
from polymodal.config import ModelConfig, QuantizationConfig, from_dict
from polymodal.engine.generate import Engine
from polymodal.engine.sampling import SamplingParams
from polymodal.errors import ConfigError
from polymodal.model import MultimodalLM
from polymodal.quantization import (
    Int4Linear,
    Int8Linear,
    pack_nibbles,
    quantize_model,
    unpack_nibbles,
)

INT8, INT4 = QuantizationConfig(bits="int8"), QuantizationConfig(bits="int4", group_size=32)


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("bits, bound", [("int8", 0.015), ("int4", 0.12)])
def test_quantized_layers_are_close_to_float_and_compute_their_own_dequantized_weight(bits, bound):
    # Gaussian weights: int8's step is max|w|/127 (~3.5 sd/127 at K=192), an error of ~0.8% of
    # the output's norm; int4's is (max - min)/15 per 32 inputs (~4 sd/15), ~8%. Bounds ~1.5x those.
    torch.manual_seed(0)
    weight, bias, x = torch.randn(96, 192), torch.randn(96), torch.randn(2, 5, 192)
    layer = Int8Linear.from_float(weight, bias) if bits == "int8" else Int4Linear.from_float(weight, 32, bias)
    output = layer(x)
    assert output.shape == (2, 5, 96)
    assert relative_error(output, torch.nn.functional.linear(x, weight, bias)) < bound
    # the kernel computes with the weights the codes and scales say, on bfloat16 activations
    # (rounded by 2**-9 at most) with a bfloat16 output: ~0.3% of the norm, not the codes' error
    exact = torch.nn.functional.linear(x.bfloat16().float(), layer.dequantized(), bias)
    assert relative_error(output, exact) < 0.005


def test_int4_codes_are_stored_portably_and_reload_into_the_kernel_layout():
    codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)
    torch.manual_seed(1)
    layer = Int4Linear.from_float(torch.randn(32, 64), 32)
    assert "packed" not in layer.state_dict()  # the kernel's layout depends on the CPU: never saved
    fresh = Int4Linear(64, 32, 32)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), layer(x))


def q4_1_weights(rows: int, inputs: int) -> torch.Tensor:
    """Weights as a Q4_1 GGUF dequantizes to (llama.cpp's ggml-quants.c, quantize_row_q4_1_ref):
    per 32 inputs d = (max - min) / 15 and m = min kept in float16, codes 0..15 from the
    unrounded d; w = q d + m."""
    torch.manual_seed(2)
    groups = torch.randn(rows, inputs // 32, 32)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    codes = torch.floor((groups - low) / ((high - low) / 15) + 0.5).clamp(max=15)
    return (codes * ((high - low) / 15).half().float() + low.half().float()).view(rows, inputs)


def test_int4_of_a_q4_1_models_weights_is_those_weights_exactly():
    weight = q4_1_weights(48, 256)
    layer = Int4Linear.from_float(weight, 32)
    assert torch.equal(layer.dequantized(), weight)  # the file's own codes, scales and mins: lossless
    assert layer.scales_and_mins.dtype == torch.float16
    x = torch.randn(2, 256)  # and the layer computes with them (bfloat16 activations or int8 blocks)
    assert relative_error(layer(x), x @ weight.t()) < 0.01


def test_an_int4_layer_saved_with_bfloat16_scales_and_zeros_loads():
    layer = Int4Linear.from_float(torch.randn(32, 64), 32)
    scales, mins = layer.scales_and_mins.float().unbind(-1)  # [N, K/g]
    old = {"codes": layer.codes, "scales_and_zeros": torch.stack([scales, mins + 8 * scales], -1)
           .permute(1, 0, 2).bfloat16()}  # the format before float16: (s, z) [K/g, N, 2], w = (q - 8) s + z
    fresh = Int4Linear(64, 32, 32)
    fresh.load_state_dict(old)
    scales, zeros = old["scales_and_zeros"].float().permute(1, 0, 2).unbind(-1)
    assert torch.equal(fresh.scales_and_mins, torch.stack([scales, zeros - 8 * scales], -1).half())
    assert relative_error(fresh.dequantized(), layer.dequantized()) < 0.01


def quantized_tiny(settings, **llm):
    model = tiny_model(llm={"source": "tiny:llama", **llm})
    torch.manual_seed(0)
    with torch.no_grad():  # larger random weights: answers that differ by step
        for parameter in model.llm.model.parameters():
            parameter.normal_(0, 0.3)
    return quantize_model(model, settings)


@pytest.mark.parametrize("settings", [INT8, INT4], ids=["int8", "int4"])
def test_the_engine_answers_a_quantized_model_as_its_transformers_forward_does(settings):
    model = quantized_tiny(settings)
    layers = model.llm.model.model.layers[0]
    kind = Int8Linear if settings.bits == "int8" else Int4Linear
    assert isinstance(layers.self_attn.q_proj, kind) and isinstance(layers.mlp.down_proj, kind)
    assert isinstance(model.llm.lm_head, Int8Linear)  # int8 in both modes, untied from the float embeddings
    prompt = {"messages": [{"role": "user", "content": "Say something long."}]}
    engine = Engine(model)
    answer = engine.generate([prompt], SamplingParams(max_new_tokens=8, ignore_eos=True))[0].token_ids
    ids = torch.tensor([engine.encode(prompt)["input_ids"]])
    with torch.no_grad():  # greedy through transformers' own forward, recomputed every step
        for _ in range(8):
            next_id = engine.allowed_logits(model.llm.model(input_ids=ids).logits[:, -1])[0].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    assert answer == ids[0, -8:].tolist()
    assert len(set(answer)) > 1  # a real comparison, not one token repeated


@pytest.mark.parametrize("settings", [INT8, INT4], ids=["int8", "int4"])
def test_lora_is_merged_for_int8_kept_in_float_for_int4_and_saving_and_loading_gives_identical_logits(
        settings, tmp_path):
    lora = {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    model = tiny_model(llm={"source": "tiny:llama", "lora": lora})
    for name, parameter in model.llm.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: give the adapters something to add
            parameter.data.normal_(0, 0.5)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        float_logits = model.llm.model(input_ids=ids).logits
        quantize_model(model, settings)
        logits = model.llm.model(input_ids=ids).logits
    merged = settings.bits == "int8"  # int4's steps are coarser than a LoRA update: kept beside it
    assert model.config.quantization.merge_lora is merged and (model.config.llm.lora is None) is merged
    q_proj = model.llm.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj if merged else q_proj.base_layer, Int8Linear if merged else Int4Linear)
    prompt = {"messages": [{"role": "user", "content": "hi"}]}
    assert len(Engine(model).generate([prompt], SamplingParams(max_new_tokens=3, ignore_eos=True))[0].token_ids) == 3
    assert relative_error(logits, float_logits) < (0.02 if settings.bits == "int8" else 0.15)  # LoRA kept
    model.save_pretrained(tmp_path / "model")
    again = MultimodalLM.from_pretrained(tmp_path / "model")
    assert again.config.quantization == model.config.quantization and again.config.llm.lora == model.config.llm.lora
    with torch.no_grad():
        assert torch.equal(again.llm.model(input_ids=ids).logits, logits)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_quantize_command_writes_a_model_and_the_flag_quantizes_on_load(capsys, tmp_path):
    code, _, err = run(capsys, "quantize", "tiny:llama", str(tmp_path / "int4"), "--bits", "int4")
    assert code == 0 and f"wrote the int4 model to {tmp_path / 'int4'}" in err
    files = {path.suffix for path in (tmp_path / "int4").iterdir()}
    assert ".safetensors" in files and not files & {".bin", ".pt", ".pth", ".pkl"}  # no pickle
    code, out, _ = run(capsys, "chat", str(tmp_path / "int4"), "--max-new-tokens", "3", "hi")
    assert code == 0 and out.endswith("\n")
    code, out, err = run(capsys, "chat", "tiny:llama", "--quantize", "int8", "--max-new-tokens", "3", "hi")
    assert code == 0 and "quantized to int8 in" in err
    code, _, err = run(capsys, "export", str(tmp_path / "int4"), str(tmp_path / "gguf"), "--format", "gguf")
    assert code == 2 and "model.quantization: int4 weights have no stock format" in err.splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["quantize", "tiny:llama", "OUT", "--bits", "int3"], "--bits: 'int3' is not one of int8, int4"),
    (["quantize", "tiny:llama", "OUT", "--bits", "int4", "--group-size", "48"], "--group-size: a power of two"),
    (["chat", "tiny:llama", "--quantize", "fp8", "hi"], "--quantize: 'fp8' is not one of int8, int4"),
    (["eval", "tiny:llama", "--task", "easy-vqa", "--limit", "2", "--quantize", "8"], "--quantize: '8' is not one of"),
    (["serve", "tiny:llama", "--quantize", "int2"], "--quantize: 'int2' is not one of"),
])
def test_bad_bits_are_one_line_and_exit_2(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.splitlines()[-1].startswith("polymodal: error: ") and message in err.splitlines()[-1]
    assert "Traceback" not in err


def test_training_a_quantized_model_is_refused_in_one_line(capsys, tmp_path):
    run(capsys, "quantize", "tiny:llama", str(tmp_path / "int8"))
    recipe = tmp_path / "tune.yaml"
    recipe.write_text(f"init_from: {tmp_path / 'int8'}\nstages:\n  - name: tune\n    train: [llm]\n"
                      f"    lr: {{llm: 1.0e-4}}\n    data: [{{format: easy-vqa, split: train}}]\n")
    code, _, err = run(capsys, "train", str(recipe), "--out", str(tmp_path / "run"))
    assert code == 2
    assert "stages[0].train: llm cannot train on a quantized model (model.quantization: int8)" in err.splitlines()[-1]
    with pytest.raises(ConfigError, match="a model quantized with merge_lora has no LoRA adapters"):
        from_dict(ModelConfig, {"llm": {"source": "tiny:llama", "lora": {"r": 2}}, "quantization": {"bits": "int8", "merge_lora": True}})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_int4_layer_cast_to_another_dtype_keeps_its_float16_grid_and_runs(dtype):
    layer = Int4Linear.from_float(q4_1_weights(32, 64), 32)
    x = torch.randn(2, 64)
    before = layer(x)
    layer.to(dtype)  # casts every float buffer; the grid must stay what the codes were rounded against
    assert layer.scales_and_mins.dtype == torch.float16
    torch.testing.assert_close(layer(x), before)


def test_an_int4_state_with_both_the_old_and_the_new_grid_reports_the_old_as_unexpected():
    layer = Int4Linear.from_float(torch.randn(32, 64), 32)
    state = {**layer.state_dict(), "scales_and_zeros": torch.zeros(2, 32, 2, dtype=torch.bfloat16)}
    with pytest.raises(RuntimeError, match="scales_and_zeros"):
        Int4Linear(64, 32, 32).load_state_dict(state)
