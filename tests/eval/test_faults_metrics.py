"""Issue 21, section 3: metrics mean what they claim. VQA accuracy is the official
leave-one-out mean, POPE reads negations and counts unreadable answers apart, multiple
choice reads the common answer forms and refuses duplicate ids, CIDEr-D refuses too few
images and keeps every script's letters."""

import json
import math
import warnings

import pytest
from PIL import Image

from polymodal.errors import UserError
from polymodal.eval.caption_metrics import MIN_CIDER_IMAGES, caption_scores, tokenize
from polymodal.eval.metrics import binary_metrics, read_yes_no
from polymodal.eval.multiple_choice import chosen_letter, rotations
from polymodal.eval.tasks import Item, TaskOptions, get_task
from polymodal.eval.vqa_answers import soft_accuracy


def official_vqa_accuracy(answer: str, references: list[str]) -> float:
    """The official loop (vqaEval.py) over already normalised strings: drop each reference
    in turn, min(1, matches among the rest / 3), mean."""
    scores = []
    for dropped in range(len(references)):
        others = references[:dropped] + references[dropped + 1:]
        scores.append(min(1.0, sum(other == answer for other in others) / 3))
    return sum(scores) / len(scores)


@pytest.mark.parametrize("prediction, references, expected", [
    ("2", ["2"] * 2 + ["3"] * 8, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10
    ("two", ["2"] * 3 + ["3"] * 7, 0.9),  # (3 * 2/3 + 7 * 1) / 10
    ("The two.", ["two"] * 3 + ["three"] * 7, 0.9),  # articles and punctuation go, "two" -> "2"
    ("3", ["3"] * 10, 1.0),
    ("4", ["3"] * 10, 0.0),
])
def test_vqa_soft_accuracy_is_the_official_leave_one_out_mean(prediction, references, expected):
    assert soft_accuracy(prediction, references) == pytest.approx(expected)


@pytest.mark.parametrize("matches", range(11))
def test_vqa_soft_accuracy_agrees_with_the_official_loop_for_every_count(matches):
    references = ["yes"] * matches + ["no"] * (10 - matches)
    assert soft_accuracy("Yes", references) == pytest.approx(official_vqa_accuracy("yes", references))


def test_vqa_soft_accuracy_with_one_reference_is_exact_match():
    assert soft_accuracy("Two.", ["2"]) == 1.0 and soft_accuracy("3", ["2"]) == 0.0
    with pytest.raises(ValueError):
        soft_accuracy("2", [])


def test_vqa_task_reports_the_official_mean():
    items = [Item("1", "How many?", [], ["2"] * 2 + ["3"] * 8), Item("2", "How many?", [], ["2"] * 3 + ["3"] * 7)]
    results, rows = get_task("vqa").score(items, ["2", "two"])
    assert [row["correct"] for row in rows] == pytest.approx([0.6, 0.9])
    assert results["soft_accuracy"] == pytest.approx(0.75) and results["exact_match"] == 1.0


@pytest.mark.parametrize("answer, expected", [
    ("There isn't a circle.", False), ("There’s no circle.", False), ("It doesn't have one.", False),
    ("No.", False), ("Nope.", False), ("There is not.", False), ("I can't see any circle.", False),
    ("Yes", True), ("Yes, there is a circle, not a square.", True), ("There is a red circle.", True),
    ("No. There is a circle in the corner.", False),  # only the first sentence counts
    ("", None), ("   ", None), ("...", None), ("I cannot tell.", None), ("I'm not sure.", None),
    ("I don't know.", None), ("Blue.", None),
])
def test_pope_reads_yes_no_or_unreadable(answer, expected):
    assert read_yes_no(answer) is expected


def test_unreadable_answers_are_never_yes():
    truth = [True, True, False, False]
    silent = binary_metrics([read_yes_no("")] * 4, truth)
    assert silent["recall"] == 0.0 and silent["precision"] == 0.0 and silent["accuracy"] == 0.0
    assert silent["unreadable"] == 4 and silent["yes_ratio"] == 0.0
    # One yes right, one unreadable where the truth is yes, one no right, one unreadable.
    mixed = binary_metrics([True, None, False, None], truth)
    assert mixed["precision"] == 1.0 and mixed["recall"] == 0.5 and mixed["accuracy"] == 0.5
    assert mixed["unreadable"] == 2


def test_pope_task_counts_unreadable_answers_apart():
    items = [Item(f"random:x:{n}", "Is there a circle in the image?", [], [answer],
                  {"setting": "random", "object": "circle"}) for n, answer in enumerate(["yes", "yes", "no", "no"])]
    results, rows = get_task("pope").score(items, ["", "I cannot tell.", "There isn't a circle.", ""])
    assert results["settings"]["random"]["recall"] == 0.0 and results["unreadable"] == 3
    assert [row["read"] for row in rows] == [None, None, "no", None]
    assert [row["correct"] for row in rows] == [False, False, True, False]


def write_image(path):
    Image.new("RGB", (8, 8), (10, 200, 30)).save(path)


def test_pope_refuses_an_image_listed_twice(tmp_path):
    write_image(tmp_path / "a.png")
    lines = [{"image": "a.png", "objects": ["dog"]}, {"image": "a.png", "objects": ["cat"]}]
    (tmp_path / "objects.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(UserError, match=r"objects.jsonl:2: image 'a.png' is listed again \(first on line 1\)"):
        get_task("pope").items(TaskOptions(data=str(tmp_path / "objects.jsonl")))


OPTIONS = ["red circle", "blue square", "green triangle"]


@pytest.mark.parametrize("answer, expected", [
    ("b", "B"), ("**B**", "B"), ("Answer: B", "B"), ("The answer is B.", "B"), ("Option B", "B"),
    ("B, blue", "B"), ("(B)", "B"), ("answer: b", "B"), ("b) blue square", "B"), ("`C`", "C"),
    ("A is correct.", "A"), ("I think C.", "C"),
    ("A or B", None), ("Either A or C.", None), ("maybe", None), ("", None), ("Option D", None),
    ("A blue square.", "B"),  # the article, not option A: the options' text decides
    ("The answer is a green triangle.", "C"), ("A purple star.", None),
])
def test_multiple_choice_reads_the_common_answer_forms(answer, expected):
    assert chosen_letter(answer, OPTIONS) == expected


def test_the_longest_option_text_found_wins():
    assert chosen_letter("It is a red circle.", ["circle", "red circle"]) == "B"
    assert chosen_letter("circle", ["circle", "red circle"]) == "A"


def choice_file(tmp_path, ids):
    write_image(tmp_path / "x.png")
    lines = [{"id": qid, "image": "x.png", "question": "Which?", "options": ["yes", "no"], "answer": "A"}
             for qid in ids]
    path = tmp_path / "choices.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_multiple_choice_refuses_duplicate_ids_naming_file_and_line(tmp_path):
    task = get_task("multiple-choice")
    items = task.items(TaskOptions(data=str(choice_file(tmp_path, ["q1", "q2"]))))
    answers = [item.info["options"][0] if item.info["question_id"] == "q1" else "I don't know" for item in items]
    right = ["yes" if item.info["question_id"] == "q1" else "none" for item in items]
    assert task.score(items, right)[0]["circular_accuracy"] == 0.5  # q1 right in both rotations, q2 never
    assert task.score(items, answers)[0]["no_choice"] == 2
    with pytest.raises(UserError, match=r"choices.jsonl:2: duplicate id 'q1' \(first on line 1\)"):
        task.items(TaskOptions(data=str(choice_file(tmp_path, ["q1", "q1"]))))


def test_multiple_choice_score_refuses_items_sharing_an_id():
    items = rotations(("q", [], "Which?", ["yes", "no"]), seed=0) * 2
    with pytest.raises(UserError, match="question id 'q' is used by two questions"):
        get_task("multiple-choice").score(items, ["A"] * len(items))


@pytest.mark.parametrize("raw, expected", [
    ("Café au lait.", "café au lait"), ("cafe\u0301", "café"), ("Ελληνικό ΚΕΙΜΕΝΟ", "ελληνικό κειμενο"),
    ("红色的圆。", "红 色 的 圆"), ("ein großer Hund", "ein großer hund"), ("हिन्दी भाषा", "हिन्दी भाषा"),
    ("A red-circle, isn't it?", "a red circle isn't it"),
])
def test_caption_tokenizer_keeps_every_scripts_letters(raw, expected):
    assert tokenize(raw) == expected


def test_chinese_and_accented_captions_score_like_english_ones():
    english = ["a red circle", "a blue square", "a green triangle"]
    other = ["un café rouge", "红色的圆", "une crème brûlée"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # three images: under the floor, but the same for both
        for captions in (english, other):
            scores = caption_scores(captions, [[c] for c in captions])
            assert all(score > 0 for score in scores["per_item"])
        assert caption_scores(["红色的圆"], [["蓝色的方"]])["bleu4"] < 1e-6  # only 的 is shared
        assert caption_scores(["café"], [["cafe"]])["bleu4"] < 1e-6  # an accent is a different word


def test_cider_d_warns_under_the_minimum_where_an_exact_match_scores_zero():
    with pytest.warns(UserWarning, match=f"at least {MIN_CIDER_IMAGES}"):
        single = caption_scores(["a red circle"], [["a red circle"]])
    assert single["cider_d"] == 0.0  # why: every idf is log(1 / 1)
    captions = [f"a {colour} {shape}" for colour in ("red", "blue", "green", "gray") for shape in ("circle", "square", "star")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # twelve images: no warning
        scores = caption_scores(captions, [[c] for c in captions])
    # Exact matches: unigram and bigram-and-up vectors equal; "a" weighs 0, and no 4-gram.
    assert scores["cider_d"] == pytest.approx(10 * 3 / 4)
    assert math.isclose(min(scores["per_item"]), max(scores["per_item"]))


def test_caption_task_refuses_fewer_images_than_the_minimum(tmp_path):
    for n in range(MIN_CIDER_IMAGES):
        write_image(tmp_path / f"{n}.png")
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps({"image": f"{n}.png", "text": f"shape {n}"}) + "\n"
                            for n in range(MIN_CIDER_IMAGES)))
    task = get_task("caption")
    assert len(task.items(TaskOptions(data=str(path)))) == MIN_CIDER_IMAGES
    with pytest.raises(UserError, match=f"needs at least {MIN_CIDER_IMAGES} images.*got 1: raise --limit"):
        task.items(TaskOptions(data=str(path), limit=1))


@pytest.mark.parametrize(("answer", "options", "letter"), [
    ("The answer is Vitamin C.", ["Vitamin D", "Vitamin C", "Vitamin B", "Vitamin A"], "B"),
    ("vitamin C is needed", ["Vitamin D", "Vitamin C", "Vitamin B", "Vitamin A"], "B"),
    ("Go with Plan A", ["Plan B", "Plan A", "Plan C"], "B"),
    ("B, Vitamin C", ["Vitamin D", "Vitamin C", "Vitamin B", "Vitamin A"], "B"),
])
def test_a_capital_letter_inside_an_options_text_is_that_option_not_a_letter(answer, options, letter):
    from polymodal.eval.multiple_choice import chosen_letter

    assert chosen_letter(answer, options) == letter


@pytest.mark.parametrize("reference", ["", "the", "a", "."])
def test_a_vqa_reference_that_normalises_to_nothing_is_refused_naming_the_line(tmp_path, reference):
    import json
    import shutil

    from conftest import DATA
    from polymodal.errors import UserError
    from polymodal.eval.vqa import read_vqa_file

    shutil.copy(f"{DATA}/red_circle.png", tmp_path / "red.png")
    path = tmp_path / "vqa.jsonl"
    path.write_text(json.dumps({"image": "red.png", "question": "q?", "answers": ["red"]}) + "\n"
                    + json.dumps({"image": "red.png", "question": "q?", "answers": [reference]}) + "\n")
    with pytest.raises(UserError, match=r"vqa\.jsonl:2: answer .* is empty once normalised"):
        read_vqa_file(path)
