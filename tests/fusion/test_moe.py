"""The `moe` fusion (fusion/moe.py): its load-balancing loss is in the training loss, MoMa's
modality-aware routing keeps image and text tokens in their own experts, bad counts are a
UserError naming the field, and the real train loop moves the routed experts.
(The parity tests every kind passes are in test_fusion_kinds.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from conftest import image
from polymodal.config import ModelConfig, RecipeConfig, from_dict
from polymodal.errors import UserError
from polymodal.fusion.moe import RoutedExperts, load_balancing_loss
from polymodal.model import MultimodalLM
from polymodal.objectives.lm import LanguageModeling
from polymodal.processing import collate
from polymodal.train.run import train

MODEL = {"llm": {"source": "tiny:llama"}, "encoder": {"kind": "hf", "source": "tiny:clip"},
         "connector": {"kind": "mlp"}}
CONVERSATIONS = [("<image>What is in the picture?", "a red square"), ("<image>Colour?", "blue"),
                 ("Say hello.", "hello")]


def moe_model(**fusion) -> MultimodalLM:
    """tiny:llama + tiny:clip with a `moe` fusion whose routed experts' down projections are
    non-zero (a fresh one adds nothing, so would route without effect)."""
    torch.manual_seed(0)
    model = MultimodalLM(from_dict(ModelConfig, {**MODEL, "fusion": {"kind": "moe", **fusion}}))
    with torch.no_grad():
        for name, parameter in model.fusion.named_parameters():
            if "down_proj" in name:
                parameter.normal_(std=0.1)
    return model


def training_batch(model: MultimodalLM):
    encoded = [model.processor.encode_for_training(
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        [image(row)] * question.count("<image>")) for row, (question, answer) in enumerate(CONVERSATIONS)]
    return collate(encoded, model.pad_id)


def stage(loss_average: str = "token"):
    return from_dict(RecipeConfig, {"name": "moe", "model": MODEL, "stages": [{
        "name": "only", "train": ["fusion"], "lr": {"fusion": 1e-2}, "steps": 1, "loss_average": loss_average,
        "data": [{"format": "llava", "path": "unused.json"}]}]}).stages[0]


@pytest.mark.parametrize("loss_average", ["token", "sample"])
@pytest.mark.parametrize("aware", [False, True])
def test_the_load_balancing_loss_is_in_the_training_loss(aware, loss_average):
    model = moe_model(modality_aware=aware, top_k=2, aux_loss_weight=0.25).train()
    batch, objective = training_batch(model), LanguageModeling(stage(loss_average), model)
    output = model(batch)
    with_weight = objective.loss(model, batch).loss
    model.fusion.config.aux_loss_weight = 0.0
    without = objective.loss(model, batch).loss
    model.fusion.config.aux_loss_weight = 1.0
    unweighted = model(batch).aux_loss
    assert float(unweighted.detach()) > 0.5  # E * sum f_i P_i: about 1 near balance, never 0
    torch.testing.assert_close(with_weight - without, output.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.aux_loss, 0.25 * unweighted)
    assert model.eval()(batch).aux_loss is None  # evaluation pays nothing for it
    with torch.no_grad():
        assert model.train()(batch).aux_loss is None


def test_the_load_balancing_loss_is_the_switch_transformers():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 3.0]]).log_softmax(-1)  # probabilities below
    chosen = torch.tensor([[0], [0], [1]])  # shares f = (2/3, 1/3)
    probabilities = logits.softmax(-1).mean(0)
    expected = 2 * (2 / 3 * probabilities[0] + 1 / 3 * probabilities[1])
    torch.testing.assert_close(load_balancing_loss(logits, chosen), expected)
    balanced = load_balancing_loss(torch.zeros(4, 4), torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]]))
    torch.testing.assert_close(balanced, torch.tensor(1.0))


def routed_experts_by_token(model: MultimodalLM, batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every MoE layer's (media mask [n], chosen experts [n, k]) when the batch runs."""
    seen = []
    original = RoutedExperts.route

    def spy(self, x, media_mask):
        logits, chosen, weights = original(self, x, media_mask)
        seen.append((media_mask, chosen))
        return logits, chosen, weights

    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(RoutedExperts, "route", spy)
        model.hidden_states(batch)
    return [mask for mask, _ in seen], [chosen for _, chosen in seen]


@pytest.mark.parametrize("image_experts", [0, 1])
def test_modality_aware_routing_keeps_image_tokens_in_image_experts(image_experts):
    model = moe_model(experts=4, top_k=1, modality_aware=True, image_experts=image_experts).eval()
    image_group = image_experts or 2
    masks, chosen = routed_experts_by_token(model, training_batch(model))
    assert len(masks) == 2  # both layers route
    for mask, experts in zip(masks, chosen):
        assert mask.any() and (~mask).any()
        assert bool((experts[mask] < image_group).all())
        assert bool((experts[~mask] >= image_group).all())
        assert len(experts[~mask].unique()) > 1  # text spreads over its group: a real choice
    # Modality-agnostic, the same router sends image tokens to experts of both halves.
    agnostic = moe_model(experts=4, top_k=1).eval()
    masks, chosen = routed_experts_by_token(agnostic, training_batch(agnostic))
    image_choices = torch.cat([experts[mask] for mask, experts in zip(masks, chosen)])
    assert bool((image_choices < 2).any()) and bool((image_choices >= 2).any())


@pytest.mark.parametrize(("fusion", "field"), [
    ({"experts": 2, "top_k": 3}, "model.fusion.top_k"),
    ({"top_k": 0}, "model.fusion.top_k"),
    ({"experts": 0}, "model.fusion.experts"),
    ({"modality_aware": True, "experts": 4, "image_experts": 4}, "model.fusion.image_experts"),
    ({"modality_aware": True, "experts": 1}, "model.fusion.image_experts"),
    ({"modality_aware": True, "experts": 4, "image_experts": 3, "top_k": 2}, "model.fusion.top_k"),
    ({"image_experts": 2}, "model.fusion.image_experts"),
    ({"expert_size": -1}, "model.fusion.expert_size"),
    ({"aux_loss_weight": -0.1}, "model.fusion.aux_loss_weight"),
    ({"layers": [2]}, "model.fusion.layers"),
])
def test_bad_counts_are_a_user_error_naming_the_field(fusion, field):
    with pytest.raises(UserError, match=field):
        MultimodalLM(from_dict(ModelConfig, {**MODEL, "fusion": {"kind": "moe", **fusion}}))


def test_expert_size_and_layers_shape_the_routed_experts():
    model = MultimodalLM(from_dict(ModelConfig, {**MODEL, "fusion": {
        "kind": "moe", "experts": 3, "expert_size": 16, "layers": [-1]}}))
    assert list(model.fusion.layers) == ["1"]
    experts = model.fusion.layers["1"].experts
    assert len(experts) == 3 and experts[0].gate_proj.weight.shape == (16, 64)


def test_a_training_run_moves_the_experts_that_took_tokens_and_nothing_of_the_llm(tmp_path):
    records = []
    for index in range(4):
        Image.new("RGB", (32, 32), (60 * index, 0, 255 - 60 * index)).save(tmp_path / f"{index}.png")
        records.append({"id": str(index), "image": f"{index}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": f"shade {index}"}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    config = from_dict(RecipeConfig, {"name": "moe", "model": {**MODEL, "fusion": {"kind": "moe"}}, "stages": [{
        "name": "only", "train": ["fusion"], "lr": {"fusion": 1e-2}, "steps": 2, "batch_size": 4,
        "data": [{"format": "llava", "path": str(tmp_path / "data.json")}]}]})
    torch.manual_seed(0)
    model = MultimodalLM.from_config(config)
    layer_of = {id(routed): name for name, routed in model.fusion.layers.items()}
    taken = {name: [] for name in layer_of.values()}  # layer -> per step, the experts chosen
    original = RoutedExperts.route

    def spy(self, x, media_mask):
        logits, chosen, weights = original(self, x, media_mask)
        taken[layer_of[id(self)]].append(set(chosen.flatten().tolist()))
        return logits, chosen, weights

    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RoutedExperts, "route", spy)
        train(config, tmp_path / "run", model)
    moved = {name for name, parameter in model.named_parameters() if not torch.equal(before[name], parameter)}
    assert all(name.startswith("fusion.layers.") for name in moved)  # nothing of the LLM, encoder, connector
    for layer, (first, second) in taken.items():  # one forward per step: 2 steps, 2 routes a layer
        assert f"fusion.layers.{layer}.router.weight" in moved  # the balancing loss reaches it
        # The down projections start at zero: an expert's moves only once it took tokens, and
        # its gate and up projections only in a step after that (when down is non-zero).
        # (A token whose output the loss ignores, the last one, gives a zero gradient: "only".)
        experts = {name.split(".")[4] for name in moved if name.startswith(f"fusion.layers.{layer}.experts.")}
        down = {expert for expert in experts if f"fusion.layers.{layer}.experts.{expert}.down_proj.weight" in moved}
        gated = {expert for expert in experts if f"fusion.layers.{layer}.experts.{expert}.gate_proj.weight" in moved}
        assert {int(expert) for expert in down} <= first | second and len(down) >= 2
        assert {int(expert) for expert in gated} <= first & second and gated
