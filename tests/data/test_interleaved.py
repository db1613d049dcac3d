"""Interleaved documents (text and images in any order) and several images in one turn
(issue 16 §3): read in order, bad records listed, trained on, answered."""

import json
import re
import shutil

import pytest

from conftest import DATA
from polymodal.config import DatasetConfig, RecipeConfig, from_dict
from polymodal.data import read_interleaved
from polymodal.data.datasets import read_dataset
from polymodal.data.errors import DataError
from polymodal.data.validate import check_samples
from polymodal.engine.generate import Engine
from polymodal.engine.sampling import SamplingParams
from polymodal.model import MultimodalLM
from polymodal.processing.collate import IGNORE
from polymodal.train.run import train

MODEL = {"llm": {"source": "tiny:llama"},
         "encoder": {"kind": "vit", "image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
         "connector": {"kind": "mlp", "depth": 2}}


def text(value):
    return {"type": "text", "text": value}


def image(name):
    return {"type": "image", "image": name}


def write_documents(folder, documents) -> str:
    for name in ("red_circle.png", "blue_square.png"):
        shutil.copy(f"{DATA}/{name}", folder / name)
    path = folder / "documents.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in documents))
    return path


def test_documents_keep_their_order_and_every_image(tmp_path):
    path = write_documents(tmp_path, [
        {"id": "d1", "content": [text("Two shapes."), image("red_circle.png"), text("A red circle"),
                                 text(", and then"), image("blue_square.png"), image("red_circle.png"),
                                 text("a blue square before the circle again."), image("blue_square.png")]},
        {"content": [image("blue_square.png"), text("  "), text("Blue.")]},
    ])
    first, second = read_interleaved(path)
    assert first.id == "d1" and second.id == "documents:2" and first.where == f"{path}:1"
    assert first.messages == [
        {"role": "user", "content": ""}, {"role": "assistant", "content": "Two shapes."},
        {"role": "user", "content": "<image>"}, {"role": "assistant", "content": "A red circle, and then"},
        {"role": "user", "content": "<image><image>"},
        {"role": "assistant", "content": "a blue square before the circle again."}]
    # reading order; the last image has no text after it to predict, so it is left out
    assert first.images == [str(tmp_path / n) for n in ("red_circle.png", "blue_square.png", "red_circle.png")]
    assert second.messages == [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "Blue."}]
    assert check_samples([first, second], "<image>", None) == [first, second]
    assert read_dataset(DatasetConfig(format="interleaved", path=str(path))) == [first, second]


@pytest.mark.parametrize(("record", "problem"), [
    ({"content": [image("missing.png"), text("x")]}, "content[0]: image not found: "),
    ({"content": [text("x"), {"type": "video", "video": "a.mp4"}]}, "content[1]: unknown part type 'video'"),
    ({"content": []}, "'content' must be a non-empty list"),
    ({"id": 3}, "'content' must be a non-empty list"),
    ({"content": [image("red_circle.png"), text(" ")]}, "no text to learn from"),
    ({"content": [text(5)]}, "content[0]: 'text' must be text"),
    ({"content": [{"type": "image", "image": ["a.png"]}, text("x")]}, "content[0]: 'image' must be a path"),
    ({"content": ["just text"]}, "content[0]: unknown part type a str"),
    ([1, 2], "expected an object, got list"),
    ("{not json", "not valid JSON"),
])
def test_a_bad_document_is_listed_and_the_rest_train(tmp_path, record, problem):
    good = {"id": "good", "content": [image("red_circle.png"), text("A circle.")]}
    path = write_documents(tmp_path, [good, record])
    kept, bad = read_interleaved(path)
    assert kept.problem is None and bad.problem.startswith(problem) and bad.where == f"{path}:2"
    listed = tmp_path / "bad.jsonl"
    assert check_samples([kept, bad], "<image>", listed, max_bad_fraction=0.5) == [kept]
    assert json.loads(listed.read_text())["reason"] == bad.problem
    with pytest.raises(DataError, match=r"documents\.jsonl:2: " + re.escape(problem)):
        check_samples([kept, bad], "<image>", None)


def test_a_document_is_learned_as_its_text_with_the_images_as_context(tmp_path, tiny_llava):
    path = write_documents(tmp_path, [{"content": [text("Look:"), image("red_circle.png"),
                                                   image("blue_square.png"), text("two shapes.")]}])
    [sample] = read_interleaved(path)
    encoded = tiny_llava.processor.encode_for_training(sample.messages, sample.images)
    ids, labels = encoded["input_ids"], encoded["labels"]
    tokenizer = tiny_llava.llm.tokenizer
    learned = tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE])
    assert "Look:" in learned and "two shapes." in learned
    image_id = tiny_llava.processor.image_token_id
    assert ids.count(image_id) == 2 * tiny_llava.tokens_per_image and encoded["pixel_values"].shape[0] == 2
    assert all(label == IGNORE for i, label in zip(ids, labels) if i == image_id)
    assert ids.index(image_id) > ids.index(tokenizer("Look:", add_special_tokens=False)["input_ids"][-1])


def test_two_images_in_one_turn_and_interleaved_documents_train_a_step_and_answer(tmp_path):
    documents = write_documents(tmp_path, [{"content": [image("red_circle.png"), text("Red."),
                                                        image("blue_square.png"), text("Blue.")]}] * 4)
    llava = tmp_path / "two.json"
    llava.write_text(json.dumps([{"id": str(n), "images": ["red_circle.png", "blue_square.png"], "conversations": [
        {"from": "human", "value": "<image> and <image>: which is red?"}, {"from": "gpt", "value": "the first"}]}
        for n in range(4)]))
    recipe = from_dict(RecipeConfig, {"name": "two", "model": MODEL, "stages": [{
        "name": "only", "train": ["connector", "llm"], "lr": {"connector": 1e-3, "llm": 1e-3}, "steps": 1,
        "batch_size": 4, "data": [{"format": "llava", "path": str(llava)},
                                  {"format": "interleaved", "path": str(documents)}]}]})
    summary = train(recipe, tmp_path / "run")
    assert summary["stages"]["only"]["samples"] == 4
    assert not (tmp_path / "run" / "bad_samples.jsonl").exists()  # every sample of both formats passed the check
    model = MultimodalLM.from_pretrained(tmp_path / "run" / "model")
    prompt = {"messages": [{"role": "user", "content": "<image> and <image>: which is red?"}],
              "images": [str(tmp_path / "red_circle.png"), str(tmp_path / "blue_square.png")]}
    [completion] = Engine(model).generate([prompt], SamplingParams(max_new_tokens=3))
    assert len(completion.token_ids) >= 1
