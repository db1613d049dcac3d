"""Faults of stored files (issue 21, section 8) and of the slot cache's memory (section 6):
locks on shared outputs, indexes written as a set, damaged model directories, the KV cache
allocated by need."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from polymodal.errors import UserError
from polymodal.locks import exclusive


def test_a_held_lock_refuses_a_second_holder_naming_the_holder(tmp_path):
    lock = tmp_path / "thing.lock"
    with exclusive(lock, "the thing"):
        with pytest.raises(UserError) as error, exclusive(lock, "the thing"):
            pass
        message = str(error.value)
        assert "the thing" in message and str(lock) in message
        assert f"pid {os.getpid()}" in message and "\n" not in message
    with exclusive(lock, "the thing"):  # released on exit: taken again
        pass


def test_a_lock_held_by_another_process_is_refused_and_dies_with_it(tmp_path):
    lock = tmp_path / "thing.lock"
    code = ("import sys, time; from pathlib import Path; from polymodal.locks import exclusive\n"
            "with exclusive(Path(sys.argv[1]), 'x'):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"pid {holder.pid}"), exclusive(lock, "x"):
            pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive(lock, "x"):  # a killed holder leaves no stale lock
        pass


# --- Item 1: the slot cache takes memory by need -------------------------------------------


def _llm():
    import torch

    from conftest import tiny_model

    model = tiny_model(llm={"source": "tiny:llama"})
    torch.manual_seed(0)
    with torch.no_grad():  # larger random weights: logits that differ by prompt and by step
        for parameter in model.llm.model.parameters():
            parameter.normal_(0, 0.3)
    return model.llm.model


def _cache_elements(cache) -> int:
    return cache.kv.elements()


def test_a_fresh_slot_cache_holds_a_small_length_and_grows_with_the_same_logits():
    import torch

    from polymodal.engine.runners import LlamaRunner
    from polymodal.engine.slots import SlotCache

    llm = _llm()
    cache = SlotCache(llm, max_batch=4, max_length=512, initial_length=4)
    layers, runner = len(cache.kv.keys), cache.decoder
    per_slot = runner.kv_heads * runner.head_dim
    full = 2 * layers * 4 * 512 * per_slot
    assert _cache_elements(cache) == 2 * layers * 1 * 4 * per_slot < full // 100
    assert cache.rotary[0].shape[0] == 4  # the rotary table too: a context may be millions long
    embed = llm.get_input_embeddings()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, embed.num_embeddings, (1, size), generator=generator) for size in (3, 9, 40)]
    alone, rows, logits = [], [], []
    with torch.inference_mode():
        for prompt in prompts:  # each admitted while the earlier ones decode
            reference = LlamaRunner(llm)
            expect = reference.prefill(embed(prompt), torch.ones_like(prompt), 64)
            got = cache.admit(embed(prompt))
            torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
            alone.append(reference)
            rows.append(got[0].argmax())
            for _ in range(5):
                logits = cache.step(torch.stack(rows))
                for index, reference in enumerate(alone):
                    expect = reference.step(rows[index][None])[0]
                    torch.testing.assert_close(logits[index], expect, rtol=1e-5, atol=1e-5)
                rows = list(logits.argmax(-1))
    rows_now, length_now = cache.capacity
    assert rows_now >= 3 and 40 + 15 <= length_now < 512  # grown by need, not to the maximum
    assert cache.rotary[0].shape[0] == length_now
    for row in reversed(range(3)):
        cache.release(row)
    assert _cache_elements(cache) == 2 * layers * 1 * 4 * per_slot  # idle again: memory given back


def test_a_failed_allocation_while_growing_leaves_the_running_rows_intact(monkeypatch):
    """Out of memory while the cache grows: the request that asked fails; the cache keeps
    every layer and the running row decodes on as if nothing happened."""
    import torch

    from polymodal.engine.runners import LlamaRunner
    from polymodal.engine.slots import SlotCache

    llm = _llm()
    cache = SlotCache(llm, max_batch=4, max_length=512, initial_length=4)
    embed = llm.get_input_embeddings()
    prompt = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        reference = LlamaRunner(llm)
        row = reference.prefill(embed(prompt), torch.ones_like(prompt), 64)[0].argmax()
        cache.admit(embed(prompt))
        before = cache.capacity
        calls, new_zeros = [], torch.Tensor.new_zeros

        def failing(self, *args, **kwargs):
            if len(args) == 4 and args[0] == 2:  # a grown layer [rows 2, H_kv, length, hd]
                calls.append(1)
                if len(calls) == 3:  # part-way through building the grown layers
                    raise RuntimeError("out of memory (simulated)")
            return new_zeros(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "new_zeros", failing)
        with pytest.raises(RuntimeError, match="out of memory"):
            cache.admit(embed(torch.arange(40)[None] % 50))
        monkeypatch.setattr(torch.Tensor, "new_zeros", new_zeros)
        assert cache.capacity == before and len(cache.kv.keys) == len(cache.kv.values) == len(llm.model.layers)
        torch.testing.assert_close(cache.step(row[None])[0], reference.step(row[None])[0],
                                   rtol=1e-5, atol=1e-5)


# --- Items 2 and 3: an index is written as a set, by one writer at a time -------------------


@pytest.fixture
def dual(tmp_path):
    """(saved dual-encoder folder, a folder of two images, a folder of two more)."""
    import torch
    from PIL import Image

    from polymodal.config import ModelConfig, from_dict
    from polymodal.contrastive.model import DualEncoder

    config = from_dict(ModelConfig, {"kind": "dual-encoder",
                                     "encoder": {"kind": "cnn", "image_size": 32, "channels": [8, 16]},
                                     "contrastive": {"text": "tiny:bert", "pool": "max", "dim": 16}})
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    DualEncoder.from_config(config).eval().save_pretrained(model_dir)
    folders = []
    for name, colours in (("first", ["red", "green"]), ("more", ["blue", "gray"])):
        folder = tmp_path / name
        folder.mkdir()
        for colour in colours:
            Image.new("RGB", (32, 32), colour).save(folder / f"{colour}.png")
        folders.append(folder)
    return model_dir, *folders


def _built_index(dual, tmp_path):
    from polymodal.build import load_any
    from polymodal.search import ImageIndex

    model_dir, first, _ = dual
    model = load_any(str(model_dir))
    index, _ = ImageIndex.build(model, model_dir, first)
    index.save(tmp_path / "index")
    return model, tmp_path / "index"


@pytest.mark.parametrize("fail_at", [("write", 1), ("write", 2), ("write", 3), ("replace", 1), ("replace", 2)])
def test_a_crash_during_save_leaves_the_last_good_index_searchable(dual, tmp_path, monkeypatch, fail_at):
    from polymodal.search import ImageIndex
    from polymodal.search import index as index_module

    model, folder = _built_index(dual, tmp_path)
    grown = ImageIndex.load(folder)
    grown.add(model, dual[2])
    assert len(grown) == 4
    calls = {"write": 0, "replace": 0}
    originals = {"write": index_module._write_file, "replace": os.replace}

    def failing(kind):
        def call(*args, **kwargs):
            calls[kind] += 1
            if calls[kind] == fail_at[1] and kind == fail_at[0]:
                raise OSError("killed")  # the process dies here: nothing after it runs
            return originals[kind](*args, **kwargs)
        return call

    with monkeypatch.context() as patch:
        patch.setattr(index_module, "_write_file", failing("write"))
        patch.setattr(os, "replace", failing("replace"))
        with pytest.raises(OSError, match="killed"):
            grown.save(folder)
    old = ImageIndex.load(folder)
    assert len(old) == 2 and len(old.search(model, text="a red square", k=5)) == 2
    grown.save(folder)  # the next save after the crash succeeds and is whole
    assert len(ImageIndex.load(folder)) == 4


def test_an_index_of_the_older_layout_loads_and_grows(dual, tmp_path):
    from polymodal.search import ImageIndex

    model, folder = _built_index(dual, tmp_path)
    version = folder / "versions" / (folder / "current").read_text().strip()
    older = tmp_path / "older"
    older.mkdir()
    for name in ("index.faiss", "items.jsonl", "meta.json"):  # the three files, side by side
        shutil.copy(version / name, older / name)
    index = ImageIndex.load(older)
    assert len(index) == 2
    index.add(model, dual[2])
    index.save(older)
    assert len(ImageIndex.load(older)) == 4 and not (older / "meta.json").exists()


def test_a_second_index_writer_fails_naming_the_holder(dual, tmp_path, capsys):
    from polymodal.cli.main import main
    from polymodal.search import ImageIndex
    from polymodal.search.index import index_lock

    _, folder = _built_index(dual, tmp_path)
    capsys.readouterr()
    with index_lock(folder):  # another `index add` is running
        assert main(["index", "add", str(folder), "--images", str(dual[2])]) == 2
        message = capsys.readouterr().err.strip()
    assert str(folder) in message and f"pid {os.getpid()}" in message and "\n" not in message
    assert len(ImageIndex.load(folder)) == 2  # nothing was written by the refused writer
    assert main(["index", "add", str(folder), "--images", str(dual[2])]) == 0
    assert len(ImageIndex.load(folder)) == 4


def test_two_concurrent_index_adds_lose_no_images(dual, tmp_path):
    from polymodal.search import ImageIndex

    _, folder = _built_index(dual, tmp_path)
    extra = tmp_path / "extra"
    shutil.copytree(dual[1], extra)  # two more images, at other paths
    command = [sys.executable, "-m", "polymodal.cli.main", "index", "add", str(folder), "--images"]
    runs = [subprocess.Popen([*command, str(source)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for source in (dual[2], extra)]
    done = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    succeeded = sum(code == 0 for code, _ in done)
    assert all(code in (0, 2) for code, _ in done) and succeeded >= 1
    refused = [err for code, err in done if code == 2]
    assert all("is in use" in err.strip().splitlines()[-1] for err in refused)
    assert len(ImageIndex.load(folder)) == 2 + 2 * succeeded  # a success's images are all there


# --- Item 4: a damaged model directory is one line naming the file ---------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from conftest import tiny_model

    directory = tmp_path_factory.mktemp("saved") / "model"
    tiny_model({"kind": "hf", "source": "tiny:clip"}, {"kind": "mlp", "depth": 2}).save_pretrained(directory)
    return directory


def _header(path):
    import json

    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _with_header(path, header, data):
    import json

    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def _first_tensor(header):
    return next(name for name in header if name != "__metadata__")


def _truncate(directory):
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _zero_bytes(directory):
    (directory / "model.safetensors").write_bytes(b"")


def _huge_header_length(directory):
    weights = directory / "model.safetensors"
    weights.write_bytes((1 << 62).to_bytes(8, "little") + weights.read_bytes()[8:])


def _pickle_file(directory):
    import pickle

    (directory / "model.safetensors").write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))


def _torch_save_file(directory):
    import torch

    torch.save({"weight": torch.zeros(4)}, directory / "model.safetensors")


def _header_not_json(directory):
    weights = directory / "model.safetensors"
    _, data = _header(weights)
    text = b"{not json" + b" " * 50
    weights.write_bytes(len(text).to_bytes(8, "little") + text + data)


def _offsets_past_the_end(directory):
    weights = directory / "model.safetensors"
    header, data = _header(weights)
    name = _first_tensor(header)
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end + len(data) + 1000]
    _with_header(weights, header, data)


def _unknown_dtype(directory):
    weights = directory / "model.safetensors"
    header, data = _header(weights)
    header[_first_tensor(header)]["dtype"] = "PICKLE"
    _with_header(weights, header, data)


def _wrong_shape(directory):
    """A tensor of the same bytes but another shape (its rows and columns swapped)."""
    weights = directory / "model.safetensors"
    header, data = _header(weights)
    name = next(n for n, info in header.items() if n != "__metadata__" and len(info["shape"]) == 2
                and info["shape"][0] != info["shape"][1])
    header[name]["shape"] = header[name]["shape"][::-1]
    _with_header(weights, header, data)


def _wrong_dtype(directory):
    """A float32 tensor declared as int32: the same bytes, the wrong kind of number."""
    weights = directory / "model.safetensors"
    header, data = _header(weights)
    name = next(n for n, info in header.items() if n != "__metadata__" and info["dtype"] == "F32")
    header[name]["dtype"] = "I32"
    _with_header(weights, header, data)


def _config(directory, change):
    import json

    path = directory / "config.json"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def _huge_vocabulary(directory):  # 10^9 x width 64 floats: 256 GB
    _config(directory, lambda r: r["architectures"]["llm"]["config"].update(vocab_size=10**9))


def _huge_width(directory):
    _config(directory, lambda r: r["architectures"]["llm"]["config"].update(intermediate_size=10**8))


def _millions_of_layers(directory):
    _config(directory, lambda r: r["architectures"]["llm"]["config"].update(num_hidden_layers=10**7))


def _config_width_not_the_weights(directory):  # small, but not the saved weights' shape
    _config(directory, lambda r: r["architectures"]["llm"]["config"].update(hidden_size=96))


def _config_not_json(directory):
    (directory / "config.json").write_text('{"format": "polymodal", "model": ')


def _config_model_not_an_object(directory):
    _config(directory, lambda r: r.update(model=[1, 2]))


def _unknown_model_type(directory):
    _config(directory, lambda r: r["architectures"]["llm"]["config"].update(model_type="no-such-model"))


# (the file the line names, the damage, what else the line says)
DAMAGE = [
    ("model.safetensors", _truncate, "truncated"),
    ("model.safetensors", _zero_bytes, "not a safetensors file"),
    ("model.safetensors", _huge_header_length, "not a safetensors file"),
    ("model.safetensors", _pickle_file, "not a safetensors file"),
    ("model.safetensors", _torch_save_file, "not a safetensors file"),
    ("model.safetensors", _header_not_json, "not JSON"),
    ("model.safetensors", _offsets_past_the_end, "past the end"),
    ("model.safetensors", _unknown_dtype, "damaged header entry"),
    ("model.safetensors", _wrong_shape, "has shape"),
    ("model.safetensors", _wrong_dtype, "is I32"),
    ("model.safetensors", _config_width_not_the_weights, "hidden_size"),
    ("config.json", _huge_vocabulary, "vocab_size"),
    ("config.json", _huge_width, "intermediate_size"),
    ("config.json", _millions_of_layers, "num_hidden_layers"),
    ("config.json", _config_not_json, "not valid JSON"),
    ("config.json", _config_model_not_an_object, "damaged"),
    ("config.json", _unknown_model_type, "no-such-model"),
]


@pytest.mark.parametrize(("named", "damage", "says"), DAMAGE, ids=[d.__name__ for _, d, _ in DAMAGE])
def test_a_damaged_model_directory_is_one_line_naming_the_file(saved_model, tmp_path, capsys, named, damage,
                                                               says):
    from polymodal.cli.main import main

    directory = tmp_path / "model"
    shutil.copytree(saved_model, directory)
    damage(directory)
    capsys.readouterr()
    assert main(["chat", str(directory), "hi", "--max-new-tokens", "2"]) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines()
             if not line.startswith("loading ")]  # what is loading, then the error
    assert len(lines) == 1 and str(directory / named) in lines[0] and says in lines[0], lines


def test_the_undamaged_copy_loads_and_answers(saved_model, tmp_path, capsys):
    from polymodal.cli.main import main

    directory = tmp_path / "model"
    shutil.copytree(saved_model, directory)
    assert main(["chat", str(directory), "hi", "--max-new-tokens", "2"]) == 0


def test_a_damaged_dual_encoder_is_one_line_naming_the_file(dual, tmp_path, capsys):
    from polymodal.cli.main import main

    model_dir = dual[0]
    _truncate(model_dir)
    (tmp_path / "texts.txt").write_text("a red square\n")
    capsys.readouterr()
    assert main(["embed", str(model_dir), "--texts", str(tmp_path / "texts.txt"),
                 "--out", str(tmp_path / "t.npz")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(model_dir / "model.safetensors") in lines[0], lines


@pytest.mark.parametrize(("damaged", "content"), [
    ("index.faiss", b""), ("index.faiss", b"IHNf" + b"\x00" * 7), ("items.jsonl", b"{not json\n"),
    ("meta.json", b"[1, 2]"), ("current", b"../../etc\n")])
def test_a_damaged_index_is_one_line_naming_the_file(dual, tmp_path, capsys, damaged, content):
    from polymodal.cli.main import main

    _, folder = _built_index(dual, tmp_path)
    version = folder / "versions" / (folder / "current").read_text().strip()
    path = folder / damaged if damaged == "current" else version / damaged
    path.write_bytes(content)
    capsys.readouterr()
    assert main(["search", str(folder), "--text", "a red square"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], lines
