"""`polymodal generate` writes the model's drawings as PNGs (and a contact sheet); `polymodal
chat` saves the images an answer draws and prints their paths (issue 17 §4)."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_serve_images import SIZE, as_pixels, chat, drawing_model

from polymodal.cli.main import main
from polymodal.engine.generate import Engine
from polymodal.engine.sampling import SamplingParams


def run(capsys, *argv):
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = drawing_model()
    directory = tmp_path_factory.mktemp("drawing") / "model"
    model.save_pretrained(directory)
    return model, directory


def test_generate_writes_each_image_and_a_contact_sheet(capsys, tmp_path, saved):
    model, directory = saved
    code, out, err = run(capsys, "generate", directory, "Draw a red circle.", "--out", tmp_path / "red_circle.png",
                         "--n", 3, "--cfg", 2.0, "--seed", 0, "--top-k", 8, "--contact-sheet")
    assert code == 0, err
    names = [f"red_circle-{j}.png" for j in range(3)] + ["red_circle-sheet.png"]
    assert out.split() == [str(tmp_path / name) for name in names]
    assert "3 image(s) of 16x16 pixels" in err
    want = Engine(model).generate_images([chat("Draw a red circle.")],
                                         SamplingParams(temperature=1.0, seed=0, top_k=8, guidance_scale=2.0), n=3)
    images = [Image.open(tmp_path / name) for name in names]
    assert [image.size for image in images] == [(SIZE, SIZE)] * 3 + [(2 * SIZE + 2, 2 * SIZE + 2)]
    for image, pixels in zip(images, want):  # the saved model draws what the one in memory draws
        assert (as_pixels(image) - pixels).abs().max() <= 0.5 / 255 + 1e-6
    sheet = np.array(images[3])
    assert (sheet[SIZE + 2 :, SIZE + 2 :] == 128).all() and (sheet[SIZE : SIZE + 2] == 128).all()  # grey
    assert (sheet[:SIZE, SIZE + 2 :] == np.array(images[1])).all()  # the second image: top right
    code, out, _ = run(capsys, "generate", directory, "Draw a red circle.", "--out", tmp_path / "one.png")
    assert code == 0 and out.split() == [str(tmp_path / "one.png")] and Image.open(tmp_path / "one.png").size == (16, 16)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temp files


@pytest.mark.parametrize("argv, says", [
    (["tiny:llama", "Draw", "--out", "{tmp}/x.png"], "this model does not draw images"),
    (["{model}", "Draw", "--out", "{tmp}/missing/x.png"], "the folder {tmp}/missing does not exist"),
    (["{model}", "Draw", "--out", "{tmp}/a_file/x.png"], "{tmp}/a_file is not a folder"),
    (["{model}", "Draw", "--out", "{tmp}/x.jpg"], "is not a .png file name"),
    (["{model}", "Draw", "--out", "{tmp}", "--n", "2"], "is not a .png file name"),
    (["{model}", "Draw", "--out", "{tmp}/x.png", "--n", "0"], "--n must be in [1, 1000], got 0"),
    (["{model}", "Draw", "--out", "{tmp}/x.png", "--n", "100000"], "--n must be in [1, 1000], got 100000"),
    (["{model}", "Draw", "--out", "{tmp}/x.png", "--cfg", "-1"], "guidance_scale must be a number of at least 0"),
])
def test_generate_mistakes_are_one_line_and_exit_2(capsys, tmp_path, saved, argv, says):
    (tmp_path / "a_file").write_text("")
    fill = {"tmp": tmp_path, "model": saved[1]}
    code, _, err = run(capsys, "generate", *(arg.format(**fill) for arg in argv))
    last = err.splitlines()[-1]
    assert code == 2 and last.startswith("polymodal: error: ") and says.format(**fill) in last
    assert "Traceback" not in err and not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("in_the_way, extra", [("x-1.png", []), ("x-sheet.png", ["--contact-sheet"])])
def test_a_folder_in_the_way_of_one_image_writes_none(capsys, tmp_path, saved, in_the_way, extra):
    (tmp_path / in_the_way).mkdir()
    code, _, err = run(capsys, "generate", saved[1], "Draw", "--out", tmp_path / "x.png", "--n", 3, *extra)
    assert code == 2 and err.splitlines()[-1] == f"polymodal: error: --out: {tmp_path / in_the_way} is a folder in the way of an image to write"
    assert [path.name for path in tmp_path.iterdir()] == [in_the_way]  # x-0.png was not written first


def test_write_png_names_the_file_it_cannot_write(tmp_path):
    from polymodal.cli.generate import write_png
    from polymodal.errors import UserError

    with pytest.raises(UserError, match=f"cannot write {tmp_path}/gone/x.png"):
        write_png(tmp_path / "gone" / "x.png", torch.zeros(3, 4, 4))


def test_chat_saves_the_images_an_answer_draws_and_prints_their_paths(capsys, tmp_path, monkeypatch):
    model = drawing_model(begins=True)
    monkeypatch.setattr("polymodal.cli.loading.load_for_command", lambda *args, **kwargs: model)
    folder = tmp_path / "drawn"
    code, out, err = run(capsys, "chat", "any", "--image-dir", folder, "--max-new-tokens", 35, "Hello there")
    assert code == 0, err
    [want] = Engine(model).generate([chat("Hello there")], SamplingParams(max_new_tokens=35))
    text, line = out.rsplit("\n", 2)[:2]
    assert text == want.text and line.startswith("image: ")
    path = line.removeprefix("image: ")
    assert path.startswith(str(folder / "chat-")) and path.endswith("-1.png")
    assert (as_pixels(Image.open(path)) - want.images[0]).abs().max() <= 0.5 / 255 + 1e-6
    lines = iter(["Hello there", "Draw again", "/quit"])
    monkeypatch.setattr("builtins.input", lambda _prompt: next(lines))
    code, out, _ = run(capsys, "chat", "any", "--image-dir", folder, "--max-new-tokens", 35)
    saved = [line.removeprefix("image: ") for line in out.splitlines() if line.startswith("image: ")]
    assert code == 0 and len(saved) == 2 and len(set(saved)) == 2 and len(list(folder.glob("*.png"))) == 3


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_a_quantized_drawing_model_keeps_its_image_rows_and_draws_and_chats(capsys, tmp_path, saved, bits):
    from polymodal.image_generation.codes import CodeHead
    from polymodal.model import MultimodalLM
    from polymodal.quantization import Int4Linear, Int8Linear

    code, _, err = run(capsys, "quantize", saved[1], tmp_path / bits, "--bits", bits)
    assert code == 0, err
    model = MultimodalLM.from_pretrained(tmp_path / bits)
    decoder = model.llm.model
    q_proj = decoder.model.layers[0].self_attn.q_proj
    assert isinstance(getattr(q_proj, "base_layer", q_proj), Int8Linear if bits == "int8" else Int4Linear)
    head = decoder.get_output_embeddings()  # the text head with the image tokens' rows, in float
    assert type(head) is CodeHead and head.weight.dtype == torch.float32
    text_vocab = head.out_features
    with torch.no_grad():
        logits = decoder(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert logits.shape[-1] == text_vocab + head.codes.out_features
    code, _, err = run(capsys, "generate", tmp_path / bits, "Draw a red circle.", "--out", tmp_path / "x.png")
    assert code == 0 and Image.open(tmp_path / "x.png").size == (SIZE, SIZE), err
    code, out, err = run(capsys, "chat", tmp_path / bits, "--max-new-tokens", 5, "hi")
    assert code == 0 and out.endswith("\n") and "Traceback" not in err, err
