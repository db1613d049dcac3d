"""Dual-encoder models on disk, zero-shot and retrieval metrics, embeddings, and the image
index: build, add, search, reload, and its errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.config import ModelConfig, from_dict
from polymodal.contrastive.model import DualEncoder
from polymodal.errors import UserError
from polymodal.eval.retrieval import recall_at
from polymodal.search import ImageIndex

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "gray": (128, 128, 128)}


def dual_encoder(seed: int = 0) -> DualEncoder:
    config = from_dict(ModelConfig, {"kind": "dual-encoder",
                                     "encoder": {"kind": "cnn", "image_size": 32, "channels": [8, 16]},
                                     "contrastive": {"text": "tiny:bert", "pool": "max", "dim": 16}})
    torch.manual_seed(seed)
    return DualEncoder.from_config(config).eval()


@pytest.fixture
def saved(tmp_path):
    directory = tmp_path / "model"
    dual_encoder().save_pretrained(directory)
    return directory


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, colour in COLOURS.items():
        image = Image.new("RGB", (32, 32), "white")
        image.paste(colour, (8, 8, 24, 24))
        image.save(folder / f"{name}.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "truncated.png").write_bytes((folder / "red.png").read_bytes()[:60])
    return folder


def test_a_saved_dual_encoder_loads_back_with_the_same_embeddings(saved):
    from polymodal.build import load_any

    model, again = dual_encoder(), load_any(str(saved))
    assert isinstance(again, DualEncoder) and (saved / "text").is_dir()
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(again.encode_images(pixels), model.encode_images(pixels))
        torch.testing.assert_close(again.encode_texts(["a red circle"]), model.encode_texts(["a red circle"]))


def test_recall_at_k_by_hand():
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.3, 0.1], [0.1, 0.5, 0.4]])  # 3 queries x 3 items
    relevant = torch.tensor([[False, True, False], [True, False, False], [False, False, True]])
    # query 0: relevant item ranked 2nd; query 1: 2nd; query 2: 2nd.
    assert recall_at(scores, relevant, (1, 2)) == {"R@1": 0.0, "R@2": 1.0}
    relevant[0, 0] = True  # now query 0's top hit is relevant
    assert recall_at(scores, relevant, (1,))["R@1"] == pytest.approx(1 / 3)


def test_index_build_add_search_and_reload(saved, images, tmp_path):
    from polymodal.build import load_any

    model = load_any(str(saved))
    first = tmp_path / "first"
    first.mkdir()
    for name in ("red", "green"):
        (first / f"{name}.png").write_bytes((images / f"{name}.png").read_bytes())
    index, skipped = ImageIndex.build(model, saved, first)
    assert len(index) == 2 and skipped == []
    skipped = index.add(model, images)  # another folder: four images and two bad files
    assert sorted(reason.split(":")[0] for _, reason in skipped) == ["not an image", "unreadable image"]
    assert len(index) == 6
    assert index.add(model, images) == skipped and len(index) == 6  # indexed paths are not added twice
    hits = index.search(model, image=images / "blue.png", k=3)
    assert hits[0].path == str((images / "blue.png").resolve()) and hits[0].score == pytest.approx(1.0, abs=1e-5)
    index.save(tmp_path / "index")
    loaded = ImageIndex.load(tmp_path / "index")
    again = loaded.search(model, image=images / "blue.png", k=3)
    assert [(h.path, round(h.score, 5)) for h in again] == [(h.path, round(h.score, 5)) for h in hits]
    assert [h.path for h in loaded.search(model, text="a blue square", k=6)] != []


def test_index_errors(saved, images, tmp_path):
    from polymodal.build import load_any

    index, _ = ImageIndex.build(load_any(str(saved)), saved, images)
    with pytest.raises(UserError, match="the query text is empty"):
        index.search(load_any(str(saved)), text="  ")
    other = tmp_path / "other"
    dual_encoder(seed=1).save_pretrained(other)
    with pytest.raises(UserError, match="built with another model"):
        index.check_model(other)
    index.check_model(saved)  # the same model passes
    with pytest.raises(UserError, match="not an image index"):
        ImageIndex.load(tmp_path)


def test_index_search_and_embed_commands(saved, images, tmp_path, capsys):
    from polymodal.cli.main import main

    assert main(["index", "build", str(saved), "--images", str(images), "--out", str(tmp_path / "idx")]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["count"] == 4 and "skipped 2 file(s)" in captured.err
    assert main(["search", str(tmp_path / "idx"), "--text", "a red square", "-k", "2",
                 "--sheet", str(tmp_path / "sheet.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("1\t")
    assert Image.open(tmp_path / "sheet.png").size[0] > 300
    assert main(["search", str(tmp_path / "idx"), "--text", ""]) == 2
    assert "empty" in capsys.readouterr().err
    (tmp_path / "texts.txt").write_text("a red square\na blue square\n")
    assert main(["embed", str(saved), "--texts", str(tmp_path / "texts.txt"), "--out", str(tmp_path / "t.npz")]) == 0
    stored = np.load(tmp_path / "t.npz")
    assert stored["embeddings"].shape == (2, 16) and list(stored["ids"]) == ["a red square", "a blue square"]
    assert main(["eval", str(saved), "--task", "easy-vqa"]) == 2
    assert "needs a generative model" in capsys.readouterr().err


def test_zeroshot_and_retrieval_tasks_on_a_label_file(saved, images, tmp_path):
    from polymodal.build import load_any
    from polymodal.eval.run import evaluate
    from polymodal.eval.tasks import TaskOptions

    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"image": f"images/{n}.png", "label": n}) + "\n" for n in COLOURS))
    model = load_any(str(saved))
    results, rows = evaluate(model, "zeroshot", TaskOptions(data=str(labels), templates=["a {} square"]),
                             out=tmp_path / "zs")
    assert results["n"] == 4 and 0 <= results["accuracy"] <= 1 and len(rows) == 4
    assert (tmp_path / "zs" / "confusion_label.png").is_file()
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"image": f"images/{n}.png", "text": f"a {n} square"}) + "\n"
                                for n in COLOURS))
    results, _ = evaluate(model, "retrieval", TaskOptions(data=str(captions)))
    assert results["text_to_image"]["R@10"] == 1.0 and results["captions"] == 4  # 4 items: all within 10
