"""Few-shot prompting (`eval --shots K`) and the fast-binding task (issue 16 §3)."""

import argparse
import json
import random
from collections import Counter

import pytest
from fusion.test_fusion_kinds import KINDS, fused_model
from PIL import Image

from polymodal.cli.eval import task_options
from polymodal.data.sample import Item
from polymodal.engine.generate import Completion, Engine
from polymodal.errors import UserError
from polymodal.eval.binding import NONSENSE_WORDS, binding_examples, shown_shapes
from polymodal.eval.run import evaluate
from polymodal.eval.shots import FewShotItem, few_shot_items
from polymodal.eval.tasks import TaskOptions, get_task

SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ((200, 0, 0), (0, 0, 200), (0, 160, 0))


@pytest.fixture
def folder(tmp_path):
    """Nine images in easy-VQA's layout (three of each shape), two questions about each."""
    (tmp_path / "images").mkdir()
    questions = []
    for image_id in range(9):
        shape, colour = SHAPES[image_id % 3], ("red", "blue", "green")[image_id // 3]
        Image.new("RGB", (32, 32), COLOURS[image_id // 3]).save(tmp_path / "images" / f"{image_id}.png")
        questions += [["what shape is this?", shape, image_id], ["what color is the shape?", colour, image_id]]
    (tmp_path / "questions.json").write_text(json.dumps(questions))
    (tmp_path / "answers.txt").write_text("\n".join([*SHAPES, "red", "blue", "green"]) + "\n")
    return tmp_path


@pytest.fixture
def asked(monkeypatch):
    """Engine.generate records the prompts it is given and answers the last shown answer."""
    prompts = []

    def generate(self, batch, params=None):
        prompts.extend(batch)
        return [Completion(next((m["content"] for m in reversed(p["messages"]) if m["role"] == "assistant"), "?"),
                           [], "stop", 0) for p in batch]
    monkeypatch.setattr(Engine, "generate", generate)
    return prompts


def test_shots_come_before_the_question_with_their_images_seeded_never_its_own(folder, asked, tiny_llava):
    options = TaskOptions(data=str(folder), limit=4, shots=3, seed=1)
    results, rows = evaluate(tiny_llava, "easy-vqa", options)
    assert results["shots"] == 3 and results["n"] == 4
    items = {item.id: item for item in get_task("easy-vqa").items(TaskOptions(data=str(folder)))}
    for prompt, row in zip(asked, rows):
        roles = [m["role"] for m in prompt["messages"]]
        assert roles == ["user", "assistant"] * 3 + ["user"]
        assert all(m["content"].startswith("<image>\n") for m in prompt["messages"][::2])
        assert len(prompt["images"]) == 4  # one per example, then the question's
        assert prompt["messages"][-1]["content"] == "<image>\n" + row["prompt"]
        own = items[row["id"]].images[0]
        shown = [items[example].images[0] for example in row["examples"]]
        assert own not in shown and row["id"] not in row["examples"]  # nor another question about its image
        answers = [m["content"] for m in prompt["messages"][1::2]]
        assert answers == [items[example].references[0] for example in row["examples"]]
    again = evaluate(tiny_llava, "easy-vqa", options)[1]
    other_seed = evaluate(tiny_llava, "easy-vqa", TaskOptions(data=str(folder), limit=4, shots=3, seed=2))[1]
    assert [r["examples"] for r in again] == [r["examples"] for r in rows]
    assert {r["id"]: r["examples"] for r in other_seed} != {r["id"]: r["examples"] for r in rows}
    zero, zero_rows = evaluate(tiny_llava, "easy-vqa", TaskOptions(data=str(folder), limit=4))
    assert zero["shots"] == 0 and "examples" not in zero_rows[0]
    assert [len(p["messages"]) for p in asked[-4:]] == [1] * 4


def test_a_question_keeps_its_examples_whatever_else_is_sampled():
    pool = [Item(str(n), f"q{n}", [f"{n % 5}.png"], [f"a{n}"]) for n in range(20)]
    alone = few_shot_items(pool[3:4], pool, 2, seed=0)
    together = few_shot_items(pool[:10], pool, 2, seed=0)
    assert [e.id for e in alone[0].examples] == [e.id for e in together[3].examples]
    assert all(e.images != pool[3].images for e in alone[0].examples)
    with pytest.raises(UserError, match="--shots 17: question 0 has only 16 other questions"):
        few_shot_items(pool[:1], pool, 17)


def test_other_media_are_marked_in_the_turn_that_holds_them():
    series = [Item(str(n), "Which class?", [], [f"class {n % 2}", f"class {n % 2}", "x"],
                   media={"series": [f"{n}.npy"]}) for n in range(4)]
    [item] = few_shot_items(series[:1], series, 2, placeholders={"image": "<image>", "series": "<series>"})
    assert isinstance(item, FewShotItem)
    prompt = item.prompt()
    assert [m["content"] for m in prompt["messages"][::2]] == ["<series>\nWhich class?"] * 3
    assert [m["content"] for m in prompt["messages"][1::2]] == [e.references[0] for e in item.examples]
    assert prompt["media"] == {"series": [*(e.media["series"][0] for e in item.examples), "0.npy"]}


def test_shots_generate_with_a_real_tiny_model(folder, tiny_llava):
    results, rows = evaluate(tiny_llava, "easy-vqa", TaskOptions(data=str(folder), limit=2, shots=2,
                                                                  system="Answer in one word."))
    assert results["shots"] == 2 and len(rows) == 2 and all(len(r["examples"]) == 2 for r in rows)


def command_line(**given):
    args = {"task": "easy-vqa", "split": "test", "data": None, "limit": None, "seed": 0, "setting": "all",
            "prompt": None, "templates": None, "image_model": None, "system": None, "max_new_tokens": None,
            "batch_size": 8, "show": 0}
    return argparse.Namespace(**{**args, **given})


def test_shots_on_the_command_line():
    assert task_options(command_line(shots=4))[1].shots == 4
    assert task_options(command_line())[1].shots == 0  # analyze's arguments have no --shots
    with pytest.raises(UserError, match="--shots must be at least 0"):
        task_options(command_line(shots=-1))
    with pytest.raises(UserError, match="--shots: task zeroshot embeds"):
        task_options(command_line(task="zeroshot", shots=2))


def test_binding_items_name_each_shape_with_their_own_words(folder):
    items = get_task("easy-vqa-binding").items(TaskOptions(data=str(folder)))
    assert len(items) == 9 and all(item.question == "What is this?" for item in items)
    for item in items:
        names = item.info["names"]
        assert sorted(names) == list(SHAPES) and len(set(names.values())) == 3
        assert set(names.values()) <= set(NONSENSE_WORDS)
        assert item.references == [names[item.info["shape"]]]
    assert len({tuple(item.info["names"].values()) for item in items}) > 1  # drawn per question
    again = get_task("easy-vqa-binding").items(TaskOptions(data=str(folder)))
    assert [item.info for item in again] == [item.info for item in items]


@pytest.mark.parametrize("shots", [1, 2, 3, 4, 7])
def test_binding_shots_always_name_the_questions_shape_and_cover_the_others(shots):
    shapes = shown_shapes("circle", list(SHAPES), shots, random.Random(shots))
    counts = Counter(shapes)
    assert len(shapes) == shots and counts["circle"] >= 1
    assert len(counts) == min(shots, 3) and max(counts.values()) - min(counts.values()) <= 1


def test_binding_examples_are_other_images_named_with_the_questions_words(folder):
    task = get_task("easy-vqa-binding")
    items = task.items(TaskOptions(data=str(folder)))
    by_shape = {shape: [i for i in items if i.info["shape"] == shape] for shape in SHAPES}
    query = items[0]
    examples = binding_examples(query, by_shape, 4, seed=0)
    assert len(examples) == 4 and all(e.images != query.images for e in examples)
    assert len({e.images[0] for e in examples}) == 4  # four different images
    assert [e.references[0] for e in examples] == [query.info["names"][e.info["shape"]] for e in examples]
    assert query.info["shape"] in {e.info["shape"] for e in examples}
    with pytest.raises(UserError, match=rf"--shots 9: only 2 other {query.info['shape']} image"):
        binding_examples(query, by_shape, 9, seed=0)  # 3 rounds of the 3 shapes; 2 other images of each


def test_binding_is_solved_by_copying_the_shots_and_not_without_them(folder, asked, tiny_llava):
    zero, _ = evaluate(tiny_llava, "easy-vqa-binding", TaskOptions(data=str(folder)))
    assert zero["accuracy"] == 0 and zero["shots"] == 0 and zero["ways"] == 0 and zero["chance"] == 0
    one, _ = evaluate(tiny_llava, "easy-vqa-binding", TaskOptions(data=str(folder), shots=1))
    assert one["accuracy"] == 1 and one["ways"] == 1  # one shot shows the question's own shape
    assert one["said_a_made_up_word"] == 1 and one["said_shape_name"] == 0
    two, _ = evaluate(tiny_llava, "easy-vqa-binding", TaskOptions(data=str(folder), shots=2))
    assert two["ways"] == 2 and two["chance"] == 0.5 and 0 < two["accuracy"] < 1


@pytest.mark.parametrize("kind", KINDS)
def test_few_shot_prompts_answer_alike_batched_and_one_by_one_with_every_fusion(folder, kind):
    model = fused_model(kind)  # the kind's weights perturbed, so that it changes the answers
    options = TaskOptions(data=str(folder), limit=3, shots=2, max_new_tokens=4)
    batched = evaluate(model, "easy-vqa", options, batch_size=3)[1]
    alone = evaluate(model, "easy-vqa", options, batch_size=1)[1]
    assert [row["prediction"] for row in batched] == [row["prediction"] for row in alone]
    assert all(len(row["examples"]) == 2 for row in batched)
