"""Run a `polymodal export MODEL --format gguf OUT` directory through llama.cpp alone.

Runs under the llama.cpp venv's python (benchmarks/llamacpp_env.sh) and never imports
polymodal or torch (checked at the end), so the answers are llama.cpp's reading of the files:
model.gguf (the LLM) through `llama_cpp.Llama`, and mmproj.gguf through llama-cpp-python's
multimodal path (`MTMDChatHandler`, llama.cpp's tools/mtmd: the image is decoded, resized and
encoded by llama.cpp's clip graph, its embeddings put where the chat template writes the media
marker). Each prompt is rendered by the chat template stored in model.gguf, as polymodal renders
it; decoding is greedy (temperature 0, no repeat penalty).

    python benchmarks/export_llamacpp.py EXPORT --questions polymodal.json [--out FILE.json]

`--questions` holds polymodal's greedy answers, written by benchmarks/export_llamacpp.sh:
`{"max_new_tokens": N, "text": [{"prompt", "answer"}], "image": [{"image": PATH, "question",
"answer"}]}`; an image prompt is the image followed by "\\n" + question, as `polymodal eval` asks
easy-VQA. Prints each pair of answers and how many agree (exactly, after stripping spaces).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path


def load(directory: Path, threads: int):
    """The exported LLM with its mmproj attached (the text-only export: without one)."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler

    mmproj = directory / "mmproj.gguf"
    handler = MTMDChatHandler(clip_model_path=str(mmproj), verbose=False) if mmproj.exists() else None
    return Llama(model_path=str(directory / "model.gguf"), chat_handler=handler, n_ctx=1024,
                 n_threads=threads, verbose=False, seed=0)


def greedy(llm, content, max_new_tokens: int) -> str:
    """The answer to one user turn (a string, or a list of parts), greedy."""
    reply = llm.create_chat_completion(messages=[{"role": "user", "content": content}],
                                       temperature=0.0, top_k=1, repeat_penalty=1.0,
                                       max_tokens=max_new_tokens)
    return reply["choices"][0]["message"]["content"] or ""


def image_content(path: str, question: str) -> list[dict]:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    suffix = Path(path).suffix.lstrip(".").lower().replace("jpg", "jpeg")
    return [{"type": "image_url", "image_url": {"url": f"data:image/{suffix};base64,{data}"}},
            {"type": "text", "text": "\n" + question}]


def compare(kind: str, rows: list[dict]) -> int:
    """Print each pair; the number that agree exactly (stripped)."""
    same = 0
    for row in rows:
        agree = row["llama_cpp"].strip() == row["answer"].strip()
        same += agree
        shown = row.get("question", row.get("prompt"))
        print(f"[{kind}] {'SAME' if agree else 'DIFF'} {shown!r}: polymodal {row['answer']!r}, "
              f"llama.cpp {row['llama_cpp']!r}")
    print(f"{kind}: {same}/{len(rows)} answers agree")
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--questions", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    spec = json.loads(args.questions.read_text())
    tokens = spec.get("max_new_tokens", 16)
    llm = load(args.export, args.threads)
    start = time.perf_counter()
    for row in spec.get("text", []):
        row["llama_cpp"] = greedy(llm, row["prompt"], tokens)
    for row in spec.get("image", []):
        row["llama_cpp"] = greedy(llm, image_content(row["image"], row["question"]), tokens)
    seconds = time.perf_counter() - start
    agree = {kind: compare(kind, spec.get(kind, [])) for kind in ("text", "image")}
    leaked = [name for name in ("polymodal", "torch") if name in sys.modules]
    if leaked:
        raise SystemExit(f"imported {leaked}: this script must read the export alone")
    summary = {"agree": agree, "asked": {kind: len(spec.get(kind, [])) for kind in agree},
               "seconds": round(seconds, 1)}
    print(json.dumps(summary))
    if args.out:
        args.out.write_text(json.dumps(spec | {"summary": summary}, indent=1))
    return 0 if all(agree[kind] == len(spec.get(kind, [])) for kind in agree) else 1


if __name__ == "__main__":
    sys.exit(main())
