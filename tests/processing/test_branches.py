"""Shared-prefix rows: the same loss and gradients as the separate samples, at fewer tokens."""

import json

import pytest
import torch
from PIL import Image

from conftest import tiny_model
from polymodal.config import DatasetConfig, StageConfig
from polymodal.errors import ConfigError
from polymodal.objectives.lm import LanguageModeling, lm_example
from polymodal.processing.batch import Batch, branch_attention_mask
from polymodal.processing.branches import balanced_rows, merge_branches, shared_prefix_length
from polymodal.processing.collate import IGNORE
from polymodal.train.mixture import Mixture, encode_dataset, read_dataset

QUESTIONS = [("What colour is it?", "red"), ("What colour is the shape?", "red"),
             ("Is it blue?", "no"), ("Is there a shape?", "yes"), ("Is it red?", "yes")]


def conversations(folder, images=3):
    """`images` one-image conversations of five questions each, as LLaVA JSON."""
    records = []
    for index in range(images):
        Image.new("RGB", (32, 32), (200, 60 * index, 0)).save(folder / f"{index}.png")
        turns = []
        for number, (question, answer) in enumerate(QUESTIONS):
            turns += [{"from": "human", "value": ("<image>\n" if number == 0 else "") + question},
                      {"from": "gpt", "value": answer}]
        records.append({"id": str(index), "image": f"{index}.png", "conversations": turns})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture
def model():
    model = tiny_model({"kind": "vit", "image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
                       llm={"system_prompt": "Answer the question about the image in one word, please."})
    model.set_trainable(["encoder", "connector", "llm"])
    return model.train()


def lm_objective(model, path, **options) -> LanguageModeling:
    dataset = DatasetConfig(format="llava", path=str(path), turns=1)
    stage = StageConfig(name="s", train=["connector"], lr={"connector": 1e-3}, data=[dataset], batch_size=12,
                        **options)
    return LanguageModeling(stage, model)


def batch_of(model, path, share_prefix=None, loss_average="token"):
    """The first batch of 12 a stage with these options draws; and its objective."""
    objective = lm_objective(model, path, share_prefix=share_prefix, loss_average=loss_average)
    datasets = [encode_dataset(objective, dataset, None) for dataset in objective.stage.data]
    return Mixture(datasets, objective).batch(step=0), objective


def loss_and_gradients(model, batch):
    model.zero_grad()
    loss, _ = batch_loss(model, batch)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def batch_loss(model, batch_and_objective):
    batch, objective = batch_and_objective
    return objective.loss(model, batch).loss, batch


@pytest.mark.parametrize("share_prefix", [3, 12])
def test_shared_prefix_rows_give_the_loss_and_gradients_of_the_separate_samples(model, tmp_path, share_prefix):
    path = conversations(tmp_path)
    separate = batch_of(model, path)
    shared = batch_of(model, path, share_prefix)
    assert shared[0].input_ids.shape[0] == 12 // share_prefix
    # The same draw: the same images (rows balance their lengths, so in another order), fewer tokens.
    def images(batch):
        return sorted(pixels.sum().item() for pixels in batch[0].media["image"])

    assert images(shared) == pytest.approx(images(separate))
    assert shared[0].num_tokens < separate[0].num_tokens
    loss, gradients = loss_and_gradients(model, separate)
    shared_loss, shared_gradients = loss_and_gradients(model, shared)
    assert shared_loss == pytest.approx(loss, rel=1e-5)
    for a, b in zip(gradients, shared_gradients, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("share_prefix", [None, 3])
def test_sample_average_is_the_mean_of_each_samples_own_mean(model, tmp_path, share_prefix):
    path = conversations(tmp_path)
    token_mean = batch_loss(model, batch_of(model, path, share_prefix))[0].item()
    sample_mean = batch_loss(model, batch_of(model, path, share_prefix, "sample"))[0].item()
    # Each sample alone (its own token mean), the same draw of 12, in the same order.
    separate, objective = batch_of(model, path)
    means = [objective.loss(model, row_of(separate, row)).loss.item() for row in range(12)]
    assert sample_mean == pytest.approx(sum(means) / 12, rel=1e-5)
    assert sample_mean != pytest.approx(token_mean, rel=1e-5)  # answers of 2 and 3 byte tokens


def row_of(batch: Batch, row: int) -> Batch:
    """One row of a batch of one-image rows, as a batch."""
    rows = slice(row, row + 1)
    return Batch(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows],
                 position_ids=batch.position_ids[rows], labels=batch.labels[rows],
                 media={"image": batch.media["image"][rows]}, sample_ids=batch.sample_ids[rows])


def test_rows_balance_their_lengths_and_keep_the_draws_order():
    examples = [{"input_ids": [0] * n} for n in (30, 5, 5, 5, 5, 5, 28, 6)]
    rows = balanced_rows(examples, 4)
    assert [[len(e["input_ids"]) for e in row] for row in rows] == [[30, 5, 5, 5], [5, 5, 28, 6]]
    assert sorted(len(row) for row in balanced_rows(examples[:7], 4)) == [3, 4]


def test_a_branch_sees_the_prefix_and_itself_only():
    branch_ids = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])
    mask = branch_attention_mask(branch_ids, (branch_ids >= 0).long())[0, 0]
    assert mask[3].tolist() == [True, True, True, True, False, False, False]
    assert mask[5].tolist() == [True, True, False, False, True, True, False]
    assert mask[6].tolist() == [False] * 6 + [True]  # padding sees itself, so no row is empty


def test_the_prefix_ends_before_the_first_labels_position():
    a = {"input_ids": [1, 2, 3, 4, 5], "labels": [IGNORE, IGNORE, IGNORE, 4, 5], "images": []}
    b = {"input_ids": [1, 2, 3, 4, 6], "labels": [IGNORE, IGNORE, IGNORE, 4, 6], "images": []}
    assert shared_prefix_length([a, b]) == 2  # position 2 predicts the label at 3: in each branch
    merged = merge_branches([a, b])
    assert merged["input_ids"] == [1, 2, 3, 4, 5, 3, 4, 6]
    assert merged["position_ids"] == [0, 1, 2, 3, 4, 2, 3, 4]
    assert merged["labels"] == [IGNORE, IGNORE, IGNORE, 4, 5, IGNORE, 4, 6]


def test_the_prefix_holds_an_image_only_when_every_sample_has_that_image():
    image = 9  # the placeholder id; two tokens per image
    same = [{"input_ids": [1, image, image, 2, 5], "labels": [IGNORE] * 4 + [5], "images": ["a.png"]},
            {"input_ids": [1, image, image, 3, 6], "labels": [IGNORE] * 4 + [6], "images": ["a.png"]}]
    assert shared_prefix_length(same, image, 2) == 3
    assert merge_branches(same, image, 2)["images"] == ["a.png"]
    other = [same[0], {**same[1], "images": ["b.png"]}]
    assert shared_prefix_length(other, image, 2) == 1
    assert merge_branches(other, image, 2)["images"] == ["a.png", "b.png"]
    cut = [same[0], {**same[1], "input_ids": [1, image, image, 2, 6]}]  # common up to the label
    assert shared_prefix_length(cut, image, 2) == 3


def test_share_prefix_is_checked():
    with pytest.raises(ConfigError, match="share_prefix"):
        StageConfig(name="s", train=["connector"], lr={"connector": 1e-3},
                    data=[DatasetConfig(format="easy-vqa")], share_prefix=1)


def test_each_distinct_conversation_text_is_tokenized_once(tmp_path, model, monkeypatch):
    """encode_dataset tokenizes a text once for all the images it is asked of, and every
    example is what tokenizing it alone gives, with its own image."""
    dataset = DatasetConfig(format="llava", path=str(conversations(tmp_path, images=4)), turns=1)
    stage = StageConfig(name="s", train=["connector"], lr={"connector": 1e-3}, data=[dataset])
    samples = read_dataset(dataset)
    alone = [lm_example(model, sample) for sample in samples]
    calls = []
    encode = model.processor.encode_for_training
    monkeypatch.setattr(model.processor, "encode_for_training", lambda *a, **k: calls.append(1) or encode(*a, **k))
    encoded = encode_dataset(LanguageModeling(stage, model), dataset, None).samples
    assert encoded == alone and len(encoded) == 4 * len(QUESTIONS)
    assert len(calls) == len(QUESTIONS)
    assert [e["images"] for e in encoded] == [s.images for s in samples]
