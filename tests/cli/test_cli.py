"""The command line: output on success; one line and exit code 2 on a user's mistake."""

import json

import pytest

from conftest import DATA, RECIPES
from polymodal.cli.main import main

RECIPE = f"{RECIPES}/tiny-llava.yaml"
STARTER = f"{RECIPES}/starter.yaml"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_list(capsys):
    code, out, _ = run(capsys, "info", "--list")
    assert code == 0
    for name in ("hf", "vit", "patches", "multi", "linear", "mlp", "pixel_shuffle", "perceiver",
                 "qformer", "cabstractor", "inline", "tiny:ARCH", "pkg:PACKAGE/REL/PATH", "gguf:PATH",
                 "multimodal-lm", "dual-encoder"):
        assert name in out
    headings = [line for line in out.splitlines() if line.endswith(":")]
    assert headings == ["encoders:", "connectors:", "fusion:", "model kinds:", "objectives:",
                        "dataset formats:", "eval tasks:", "runners:", "model sources:"]


def test_info_recipe_prints_parts(capsys):
    code, out, _ = run(capsys, "info", RECIPE, "--set", "model.connector.kind=pixel_shuffle")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert rows["encoder.image"][1:3] == ["hf", "tiny:clip"] and rows["encoder.image"][5] == "16"
    assert rows["connector.image"][1] == "pixel_shuffle" and rows["connector.image"][5] == "4"
    assert rows["llm"][1] == "llama"


def test_info_dual_encoder_prints_its_parts(capsys, tmp_path):
    import torch

    from polymodal.config import ModelConfig, from_dict
    from polymodal.contrastive.model import DualEncoder

    config = from_dict(ModelConfig, {"kind": "dual-encoder",
                                     "encoder": {"kind": "cnn", "image_size": 32, "channels": [8, 16]},
                                     "contrastive": {"text": "tiny:bert", "pool": "max", "dim": 16}})
    torch.manual_seed(0)
    DualEncoder.from_config(config).save_pretrained(tmp_path / "model")
    code, out, _ = run(capsys, "info", str(tmp_path / "model"))
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert list(rows) == ["encoder", "projection", "text", "total"]
    assert rows["encoder"][1] == "cnn" and rows["text"][1:3] == ["hf", "tiny:bert"]


def test_chat_answers_once_with_an_image(capsys):
    code, out, err = run(capsys, "chat", RECIPE, "--image", f"{DATA}/red_circle.png",
                         "--max-new-tokens", "4", "What shape?")
    assert code == 0 and out.endswith("\n")
    # stderr says what loads, and that random tiny: parts answer noise (not 256 blank lines unexplained)
    assert err.startswith(f"loading {RECIPE}") and "tiny:clip, tiny:llama: small random models" in err


def test_version_and_a_dual_encoder_in_chat_are_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("polymodal ")
    code, _, err = run(capsys, "chat", f"{RECIPES}/clip-easyvqa.yaml",
                       "--set", "model.contrastive.text=tiny:bert", "hi")
    assert code == 2 and "cannot generate text" in err.splitlines()[-1]


def test_chat_repl(capsys, monkeypatch):
    lines = iter([f"/image {DATA}/red_circle.png", "What shape?", "/image nowhere.png", "/bogus",
                  "/reset", "Hello", "/quit"])
    monkeypatch.setattr("builtins.input", lambda _prompt: next(lines))
    code, _out, err = run(capsys, "chat", RECIPE, "--max-new-tokens", "3")
    assert code == 0
    assert "image attached" in err and "image not found: nowhere.png" in err
    assert "unknown command /bogus" in err and "conversation cleared" in err


@pytest.mark.parametrize("argv, message", [
    (["info", RECIPE, "--set", "model.connector.kind=mpl"], "unknown connector 'mpl'; known: cabstractor"),
    (["info", RECIPE, "--set", "model.encoder.source=tiny:resnet"], "unknown tiny vision architecture 'resnet'; known: clip"),
    (["info", RECIPE, "--set", "model.connector.depth=two"], "model.connector.depth: expected int, got 'two'"),
    (["info", RECIPE, "--set", "model.connector.colour=red"], "model.connector.colour: unknown field"),
    (["info", "pkg:no_such_package/model"], "package 'no_such_package' is not installed"),
    (["info", "gguf:/nowhere/model.gguf"], "GGUF file not found: /nowhere/model.gguf"),
    (["chat", RECIPE, "--image", "missing.png", "hi"], "image not found: missing.png"),
    (["chat", RECIPE, "--image", f"{DATA}/not_an_image.png", "hi"], "not an image:"),
    (["chat", RECIPE, "--image", f"{DATA}/red_circle.png", "<image><image>hi"],
     r"1 image(s) given but 2 <image> placeholder(s)"),
    (["chat", "tiny:llama", "word " * 400], "leaves no room for an answer"),
    (["chat", "tiny:llama", "--max-new-tokens", "500", "hi"], "exceeds the context of 512 tokens"),
    (["chat", "tiny:llama", "--temperature", "-1", "hi"], "temperature must be a number of at least 0"),
    (["chat", "tiny:llama", "--temperature", "nan", "hi"], "temperature must be a number of at least 0"),
    (["train", STARTER, "--set", "stages.0.seed=18446744073709551616"], "stages[0].seed: must be in [0, 2**63)"),
    (["train", STARTER, "--set", "stages.0.weight_decay=-5"], "stages[0].weight_decay: must be at least 0"),
    (["train", STARTER, "--set", "stages.0.lr.connector=-1"], "stages[0].lr.connector: must be positive"),
    (["train", STARTER, "--set", "stages.0.lr.foo=1"], "stages[0].lr.foo: not a part this stage trains"),
    (["train", STARTER, "--set", "stages.0.warmup_ratio=5"], "stages[0].warmup_ratio: must be in [0, 1]"),
    (["train", STARTER, "--set", "stages.0.clip=0"], "stages[0].clip: must be positive"),
    (["train", STARTER, "--set", "stages.0.max_length=0"], "stages[0].max_length: must be at least 1"),
    (["train", STARTER, "--set", "stages.0.data.0.limit=0"], "limit: must be at least 1"),
    (["chat", STARTER, "--set", "model.llm.max_length=-1", "hi"], "model.llm.max_length: must be at least 1"),
])
def test_mistakes_get_one_line_and_exit_2(capsys, argv, message):
    code, _out, err = run(capsys, *argv)
    *progress, last = err.splitlines()
    assert code == 2
    assert last.startswith("polymodal: error: ") and message in last  # the error: one line
    assert all(line.startswith(("loading ", "loaded in ", "note: ")) for line in progress)
    assert "Traceback" not in err


def test_unknown_option_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", RECIPE, "--bogus"])
    assert exit_info.value.code == 2


def test_info_and_chat_on_a_saved_model(capsys, tmp_path, tiny_llava):
    tiny_llava.save_pretrained(tmp_path / "model")
    code, out, _ = run(capsys, "info", str(tmp_path / "model"))
    assert code == 0 and "tiny:clip" in out and "mlp" in out
    code, out, _ = run(capsys, "chat", str(tmp_path / "model"), "--image", f"{DATA}/blue_square.png",
                       "--max-new-tokens", "3", "Colour?")
    assert code == 0


def test_the_starter_recipe_trains_out_of_the_box(capsys, tmp_path):
    code, out, _ = run(capsys, "train", f"{RECIPES}/starter.yaml", "--out", str(tmp_path / "run"))
    assert code == 0 and (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert json.loads(out.strip().splitlines()[-1])["final_loss"] > 0


def test_setting_an_item_of_a_list_the_recipe_lacks_names_it(capsys):
    code, _, err = run(capsys, "train", RECIPE, "--set", "stages.0.steps=5")
    assert code == 2 and "stages: the recipe has no list here, so no item 0 to set" in err


def test_set_on_a_saved_model_is_refused_and_its_tiny_origin_noted(capsys, tmp_path, tiny_llava):
    tiny_llava.save_pretrained(tmp_path / "model")
    code, _, err = run(capsys, "chat", str(tmp_path / "model"), "--set", "model.nope=1", "hi")
    assert code == 2 and "--set applies to recipes only" in err
    code, _, err = run(capsys, "chat", str(tmp_path / "model"), "--max-new-tokens", "2", "hi")
    assert code == 0 and "note: this model was trained from tiny:clip, tiny:llama" in err


def test_a_float_written_without_a_dot_is_a_float(tmp_path):
    from polymodal.config import load_recipe

    assert load_recipe(STARTER, ["stages.0.lr.connector=1e-3"]).stages[0].lr["connector"] == 0.001
