"""The plain-transformers side of the export proofs: a script run in a SUBPROCESS that never
imports polymodal (checked at its end) and loads exported directories as a user would,
with `trust_remote_code=False`.

Tests call `run_plain(task, runs, work)`: it writes the job to `work/job.json`, runs this
file with `python -I` (no current directory or PYTHONPATH on sys.path), and returns each
run's result by name, its tensors (`logits`) loaded from a safetensors file. One subprocess
serves many runs, so the ~10 s of importing torch and transformers are paid once.

A task is a function below taking one run's fields and returning (JSON record, tensors);
add one to TASKS for another format (idefics3, gguf).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TIMEOUT = 600


def run_plain(task: str, runs: list[dict], work: Path) -> dict[str, dict]:
    """Run `task` on each of `runs` (dicts with a unique "name" and the task's fields) in a
    subprocess; {name: result record, with "logits" etc. as torch tensors}."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "job.json").write_text(json.dumps({"task": task, "runs": runs}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-I", str(Path(__file__).resolve()), str(work)],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors.torch import load_file

    results = {}
    for run in runs:
        record = json.loads((work / f"{run['name']}.json").read_text())
        record.update(load_file(str(work / f"{run['name']}.safetensors")))
        results[run["name"]] = record
    return results


# ---------------------------------------------------------------- the subprocess side


def image_text_to_text(directory: str, image: str, messages: list[dict], max_new_tokens: int = 8):
    """What a user of an exported image-text model does: AutoProcessor renders the messages
    with the directory's chat template and expands the image token, the model (loaded by
    AutoModelForImageTextToText, no missing or unexpected keys allowed) gives logits for
    every position, and `generate` answers greedily with the directory's generation config.

    Returns ({classes, loading_info, input_ids, answer_ids, answer}, {"logits": [T, V],
    "pixel_values": the processor's pixels})."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(directory, trust_remote_code=False)
    model, info = AutoModelForImageTextToText.from_pretrained(
        directory, output_loading_info=True, trust_remote_code=False)
    model.eval()
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[Image.open(image)], text=prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answer = generated[0, inputs["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos])
    if answer and answer[-1] in stops:
        answer = answer[:-1]  # generate keeps the stop token; polymodal's answers end before it
    record = {
        "model_class": type(model).__name__,
        "processor_class": type(processor).__name__,
        "image_processor_class": type(processor.image_processor).__name__,
        "loading_info": {key: sorted(map(str, value)) for key, value in info.items()},
        "prompt": prompt,
        "input_ids": inputs["input_ids"][0].tolist(),
        "answer_ids": answer,
        "answer": processor.decode(answer, skip_special_tokens=True),
    }
    return record, {"logits": logits.float().contiguous(),
                    "pixel_values": inputs["pixel_values"].float().contiguous()}


TASKS = {"image_text_to_text": image_text_to_text}


def main(work: Path) -> None:
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(2)
    job = json.loads((work / "job.json").read_text())
    for run in job["runs"]:
        fields = {key: value for key, value in run.items() if key != "name"}
        record, tensors = TASKS[job["task"]](**fields)
        save_file(tensors, str(work / f"{run['name']}.safetensors"))
        (work / f"{run['name']}.json").write_text(json.dumps(record))
    assert not any(name == "polymodal" or name.startswith("polymodal.") for name in sys.modules), \
        "the plain-transformers side imported polymodal"


if __name__ == "__main__":
    main(Path(sys.argv[1]))
