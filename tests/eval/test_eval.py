"""easy-VQA evaluation: normalisation, per-type accuracy, outputs, and the command line."""

import json

import pytest
from PIL import Image

from conftest import RECIPES, tiny_model
from polymodal.cli.main import main
from polymodal.data.easy_vqa import question_type
from polymodal.engine.generate import Completion, Engine
from polymodal.eval.metrics import accuracy_by, confusion, normalize
from polymodal.eval.run import evaluate
from polymodal.eval.tasks import TaskOptions

QUESTIONS = [["what shape is this?", "circle", 0], ["what color is the shape?", "red", 0],
             ["is there a circle?", "yes", 0], ["what shape is this?", "triangle", 1],
             ["what color is the shape?", "blue", 1], ["is there a blue shape?", "yes", 1]]
# What the fake model answers, question by question: raw text before normalising.
ANSWERS = {("what shape is this?", 0): " Circle. ", ("what color is the shape?", 0): "RED",
           ("is there a circle?", 0): "no", ("what shape is this?", 1): "circle",
           ("what color is the shape?", 1): "blue\n", ("is there a blue shape?", 1): "Yes!"}


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "images").mkdir()
    for image_id, colour in ((0, (200, 0, 0)), (1, (0, 0, 200))):  # told apart by colour
        Image.new("RGB", (32, 32), colour).save(tmp_path / "images" / f"{image_id}.png")
    (tmp_path / "questions.json").write_text(json.dumps(QUESTIONS))
    (tmp_path / "answers.txt").write_text("circle\ntriangle\nred\nblue\nyes\nno\n")
    return tmp_path


@pytest.fixture
def scripted(monkeypatch):
    """Engine.generate answers from ANSWERS, so the metrics are known by hand."""
    def generate(self, prompts, params=None):
        out = []
        for prompt in prompts:
            question = prompt["messages"][0]["content"].removeprefix("<image>\n")
            image_id = int(prompt["images"][0][2].mean() > 0.5)  # pixels [3, S, S]: blue is image 1
            out.append(Completion(ANSWERS.get((question, image_id), "?"), [], "stop", 0))
        return out
    monkeypatch.setattr(Engine, "generate", generate)


def test_normalize_and_types():
    assert normalize("  The  Circle. ") == "the circle"
    assert normalize("Yes!") == "yes"
    assert [question_type(a) for a in ("yes", "no", "circle", "teal")] == ["yes/no", "yes/no", "shape", "colour"]


def test_accuracy_by_type_and_confusion():
    rows = [{"type": "a", "correct": True, "reference": "x", "prediction": "x"},
            {"type": "a", "correct": False, "reference": "x", "prediction": "z"},
            {"type": "b", "correct": True, "reference": "y", "prediction": "y"}]
    assert accuracy_by(rows, "type") == {"a": 0.5, "b": 1.0}
    assert confusion(rows) == (["x", "y", "z"], [[1, 0, 1], [0, 1, 0]])


def test_easy_vqa_on_a_folder_writes_its_outputs(folder, tmp_path, scripted, tiny_llava):
    results, _ = evaluate(tiny_llava, "easy-vqa", TaskOptions(data=str(folder)), out=tmp_path / "eval")
    assert results["n"] == 6 and results["accuracy"] == pytest.approx(4 / 6)
    assert results["accuracy_by_type"] == {"colour": 1.0, "shape": 0.5, "yes/no": 0.5}
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert rows[0]["prediction"] == "Circle." and rows[0]["normalized"] == "circle"  # as said, as scored
    assert rows[0]["correct"] and rows[0]["prompt"] == QUESTIONS[0][0]
    assert (tmp_path / "eval" / "confusion.png").stat().st_size > 1000
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| accuracy | 0.6667 |" in report and "| yes/no | 0.5000 |" in report
    assert json.loads((tmp_path / "eval" / "results.json").read_text()) == results


def test_limit_takes_a_fixed_seeded_sample(folder, scripted, tiny_llava):
    first, rows = evaluate(tiny_llava, "easy-vqa", TaskOptions(data=str(folder), limit=3))
    again, rows_again = evaluate(tiny_llava, "easy-vqa", TaskOptions(data=str(folder), limit=3))
    assert first == again and first["n"] == 3 and rows == rows_again


def test_eval_command(folder, capsys):
    from polymodal.cli.main import main

    assert main(["eval", f"{RECIPES}/tiny-llava.yaml", "--task", "easy-vqa", "--data", str(folder),
                 "--limit", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"task", "split", "n", "accuracy"} <= out.keys() and out["n"] == 2
    assert main(["eval", f"{RECIPES}/tiny-llava.yaml", "--task", "vqa-v9"]) == 2
    error = capsys.readouterr().err
    assert "unknown task 'vqa-v9'; known: audio-image, caption, easy-vqa," in error and "zeroshot" in error


def test_analyze_finds_no_drop_for_blank_images_when_the_model_ignores_them(folder, monkeypatch, tiny_llava):
    """A model that answers from the question alone loses nothing when its image is
    blanked or swapped, and everything when its question goes."""
    from polymodal.eval.analyze import analyze
    from polymodal.eval.tasks import get_task

    by_question = {"what shape is this?": "circle", "what color is the shape?": "red", "is there a circle?": "yes",
                   "is there a blue shape?": "yes"}
    monkeypatch.setattr(Engine, "generate", lambda self, prompts, params=None: [
        Completion(by_question.get(p["messages"][0]["content"].removeprefix("<image>\n"), "?"), [], "stop", 0)
        for p in prompts])
    results = analyze(tiny_llava, get_task("easy-vqa"), TaskOptions(data=str(folder)), emap_size=0)
    assert results["full"] == pytest.approx(4 / 6)
    assert results["drop"]["blank image"] == 0 and results["drop"]["shuffled images"] == 0
    assert results["no question"] == 0 and results["drop"]["no question"] == pytest.approx(4 / 6)


def test_analyze_drops_when_the_model_reads_its_image(folder, tmp_path, scripted, tiny_llava):
    from polymodal.eval.analyze import analyze
    from polymodal.eval.tasks import get_task

    # `scripted` answers by image (red or blue); blanked, both images are dark: all look like image 0.
    results = analyze(tiny_llava, get_task("easy-vqa"), TaskOptions(data=str(folder)), emap_size=0,
                      out=tmp_path / "analysis")
    assert results["full"] == pytest.approx(4 / 6) and results["shuffled images"] < results["full"]
    assert (tmp_path / "analysis" / "reliance.png").stat().st_size > 1000
    assert "| no question |" in (tmp_path / "analysis" / "report.md").read_text()


def test_emap_is_exact_for_an_additive_scorer_and_blind_to_a_multiplicative_one():
    import torch

    from polymodal.eval.emap import diagonal_choices, emap_projection

    generator = torch.Generator().manual_seed(0)
    text, image = torch.randn(40, 1, 3, generator=generator), torch.randn(1, 40, 3, generator=generator)
    additive = text + image  # [40, 40, 3]
    torch.testing.assert_close(emap_projection(additive), additive)
    assert diagonal_choices(emap_projection(additive)) == diagonal_choices(additive)
    # The answer is whether a question's bit and an image's bit agree (XOR): nothing additive
    # can say it. Both kinds of bit are balanced, and true pairs agree half the time.
    question_bits = torch.tensor([1.0, -1.0] * 20)  # + - + - ...
    image_bits = torch.tensor([1.0, 1.0, -1.0, -1.0] * 10)  # + + - - ...
    agree = question_bits[:, None] * image_bits[None, :]  # [40, 40]
    multiplicative = torch.stack([agree, -agree], dim=-1)  # class 0 when they agree
    truth = [0 if a > 0 else 1 for a in agree.diagonal().tolist()]
    full = sum(c == t for c, t in zip(diagonal_choices(multiplicative), truth)) / 40
    additive_accuracy = sum(c == t for c, t in zip(diagonal_choices(emap_projection(multiplicative)), truth)) / 40
    assert full == 1.0 and additive_accuracy <= 0.5


def test_analyze_command_runs_emap_on_a_real_tiny_model(folder, capsys):
    from polymodal.cli.main import main

    assert main(["analyze", f"{RECIPES}/tiny-llava.yaml", "--task", "easy-vqa", "--data", str(folder),
                 "--emap-size", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["emap"]["n"] == 2 and 0 <= out["emap"]["projection"] <= 1
    assert set(out["drop"]) == {"blank image", "shuffled images", "no question"}


def test_eval_takes_a_system_message_and_an_answer_length(folder, monkeypatch, capsys, tmp_path):
    """`eval --system S --max-new-tokens N`: every question asked after S, answers of up to N."""
    seen = []

    def generate(self, prompts, params=None):
        seen.extend((p["messages"], params.max_new_tokens) for p in prompts)
        return [Completion("circle", [], "stop", 0) for _ in prompts]

    monkeypatch.setattr(Engine, "generate", generate)
    tiny_llava_dir = tmp_path / "model"
    tiny_model({"kind": "hf", "source": "tiny:clip"}, {"kind": "mlp"}).save_pretrained(tiny_llava_dir)
    code = main(["eval", str(tiny_llava_dir), "--task", "easy-vqa", "--data", str(folder),
                 "--system", "Answer in one word.", "--max-new-tokens", "3"])
    assert code == 0 and len(seen) == len(QUESTIONS)
    assert all(messages[0] == {"role": "system", "content": "Answer in one word."} and tokens == 3
               for messages, tokens in seen)


def test_a_stopped_eval_says_what_it_kept(folder, monkeypatch, capsys, tmp_path):
    def interrupted(self, prompts, params=None):
        raise KeyboardInterrupt  # as Ctrl-C, or SIGTERM through cli.signals.stop_on

    monkeypatch.setattr(Engine, "generate", interrupted)
    tiny_model({"kind": "hf", "source": "tiny:clip"}, {"kind": "mlp"}).save_pretrained(tmp_path / "model")
    code = main(["eval", str(tmp_path / "model"), "--task", "easy-vqa", "--data", str(folder),
                 "--out", str(tmp_path / "eval")])
    assert code == 130 and "stopped by SIGINT; nothing was written" in capsys.readouterr().err
    assert not (tmp_path / "eval" / "results.json").exists()


def test_a_full_disk_while_writing_eval_outputs_is_one_line(folder, scripted, monkeypatch, capsys, tmp_path):
    import errno

    import polymodal.eval.report as report

    tiny_model({"kind": "hf", "source": "tiny:clip"}, {"kind": "mlp"}).save_pretrained(tmp_path / "model")

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(report, "atomic_write", full)
    code = main(["eval", str(tmp_path / "model"), "--task", "easy-vqa", "--data", str(folder),
                 "--out", str(tmp_path / "eval")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("polymodal: error: disk full writing ") and "results.json" in last


@pytest.mark.parametrize("out, says", [("a_file", "--out: {tmp}/a_file is a file; give a folder for the results"),
                                       ("a_file/eval", "--out: cannot create {tmp}/a_file/eval: Not a directory")])
def test_an_out_that_cannot_hold_results_is_refused_before_the_model_loads(folder, capsys, tmp_path, out, says):
    (tmp_path / "a_file").write_text("kept")
    # the model does not exist: the --out error comes first, so nothing was loaded or evaluated
    code = main(["eval", str(tmp_path / "no_model"), "--task", "easy-vqa", "--data", str(folder),
                 "--out", str(tmp_path / out)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last == "polymodal: error: " + says.format(tmp=tmp_path)
    assert (tmp_path / "a_file").read_text() == "kept"
