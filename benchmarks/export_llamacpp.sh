#!/usr/bin/env bash
# Does llama.cpp answer what polymodal answers? Export a model with --format gguf, ask
# polymodal (greedy) some text questions and easy-VQA test questions, then ask llama.cpp the
# same through the exported model.gguf + mmproj.gguf (benchmarks/export_llamacpp.py, in its own
# venv, never importing polymodal or torch), and report how many answers agree.
#
#   benchmarks/export_llamacpp.sh [MODEL] [OUT] [IMAGE_QUESTIONS]
#       MODEL  default runs/easy-vqa-smolvlm/model (recipes/easy-vqa-smolvlm.yaml, trained:
#              vit + pixel_shuffle + SmolLM2-135M with LoRA -> mmproj projector idefics3)
#       OUT    default /tmp/polymodal-gguf-export (replaced)
#       IMAGE_QUESTIONS default 40 (easy-VQA test questions in file order)
#   LLAMACPP_VENV=DIR  the llama.cpp venv (default benchmarks/.llamacpp-venv; made by
#                      benchmarks/llamacpp_env.sh when missing)
#
# A benchmark, not a test: it needs a trained run and a venv whose build takes minutes, so a
# pytest would skip almost everywhere; its figures go to benchmarks/RESULTS.md. Run it under
# `flock /tmp/cpu.lock nice -n 5` on a shared machine. Exit 0 only when every answer agrees.
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-runs/easy-vqa-smolvlm/model}"
out="${2:-/tmp/polymodal-gguf-export}"
count="${3:-40}"
venv="${LLAMACPP_VENV:-benchmarks/.llamacpp-venv}"
export HF_HUB_OFFLINE=1

bash benchmarks/llamacpp_env.sh "$venv"
.venv/bin/polymodal export "$model" --format gguf "$out" --overwrite
ls -l "$out"

# polymodal's greedy answers, through the one generation path chat/eval/serve use
.venv/bin/python - "$model" "$out/polymodal-answers.json" "$count" <<'PYTHON'
import json, sys
import easy_vqa
from PIL import Image
from polymodal.build import load_model
from polymodal.engine.generate import Engine
from polymodal.engine.sampling import SamplingParams

model_dir, path, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
engine = Engine(load_model(model_dir))
params = SamplingParams(max_new_tokens=16)
texts = ["What is the capital of France?", "What colour is the sky on a clear day?",
         "Which animal says moo?", "Is fire hot or cold?"]
questions, answers, image_ids = easy_vqa.get_test_questions()
paths = easy_vqa.get_test_image_paths()
asked = [{"image": paths[i], "question": q, "reference": a}
         for q, a, i in list(zip(questions, answers, image_ids))[:count]]
prompts = [{"messages": [{"role": "user", "content": t}]} for t in texts]
prompts += [{"messages": [{"role": "user", "content": "<image>\n" + row["question"]}],
             "images": [Image.open(row["image"]).convert("RGB")]} for row in asked]
done = engine.generate(prompts, params)
spec = {"max_new_tokens": 16,
        "text": [{"prompt": t, "answer": c.text} for t, c in zip(texts, done)],
        "image": [row | {"answer": c.text} for row, c in zip(asked, done[len(texts):])]}
json.dump(spec, open(path, "w"), indent=1)
print(f"polymodal answered {len(texts)} text and {len(asked)} image questions")
PYTHON

# llama.cpp's mtmd logs every prompt and image slice on stderr, whatever `verbose` says
"$venv/bin/python" benchmarks/export_llamacpp.py "$out" --questions "$out/polymodal-answers.json" \
    --out "$out/llamacpp-answers.json" 2> "$out/llamacpp.log"
