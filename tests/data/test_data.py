"""Data formats as conversations, and the up-front check of every sample."""

import json
import shutil

import pytest

from conftest import DATA, needs_package
from polymodal.data import read_captions, read_easy_vqa, read_llava_json
from polymodal.data.errors import DataError
from polymodal.data.validate import check_samples
from polymodal.errors import UserError


def write_llava(tmp_path, records):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    for name in ("red_circle.png", "blue_square.png", "not_an_image.png"):
        shutil.copy(f"{DATA}/{name}", tmp_path / name)
    return path


def test_llava_json_single_and_multi_image(tmp_path):
    path = write_llava(tmp_path, [
        {"id": "a", "image": "red_circle.png",
         "conversations": [{"from": "human", "value": "<image>\nShape?"}, {"from": "gpt", "value": "circle"}]},
        {"id": "b", "images": ["red_circle.png", "blue_square.png"],
         "conversations": [{"from": "human", "value": "<image><image>Differ?"}, {"from": "gpt", "value": "yes"}]},
    ])
    samples = read_llava_json(path)
    assert [s.id for s in samples] == ["a", "b"]
    assert samples[0].messages[1] == {"role": "assistant", "content": "circle"}
    assert samples[1].images == [str(tmp_path / "red_circle.png"), str(tmp_path / "blue_square.png")]


def test_malformed_llava_record_is_a_bad_sample_that_names_it(tmp_path):
    path = write_llava(tmp_path, [{"id": "a", "conversations": [{"from": "robot", "value": "x"}]}])
    [sample] = read_llava_json(path)
    assert sample.id == "a" and sample.problem.startswith("unknown role 'robot'")
    assert sample.where == f"{path}, record 0 (id 'a')"
    with pytest.raises(DataError, match=r"first: .*data\.json, record 0 \(id 'a'\): unknown role 'robot'"):
        check_samples([sample], "<image>", None)


def test_caption_lines(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text('{"image": "x.png", "text": "a red circle"}\n\n{"image": "y.png"}\n'
                    '{"image": ["x.png"], "text": 5}\n')
    good, *bad = read_captions(path)
    assert good.problem is None and good.messages[1]["content"] == "a red circle"
    assert [sample.id for sample in bad] == ["captions:3", "captions:4"]
    assert [sample.where for sample in bad] == [f"{path}:3", f"{path}:4"]  # file and line
    assert all("two strings" in sample.problem for sample in bad)
    path.write_text('{"image": "x.png", "text": "a red circle"}\n')
    [sample] = read_captions(path)
    assert sample.messages[-1]["content"] == "a red circle" and sample.images == [str(tmp_path / "x.png")]


@needs_package("easy_vqa")
def test_easy_vqa_groups_questions_by_image():
    samples = read_easy_vqa("test")
    assert len(samples) == 1000
    assert sum(len(s.messages) // 2 for s in samples) == 9673
    assert all(s.messages[0]["content"].startswith("<image>\n") and len(s.images) == 1 for s in samples)
    assert sum(m["content"].count("<image>") for m in samples[0].messages) == 1


def test_split_turns_puts_the_image_in_every_part():
    from polymodal.data.sample import Sample, split_turns

    messages = []
    for number in range(5):
        messages += [{"role": "user", "content": ("<image>\n" if number == 0 else "") + f"q{number}?"},
                     {"role": "assistant", "content": f"a{number}"}]
    parts = split_turns(Sample("x", messages, ["x.png"]), 2)
    assert [[m["content"] for m in p.messages] for p in parts] == [
        ["<image>\nq0?", "a0", "q1?", "a1"], ["<image>\nq2?", "a2", "q3?", "a3"], ["<image>\nq4?", "a4"]]
    assert [p.id for p in parts] == ["x#0", "x#2", "x#4"] and all(p.images == ["x.png"] for p in parts)
    two_images = Sample("y", messages, ["a.png", "b.png"])
    assert split_turns(two_images, 1) == [two_images]  # where would the second image go? left whole
    spoken = Sample("z", messages, ["x.png"], media={"audio": ["q.wav"]})
    assert split_turns(spoken, 1) == [spoken]  # the clip belongs to one turn: kept whole, not lost


@needs_package("easy_vqa")
def test_easy_vqa_one_turn_per_sample():
    from polymodal.data.easy_vqa import EasyVQAOptions
    from polymodal.train.mixture import read_dataset

    samples = read_dataset(EasyVQAOptions(split="test", turns=1))
    assert len(samples) == 9673
    assert all(len(s.messages) == 2 and s.messages[0]["content"].startswith("<image>\n") for s in samples)


@needs_package("easy_vqa")
def test_easy_vqa_question_types_keep_only_those_questions():
    from polymodal.config import DatasetConfig, from_dict
    from polymodal.data.easy_vqa import EasyVQAOptions, question_type
    from polymodal.errors import ConfigError
    from polymodal.train.mixture import read_dataset

    everything = read_dataset(EasyVQAOptions(split="test", turns=1))
    yes_no = read_dataset(EasyVQAOptions(split="test", turns=1, question_types=["yes/no"]))
    assert {s.messages[1]["content"] for s in yes_no} == {"yes", "no"}
    assert len(yes_no) == sum(question_type(s.messages[1]["content"]) == "yes/no" for s in everything)
    assert all(s.messages[0]["content"].startswith("<image>\n") for s in yes_no)  # the image stays with the first
    with pytest.raises(ConfigError, match="question_types: 'color'; choose from shape, colour, yes/no"):
        EasyVQAOptions(question_types=["color"])
    with pytest.raises(ConfigError, match=r"data\[0\]\.question_types: unknown field; known: format, image_folder"):
        from_dict(DatasetConfig, {"format": "captions", "path": "x.jsonl", "question_types": ["shape"]}, "data[0]")


def test_bad_samples_are_skipped_listed_and_can_stop_the_run(tmp_path):
    good = {"image": "red_circle.png",
            "conversations": [{"from": "human", "value": "<image>Shape?"}, {"from": "gpt", "value": "circle"}]}
    records = [{"id": f"ok{i}", **good} for i in range(7)] + [
        {"id": "missing", **good, "image": "gone.png"},
        {"id": "corrupt", **good, "image": "not_an_image.png"},
        {"id": "count", "conversations": good["conversations"],
         "images": ["red_circle.png", "blue_square.png"]},
    ]
    samples = read_llava_json(write_llava(tmp_path, records))
    bad_file = tmp_path / "bad_samples.jsonl"
    kept = check_samples(samples, "<image>", bad_file, max_bad_fraction=0.5)
    assert [s.id for s in kept] == [f"ok{i}" for i in range(7)]
    reasons = {row["id"]: row["reason"] for row in map(json.loads, bad_file.read_text().splitlines())}
    assert reasons["missing"].startswith("image not found")
    assert reasons["corrupt"].startswith("not an image")
    assert reasons["count"] == "2 image(s) but 1 <image> placeholder(s)"
    assert {row["id"]: row["where"] for row in map(json.loads, bad_file.read_text().splitlines())}["count"] == \
        f"{tmp_path / 'data.json'}, record 9 (id 'count')"
    with pytest.raises(UserError, match=r"3 of 10 samples are bad \(more than 1%\)"):
        check_samples(samples, "<image>", None)


def test_a_file_that_changes_after_its_check_is_checked_again(tmp_path):
    """Media verdicts are remembered per process (the stages of a recipe check the same
    images), keyed by the file's size and time, so a file replaced since is decoded anew."""
    records = [{"id": "a", "image": "picture.png",
                "conversations": [{"from": "human", "value": "<image>Shape?"}, {"from": "gpt", "value": "circle"}]}]
    path = write_llava(tmp_path, records)
    shutil.copy(f"{DATA}/red_circle.png", tmp_path / "picture.png")
    assert len(check_samples(read_llava_json(path), "<image>", None)) == 1
    shutil.copy(f"{DATA}/not_an_image.png", tmp_path / "picture.png")
    with pytest.raises(UserError, match="not an image"):
        check_samples(read_llava_json(path), "<image>", None)


# ---------------------------------------------------------------- formats as registered kinds


def test_a_format_registered_outside_the_package_is_read_by_a_recipe(tmp_path):
    """A new dataset format: an options class and a reader, registered; a recipe names it."""
    from dataclasses import dataclass
    from pathlib import Path

    from polymodal.config import DatasetConfig, load_recipe
    from polymodal.data.sample import Sample
    from polymodal.registry import register_dataset_format
    from polymodal.train.mixture import read_dataset

    @dataclass
    class LinesOptions(DatasetConfig):
        prefix: str = "Q:"

    @register_dataset_format("test-lines", config=LinesOptions)
    def read_lines(options: LinesOptions) -> list[Sample]:
        """Questions, one per line, answered "yes"."""
        lines = Path(options.path).read_text().split("\n")
        return [Sample(f"line{n}", [{"role": "user", "content": f"{options.prefix} {line}"},
                                    {"role": "assistant", "content": "yes"}]) for n, line in enumerate(lines)]

    (tmp_path / "lines.txt").write_text("one\ntwo\nthree")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
model: {{llm: {{source: "tiny:llama"}}}}
stages:
  - name: only
    train: [llm]
    lr: {{llm: 0.001}}
    data: [{{format: test-lines, path: {tmp_path / 'lines.txt'}, prefix: "Ask:", limit: 2}}]
""")
    [dataset] = load_recipe(recipe).stages[0].data
    assert isinstance(dataset, LinesOptions) and dataset.prefix == "Ask:"
    samples = read_dataset(dataset)
    assert [s.messages[0]["content"] for s in samples] == ["Ask: one", "Ask: two"]  # limit applies
    with pytest.raises(UserError, match=r"stages\[0\]\.data\[0\]\.prefx: unknown field; known: .*prefix"):
        load_recipe(recipe, ["stages.0.data.0.prefx=x"])


def test_an_unknown_format_lists_the_known_ones(tmp_path):
    from polymodal.config import DatasetConfig, load_recipe
    from polymodal.train.mixture import read_dataset

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {llm: {source: 'tiny:llama'}}\nstages:\n  - {name: a, train: [llm], "
                      "lr: {llm: 0.001}, data: [{format: lava, path: x.json}]}\n")
    with pytest.raises(UserError, match=r"stages\[0\]\.data\[0\]\.format: unknown dataset format 'lava'; "
                                        r"known: .*captions, easy-vqa.*llava, replay"):
        load_recipe(recipe)
    with pytest.raises(UserError, match=r"unknown dataset format 'lava'; known: .*llava"):
        read_dataset(DatasetConfig(format="lava", path="x.json"))  # built in Python: refused when read


def test_a_recipe_written_before_formats_had_their_own_options_still_loads(tmp_path):
    """A run's recipe.yaml from then holds every format's fields at their defaults."""
    from polymodal.config import StageConfig, from_dict

    former = {"path": None, "split": None, "image_folder": None, "weight": 1.0, "limit": None, "turns": 1,
              "flip_yes_no": False, "question_types": None, "max_new_tokens": 32}
    stage = from_dict(StageConfig, {"name": "a", "train": ["llm"], "lr": {"llm": 1e-3}, "data": [
        {**former, "format": "easy-vqa"}, {**former, "format": "llava", "path": "x.json"},
        {**former, "format": "replay", "max_new_tokens": 24}]})
    easy, llava, replay = stage.data
    assert (easy.split, easy.turns, easy.name) == ("train", 1, "easy-vqa/train")
    assert llava.image_folder is None and llava.name == "x.json" and replay.max_new_tokens == 24


def test_a_bad_jsonl_line_names_the_file_and_line(tmp_path):
    from polymodal.data.records import read_jsonl

    task = tmp_path / "task.jsonl"
    task.write_text('{"image": "a.png", "question": "q"}\n\n{"image": "a.png", "question": \n')
    with pytest.raises(DataError, match=r"task\.jsonl:3: not valid JSON") as caught:
        read_jsonl(task, ("question",))
    assert (caught.value.path, caught.value.line) == (task, 3) and isinstance(caught.value, UserError)
    data = tmp_path / "data.json"
    data.write_text('[\n{"id": "a",\n "conversations": []}\n,]')
    with pytest.raises(DataError, match=r"data\.json:4: not valid JSON"):
        read_llava_json(data)
