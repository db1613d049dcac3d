"""Series encoders (patchtst, cnn1d) and connectors on NaN-padded ragged series: shapes,
RevIN's exact inverse, no NaN out or back, sizes from the data, a tiny model that learns."""

import math

import numpy as np
import pytest
import torch

from polymodal.config import ModelConfig, from_dict
from polymodal.connectors import build_connector
from polymodal.encoders import build_encoder
from polymodal.encoders.patchtst import PatchTSTEncoder, fit_patch_length, patch_count
from polymodal.encoders.series_base import RevIN
from polymodal.errors import ConfigError, UserError
from polymodal.objectives.losses import next_token_loss
from polymodal.processing import collate
from polymodal.processing.series import pad_series

CHANNELS, LENGTH = 3, 50
ENCODERS = {  # each with its tokens for 3 channels x 50 steps
    "patchtst": ({"kind": "patchtst", "width": 32, "heads": 2}, 3 * 6),  # 6 patches of 16 every 8
    "patchtst-mixed": ({"kind": "patchtst", "width": 32, "heads": 2, "depth": 2, "channel_mode": "mixed",
                        "affine": True}, 6),
    "patchtst-no-layers": ({"kind": "patchtst", "width": 32, "depth": 0, "scale_embedding": False}, 18),
    "cnn1d": ({"kind": "cnn1d", "widths": [8, 16, 24]}, 7),  # 50 -> 25 -> 13 -> 7
    "cnn1d-pooled": ({"kind": "cnn1d", "widths": [8, 16], "pool": 4, "scale_embedding": False}, 4),
}
# Connectors that take any token count, with the tokens they give for S encoder tokens.
CONNECTORS = {
    "linear": ({"kind": "linear"}, lambda tokens: tokens),
    "mlp": ({"kind": "mlp"}, lambda tokens: tokens),
    "stack": ({"kind": "stack", "factor": 4}, lambda tokens: math.ceil(tokens / 4)),
    "perceiver": ({"kind": "perceiver", "num_latents": 5, "depth": 1, "heads": 2, "width": 16}, lambda tokens: 5),
    "reprogramming": ({"kind": "reprogramming", "prototypes": 12, "vocabulary": 300, "heads": 2, "head_dim": 8},
                      lambda tokens: tokens),
}
LLM_WIDTH = 64


def encoder_config(options: dict, channels: int = CHANNELS, length: int = LENGTH):
    from polymodal.config import EncoderConfig

    return from_dict(EncoderConfig, {"channels": channels, "length": length, **options})


def ragged_batch(channels: int = CHANNELS, length: int = LENGTH) -> torch.Tensor:
    """Four series of other channel counts and lengths, padded: [4, channels, length], NaN-padded;
    the third is 3 steps long (one patch), the last has one channel."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(channels, length), (2, 33), (channels, 3), (1, length - 1)]
    return torch.stack([pad_series(torch.randn(c, t, generator=generator) * 40 + 300, channels, length)
                        for c, t in shapes])


def series_model(encoder: dict, connector: dict, llm: dict | None = None):
    from polymodal.model import MultimodalLM

    torch.manual_seed(0)
    return MultimodalLM(from_dict(ModelConfig, {
        "encoders": {"series": encoder}, "connectors": {"series": connector},
        "llm": {"source": "tiny:llama", **(llm or {})}}))


@pytest.mark.parametrize("connector", CONNECTORS)
@pytest.mark.parametrize("encoder", ENCODERS)
def test_shapes_finite_outputs_and_gradients(encoder, connector):
    """Ragged series padded with NaN go through encoder and connector, in training and
    inference modes, with finite tokens and finite gradients on every parameter."""
    options, tokens = ENCODERS[encoder]
    torch.manual_seed(0)
    series_encoder = build_encoder(encoder_config(options), None, "encoders.series")
    assert (series_encoder.num_tokens, series_encoder.modality) == (tokens, "series")
    config, tokens_out = CONNECTORS[connector]
    from polymodal.config import ConnectorConfig

    bridge = build_connector(from_dict(ConnectorConfig, config), series_encoder.out_dim, LLM_WIDTH, tokens,
                             "model.connectors.series")
    if hasattr(bridge, "bind_word_embeddings"):
        bridge.bind_word_embeddings(torch.nn.Parameter(torch.randn(300, LLM_WIDTH)), 280)
    assert bridge.num_tokens == tokens_out(tokens)
    series = ragged_batch()
    for training in (True, False):
        series_encoder.train(training), bridge.train(training)
        features = series_encoder(series)
        assert features.shape == (4, tokens, series_encoder.out_dim)
        output = bridge(features)
        assert output.shape == (4, tokens_out(tokens), LLM_WIDTH)
        assert torch.isfinite(output).all()
    output.square().mean().backward()
    for name, parameter in [*series_encoder.named_parameters(), *bridge.named_parameters()]:
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_patch_counts_and_basicmotions_defaults():
    assert [patch_count(length, 16, 8) for length in (1, 16, 17, 24, 25, 100)] == [1, 1, 2, 2, 3, 12]
    encoder = build_encoder(encoder_config({"kind": "patchtst"}, channels=6, length=100), None)
    assert (encoder.num_tokens, encoder.out_dim, encoder.padded_length) == (6 * 12, 64, 104)
    mixed = build_encoder(encoder_config({"kind": "patchtst", "channel_mode": "mixed"}, 6, 100), None)
    assert mixed.num_tokens == 12
    assert build_encoder(encoder_config({"kind": "cnn1d"}, 6, 100), None).num_tokens == 13


@pytest.mark.parametrize("affine", [False, True])
def test_revin_inverts_exactly_and_ignores_padding(affine):
    """denormalize(normalize(x)) == x at every observed step; the statistics are those of
    the observed values alone, and the padding normalises to 0."""
    revin = RevIN(CHANNELS, affine=affine)
    if affine:  # a learned map that is not the identity
        with torch.no_grad():
            revin.weight.copy_(torch.tensor([[0.5], [2.0], [-1.5]]))
            revin.bias.copy_(torch.tensor([[0.1], [-3.0], [7.0]]))
    series = ragged_batch()
    observed = ~torch.isnan(series)
    statistics = revin.statistics(series)
    normalized = revin.normalize(series, statistics)
    assert (normalized[~observed] == 0).all()
    restored = revin.denormalize(normalized, statistics)
    torch.testing.assert_close(restored[observed], series[observed], rtol=1e-6, atol=1e-4)  # values ~300
    second = series[1, :2][~torch.isnan(series[1, :2])].view(2, 33)  # the 2 x 33 series unpadded
    torch.testing.assert_close(statistics.mean[1, :2, 0], second.mean(-1))
    torch.testing.assert_close(statistics.std[1, :2, 0], (second.var(-1, unbiased=False) + revin.eps).sqrt())
    double = RevIN(CHANNELS).double()  # in float64 the round trip is exact to 1e-12
    values = series.double()
    restored = double.denormalize(double.normalize(values), double.statistics(values))
    assert (restored[observed] - values[observed]).abs().max() < 1e-10


def test_encoder_forecast_round_trip():
    """A forecast in normalised space maps back with the input's statistics (what the
    forecast head relies on): the future normalised by its context's statistics returns."""
    encoder = build_encoder(encoder_config({"kind": "patchtst", "affine": True}), None)
    context, future = ragged_batch(), torch.randn(4, CHANNELS, 7) * 5 + 100
    statistics = encoder.statistics(context)
    back = encoder.denormalize(encoder.normalize(future, statistics), statistics)
    torch.testing.assert_close(back, future, rtol=1e-6, atol=1e-4)


def test_a_nan_value_never_reaches_the_outputs_or_a_gradient():
    """A batch where one series is a single step and one channel is wholly padding."""
    encoder = build_encoder(encoder_config({"kind": "patchtst", "width": 16, "heads": 2, "depth": 1}), None)
    series = torch.stack([pad_series(torch.tensor([[5.0]]), CHANNELS, LENGTH),
                          pad_series(torch.ones(2, LENGTH), CHANNELS, LENGTH)])  # constant: std 0
    tokens = encoder(series)
    assert torch.isfinite(tokens).all()
    tokens.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters() if p.grad is not None)
    # the padded channel's tokens and the patches with no observed step are zero tokens
    per_channel = tokens.view(2, CHANNELS, encoder.patches, -1)
    assert (per_channel[:, 2] == 0).all() and (per_channel[0, 0, :-1] == 0).all()
    assert (per_channel[0, 0, -1] != 0).any()


def test_sizes_zero_mean_from_the_data(tmp_path):
    """0 refuses to build (train first); fit_to_data takes the largest sizes from files or
    tensors and keeps a size the recipe set."""
    from polymodal.encoders.patchtst import PatchTSTConfig

    with pytest.raises(ConfigError, match=r"encoders\.series\.channels and \.length.*train the recipe first"):
        build_encoder(PatchTSTConfig(), None, "encoders.series")
    np.save(tmp_path / "long.npy", np.zeros((120, 2), dtype=np.float32))  # [T, C]
    (tmp_path / "wide.csv").write_text("a,b,c,d\n" + "1,2,3,4\n" * 30)
    config = PatchTSTEncoder.fit_to_data(PatchTSTConfig(), [tmp_path / "long.npy", str(tmp_path / "wide.csv"),
                                                            torch.zeros(1, 7)])
    assert (config.channels, config.length) == (4, 120)
    kept = PatchTSTEncoder.fit_to_data(PatchTSTConfig(length=200), [tmp_path / "long.npy"])
    assert (kept.channels, kept.length) == (2, 200)


def test_patch_length_zero_is_fitted_to_the_length():
    """patch_len 0: the longest of 16, 8, 4, 2 giving at least 8 patches, stride half of it
    (BasicMotions' 100 steps keep 16 / 8; JapaneseVowels' 26 get 4 / 2); a stride the
    recipe set is kept; left at 0 the model refuses to build."""
    from polymodal.encoders.patchtst import PatchTSTConfig

    assert [fit_patch_length(length) for length in (3, 26, 40, 100, 361)] == [(2, 1), (4, 2), (8, 4), (16, 8),
                                                                              (16, 8)]
    assert all(patch_count(length, *fit_patch_length(length)) >= 8 for length in range(16, 400))
    fitted = PatchTSTEncoder.fit_to_data(PatchTSTConfig(patch_len=0, stride=0), [torch.zeros(12, 26)])
    assert (fitted.channels, fitted.length, fitted.patch_len, fitted.stride) == (12, 26, 4, 2)
    assert PatchTSTEncoder.sizes_from_data(PatchTSTConfig(channels=6, length=100, patch_len=0))
    assert not PatchTSTEncoder.sizes_from_data(PatchTSTConfig(channels=6, length=100))
    kept = PatchTSTEncoder.fit_to_data(PatchTSTConfig(length=100, patch_len=0, stride=16), [torch.zeros(6, 100)])
    assert (kept.patch_len, kept.stride) == (16, 16)
    mixed = {"kind": "patchtst", "channel_mode": "mixed", "patch_len": 4, "stride": 2}
    assert build_encoder(encoder_config(mixed, 12, 26), None).num_tokens == 12
    with pytest.raises(ConfigError, match=r"encoders\.series\.patch_len and \.stride: 0 and 0.*train the recipe"):
        build_encoder(PatchTSTConfig(channels=6, length=100, patch_len=0, stride=0), None, "encoders.series")


def test_load_media_pads_a_short_file_and_keeps_the_last_steps_of_a_long_one(tmp_path):
    encoder = build_encoder(encoder_config({"kind": "cnn1d"}, channels=3, length=10), None)
    np.save(tmp_path / "short.npy", np.arange(8, dtype=np.float32).reshape(4, 2))  # 4 steps, 2 channels
    loaded = encoder.load_media(tmp_path / "short.npy")
    assert loaded.shape == (3, 10) and torch.isnan(loaded[:, :6]).all() and torch.isnan(loaded[2]).all()
    assert loaded[:2, 6:].tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    np.save(tmp_path / "long.npy", np.arange(11, dtype=np.float32))
    assert encoder.load_media(tmp_path / "long.npy")[0].tolist() == list(range(1, 11))  # its last 10 steps
    np.save(tmp_path / "wide.npy", np.zeros((4, 5), dtype=np.float32))
    with pytest.raises(UserError, match=r"wide\.npy: series of 5 channels has more than the encoder's 3"):
        encoder.load_media(tmp_path / "wide.npy")


def test_multimodal_lm_with_a_series_encoder_runs_and_saves(tmp_path):
    """A tiny LLM with patchtst + reprogramming: `<series>` placeholders, a training forward
    whose gradients reach encoder and connector; the word embeddings are the LLM's alone in
    the state dict, and a saved model loads reading the same rows."""
    from polymodal.model import MultimodalLM

    model = series_model({"kind": "patchtst", "channels": 2, "length": 24, "width": 16, "heads": 2},
                         {"kind": "reprogramming", "prototypes": 8, "vocabulary": 64, "heads": 2, "head_dim": 4})
    model.set_trainable(["encoder", "connector"])
    connector = model.connectors["series"]
    assert model.processor.media["series"].tokens == 2 * 2  # 2 channels x 2 patches
    messages = [{"role": "user", "content": "<series>\nWhat is it?"}, {"role": "assistant", "content": "a wave"}]
    series = [pad_series(torch.randn(2, 24), 2, 24), pad_series(torch.randn(1, 9), 2, 24)]
    batch = collate([model.processor.encode_for_training(messages, media={"series": [item]}) for item in series],
                    model.pad_id)
    assert batch.media["series"].shape == (2, 2, 24)
    loss = next_token_loss(model(batch))
    loss.backward()
    assert torch.isfinite(loss)
    assert connector.mapping.weight.grad.abs().sum() > 0 and model.encoders["series"].embed.weight.grad is not None
    assert model.llm.model.get_input_embeddings().weight.grad is None  # read detached
    word_rows = model.llm.model.get_input_embeddings().weight.shape[0]
    assert not any(value.shape[:1] == (word_rows,) for name, value in model.state_dict().items()
                   if name.startswith("connectors."))
    model.save_pretrained(tmp_path / "model")
    loaded = MultimodalLM.from_pretrained(tmp_path / "model")
    assert torch.equal(loaded.connectors["series"].vocabulary_ids, connector.vocabulary_ids)
    torch.testing.assert_close(loaded.connectors["series"].prototypes(), connector.prototypes())


def signal(high: bool, generator: torch.Generator) -> torch.Tensor:
    """A noisy sine of 1 to 2 (low) or 6 to 9 (high) cycles, 1 or 2 channels of 30 to 48
    steps, random phase, level and amplitude: [C, T]."""
    channels = int(torch.randint(1, 3, (), generator=generator))
    steps = int(torch.randint(30, 49, (), generator=generator))
    cycles = (6 + 3 * torch.rand(channels, 1, generator=generator)) if high else (1 + torch.rand(channels, 1, generator=generator))
    phase = 2 * math.pi * torch.rand(channels, 1, generator=generator)
    time = torch.arange(steps) / steps
    wave = torch.sin(2 * math.pi * cycles * time + phase)
    amplitude, level = 0.5 + 3 * torch.rand(channels, 1, generator=generator), 10 * torch.randn(channels, 1, generator=generator)
    return level + amplitude * (wave + 0.1 * torch.randn(channels, steps, generator=generator))


def learned_accuracy(encoder: dict, steps: int = 100, seed: int = 1) -> float:
    """Train `encoder` + mlp into a frozen tiny LLM on fresh batches of 8 low and high
    frequency series for `steps` steps; the accuracy on 40 held-out series of the answer
    the model scores higher, "L" or "H" (the LLM is random: its greedy words are noise).

    Why frozen: training the random LLM too makes it learn the answers' prior first and
    then sit at chance for a long, seed-dependent time (at 100 steps, 1 seed in 6 or 10
    stayed near 0.5); frozen, 10 seeds gave 0.825 to 1.0 (mean 0.96)."""
    model = series_model({"channels": 2, "length": 48, **encoder}, {"kind": "mlp"})
    model.set_trainable(["encoder", "connector"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(seed)

    def example(high: bool):
        question = {"role": "user", "content": "<series>\nLow or high?"}
        reply = {"role": "assistant", "content": "H" if high else "L"}
        return model.processor.encode_for_training(
            [question, reply], media={"series": [pad_series(signal(high, generator), 2, 48)]})

    model.train()
    for _ in range(steps):
        batch = collate([example(index % 2 == 1) for index in range(8)], model.pad_id)
        optimizer.zero_grad()
        next_token_loss(model(batch)).backward()
        optimizer.step()
    model.eval()
    truths = torch.tensor([index % 2 == 1 for index in range(40)])
    with torch.no_grad():
        scored = model(collate([example(bool(high)) for high in truths], model.pad_id))
    first = (scored.label_mask.cumsum(1) == 1) & scored.label_mask  # each row's answer letter
    logits = scored.logits[first[scored.label_mask]]  # [40, V]
    low, high = model.llm.tokenizer.convert_tokens_to_ids(["L", "H"])
    return ((logits[:, high] > logits[:, low]) == truths).float().mean().item()


def test_a_tiny_model_learns_low_from_high_frequency():
    """A few dozen steps teach patchtst + mlp, through a tiny LLM, to tell held-out series
    of random length, channels, level and phase apart: accuracy, not loss."""
    accuracy = learned_accuracy({"kind": "patchtst", "patch_len": 8, "stride": 4, "width": 32, "heads": 2})
    assert accuracy >= 0.8, f"accuracy {accuracy:.3f} on 40 held-out series (chance: 0.5)"
