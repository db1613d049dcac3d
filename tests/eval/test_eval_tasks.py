"""Eval tasks: VQA normalisation and soft accuracy, POPE probes and metrics, caption
metrics, multiple choice with rotations, task files and their errors."""

import json
import math

import pytest
from PIL import Image

from polymodal.errors import UserError
from polymodal.eval.caption_metrics import caption_scores
from polymodal.eval.metrics import binary_metrics, says_yes
from polymodal.eval.multiple_choice import chosen_letter, rotations
from polymodal.eval.pope import build_probes
from polymodal.eval.tasks import TaskOptions, get_task
from polymodal.eval.vqa_answers import normalize_vqa, soft_accuracy


@pytest.mark.parametrize("raw, expected", [
    ("Two dogs.", "2 dogs"), ("The cat", "cat"), ("an apple", "apple"), ("dont", "don't"),
    ("Yes!", "yes"), ("1,000", "1000"), ("3.5", "3.5"), ("left-handed", "left handed"),
    ("None", "0"), ("  red\tcar\n", "red car"), ("isnt it", "isn't it"),
])
def test_vqa_normalisation(raw, expected):
    assert normalize_vqa(raw) == expected


def test_vqa_soft_accuracy_is_the_leave_one_out_mean_of_matches_over_three():
    references = ["2", "two", "2", "3", "three", "4"]
    assert soft_accuracy("Two", references) == pytest.approx((3 * 2 / 3 + 3 * 1) / 6)  # three say 2
    assert soft_accuracy("3", references) == pytest.approx((2 * 1 / 3 + 4 * 2 / 3) / 6)
    assert soft_accuracy("4.", references) == pytest.approx((1 * 0 + 5 * 1 / 3) / 6)
    assert soft_accuracy("five", references) == 0.0


def test_binary_metrics_by_hand():
    predicted = [True, True, False, False, True]
    truth = [True, False, False, True, True]  # tp 2, fp 1, fn 1, tn 1
    metrics = binary_metrics(predicted, truth)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["precision"] == pytest.approx(2 / 3) and metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 / 3) and metrics["yes_ratio"] == pytest.approx(3 / 5)
    assert [says_yes(a) for a in ("Yes, there is.", "No.", "There is not.", "yes")] == [True, False, False, True]


def test_bleu4_brevity_penalty_by_hand():
    scores = caption_scores(["The cat sat on the mat."], [["the cat sat on the mat today"]])
    assert scores["bleu4"] == pytest.approx(math.exp(1 - 7 / 6), rel=1e-6)  # every n-gram right, 6 of 7 words


def test_cider_d_by_hand():
    """Two images; idf = log(2 / document frequency), so "a" (in both) weighs nothing.
    Image 1: "red circle" vs "a red circle": unigram cosine 1, bigram cosine 1/sqrt(2)
    ("a red" is missing), no 3- or 4-grams, length penalty exp(-1 / (2 * 6^2)).
    Image 2 matches its reference exactly: 1, 1, 1 and no 4-gram -> 3/4. CIDEr-D is x10."""
    scores = caption_scores(["red circle", "A blue square."], [["a red circle"], ["a blue square"]])
    first = 10 * (1 + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert scores["per_item"] == pytest.approx([first, 7.5])
    assert scores["cider_d"] == pytest.approx((first + 7.5) / 2)


ANNOTATIONS = [("a.png", {"circle", "red circle", "red shape"}), ("b.png", {"circle", "blue circle", "blue shape"}),
               ("c.png", {"triangle", "red triangle", "red shape"}), ("d.png", {"circle", "red circle", "red shape"}),
               ("e.png", {"square", "green square", "green shape"})]


@pytest.mark.parametrize("setting", ["random", "popular", "adversarial"])
def test_pope_probes_are_balanced_and_never_ask_about_present_objects_as_absent(setting):
    probes = build_probes(ANNOTATIONS, setting, seed=3)
    objects = dict(ANNOTATIONS)
    for image in objects:
        mine = [(name, present) for i, name, present in probes if i == image]
        assert sum(p for _, p in mine) == sum(not p for _, p in mine) == 3
        assert all((name in objects[image]) == present for name, present in mine)


def test_pope_popular_and_adversarial_negatives():
    popular = {name for image, name, present in build_probes(ANNOTATIONS, "popular") if image == "e.png" and not present}
    assert popular == {"circle", "red shape", "red circle"}  # the three most frequent objects
    adversarial = {name for image, name, p in build_probes(ANNOTATIONS, "adversarial") if image == "b.png" and not p}
    # What appears most with circle / blue circle / blue shape: red circle (2), red shape (2), then ties of 0.
    assert {"red circle", "red shape"} <= adversarial and "green square" not in adversarial


def test_multiple_choice_rotations_and_letters():
    items = rotations(("q1", ["x.png"], "Which shape?", ["circle", "square", "triangle"]), seed=0)
    assert len(items) == 3
    for item in items:  # the right letter always points at "circle"
        letter = item.references[0]
        assert item.info["options"]["ABC".index(letter)] == "circle"
        assert f"{letter}. circle" in item.question
    assert {item.references[0] for item in items} == {"A", "B", "C"}
    options = ["circle", "square"]
    assert [chosen_letter(a, options) for a in ("B", "(A) circle", "B.", "Square", "circle.", "maybe")] == \
        ["B", "A", "B", "B", "A", None]


def test_circular_eval_counts_a_question_only_if_every_rotation_is_right():
    task = get_task("multiple-choice")
    items = rotations(("q1", ["x.png"], "Which?", ["a", "b", "c"]), seed=0) + \
        rotations(("q2", ["y.png"], "Which?", ["d", "e"]), seed=0)
    always_a = ["A"] * len(items)
    results, _ = task.score(items, always_a)
    assert results["circular_accuracy"] == 0.0 and results["questions"] == 2
    right = [item.info["options"]["ABC".index(item.references[0])] for item in items]  # answers by text
    assert task.score(items, right)[0]["circular_accuracy"] == 1.0


def write_image(path):
    Image.new("RGB", (8, 8), (10, 200, 30)).save(path)


def test_task_files_and_their_errors(tmp_path):
    write_image(tmp_path / "one.png")
    good = tmp_path / "vqa.jsonl"
    good.write_text(json.dumps({"image": "one.png", "question": "Colour?", "answers": ["green"] * 3}) + "\n")
    [item] = get_task("vqa").items(TaskOptions(data=str(good)))
    assert item.images == [str(tmp_path / "one.png")] and item.references == ["green"] * 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + "{not json\n")
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        get_task("vqa").items(TaskOptions(data=str(bad)))
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"image": "gone.png", "question": "Q?", "answers": ["yes"]}) + "\n")
    with pytest.raises(UserError, match=r"missing.jsonl:1: image not found: .*gone.png"):
        get_task("vqa").items(TaskOptions(data=str(missing)))
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text(json.dumps({"image": "one.png", "question": "Q?"}) + "\n")
    with pytest.raises(UserError, match=r"nofield.jsonl:1: missing field 'answers'"):
        get_task("vqa").items(TaskOptions(data=str(no_field)))
    with pytest.raises(UserError, match="unknown task 'nope'; known: audio-image, caption, easy-vqa"):
        get_task("nope")


def test_pope_from_an_object_file_and_from_easy_vqa_layout(tmp_path):
    for name in ("a", "b", "c"):
        write_image(tmp_path / f"{name}.png")
    (tmp_path / "objects.jsonl").write_text("".join(json.dumps({"image": f"{n}.png", "objects": objects}) + "\n"
                                            for n, objects in (("a", ["dog", "cat"]), ("b", ["car"]), ("c", ["dog"]))))
    items = get_task("pope").items(TaskOptions(data=str(tmp_path / "objects.jsonl"), setting="random"))
    # a: dog, cat present, only car absent -> one probe each way; b and c likewise.
    assert sum(i.references == ["yes"] for i in items) == sum(i.references == ["no"] for i in items) == 3
    assert items[0].question.startswith("Is there a ") and items[0].info["setting"] == "random"
    layout = tmp_path / "easy"
    (layout / "images").mkdir(parents=True)
    write_image(layout / "images" / "0.png")
    write_image(layout / "images" / "1.png")
    (layout / "questions.json").write_text(json.dumps([["what color is the circle?", "red", 0],
                                                       ["what shape is this?", "triangle", 1],
                                                       ["is there a blue shape?", "yes", 1]]))
    items = get_task("pope").items(TaskOptions(data=str(layout)))
    asked = {(i.info["setting"], i.id.split(":")[1], i.info["object"]): i.references[0] for i in items}
    assert asked[("random", "0", "red circle")] == "yes" and asked[("popular", "1", "blue triangle")] == "yes"
    assert {name for (_, image, name), answer in asked.items() if image == "0" and answer == "yes"} == \
        {"circle", "red shape", "red circle"}


def test_tasks_resolve_through_the_registry():
    """A task registered outside polymodal/eval is found by name, like the built-in ones."""
    from polymodal.eval.tasks import Item, Task, register_task
    from polymodal.registry import EVAL_TASKS

    @register_task("test-echo")
    class Echo(Task):
        """Answers that repeat the question."""

        def items(self, options):
            return [Item("1", "hello", [], ["hello"])]

        def score(self, items, predictions):
            return {"accuracy": float(predictions == [i.question for i in items])}, []

    assert "easy-vqa" in EVAL_TASKS and "pope" in EVAL_TASKS  # discovery imports polymodal.eval
    task = get_task("test-echo")
    assert isinstance(task, Echo) and task.name == "test-echo"
    assert task.score(task.items(TaskOptions()), ["hello"])[0] == {"accuracy": 1.0}


def test_a_dataset_that_lends_no_questions_is_refused_by_name(tmp_path):
    with pytest.raises(UserError, match="dataset format llava lends no questions to evaluation tasks"):
        get_task("pope").items(TaskOptions(dataset="llava"))
    with pytest.raises(UserError, match=r"gone\.jsonl: not found \(--data: a task file"):
        get_task("caption").items(TaskOptions(data=str(tmp_path / "gone.jsonl")))


@pytest.mark.parametrize("task", ["easy-vqa", "easy-vqa-spoken"])
def test_a_data_folder_that_does_not_exist_is_named_before_any_file_in_it(task, tmp_path):
    from polymodal.data.errors import DataError
    from polymodal.eval.tasks import TaskOptions, get_task, task_dataset

    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=rf"^{missing}: not found \(--data: a folder in the layout of {task}\)"):
        get_task(task).items(TaskOptions(data=str(missing)))
    with pytest.raises(DataError, match=rf"^{missing}: not found"):  # audio-image's dataset
        task_dataset(TaskOptions(data=str(missing)))
