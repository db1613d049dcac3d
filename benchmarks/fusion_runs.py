"""The comparison of fusion kinds on easy-VQA (issue 16 §4): one row per trained run.

For each run directory (`polymodal train recipes/easy-vqa-KIND.yaml --out RUN`, then
`polymodal eval RUN/model --task easy-vqa --limit 2000 --out RUN/eval`): test accuracy and
per question type (RUN/eval/results.json), training seconds and seconds per step of the last
stage (RUN/summary.json, RUN/metrics.jsonl), the parameters the last stage trained, and the
model's greedy answer to a text-only question beside the base LLM's (does the text survive?).

    python benchmarks/fusion_runs.py runs/easy-vqa runs/easy-vqa-adapter runs/easy-vqa-expert

Prints a markdown table; decode speed is benchmarks/fusion.py's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from polymodal.config import load_recipe
from polymodal.engine.generate import Engine
from polymodal.engine.sampling import SamplingParams
from polymodal.model import MultimodalLM

QUESTION = "What is the capital of France?"


def text_answer(model) -> str:
    prompt = {"messages": [{"role": "user", "content": QUESTION}]}
    return Engine(model).generate([prompt], SamplingParams(max_new_tokens=12))[0].text.strip()


def trained_parameters(model, parts: list[str]) -> int:
    """Parameters of the named parts (`llm.lora`: the adapters alone)."""
    model.set_trainable(parts)
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def row(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    results = json.loads((run / "eval" / "results.json").read_text())
    recipe = load_recipe(run / "recipe.yaml")
    last = recipe.stages[-1]
    stage = summary["stages"][last.name]
    model = MultimodalLM.from_pretrained(run / "model")
    with_lora = recipe.model.llm.lora is not None
    return {"run": run.name, "fusion": recipe.model.fusion.kind, "accuracy": results["accuracy"],
            "by_type": results.get("by_type") or results.get("accuracy_by_type") or {},
            "train_seconds": summary["train_seconds"], "tune_seconds_per_step": stage["seconds"] / last.steps,
            "trained": trained_parameters(model, list(last.train)), "answer": text_answer(model),
            "lora": with_lora}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    rows = [row(run) for run in args.runs]
    print("| run | fusion | accuracy | by type | train s | tune s/step | trained params | "
          f"'{QUESTION}' |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for each in rows:
        types = ", ".join(f"{name} {value:.1%}" for name, value in sorted(each["by_type"].items()))
        print(f"| {each['run']} | {each['fusion']} | {each['accuracy']:.1%} | {types} | "
              f"{each['train_seconds']:.0f} | {each['tune_seconds_per_step']:.2f} | "
              f"{each['trained'] / 1e6:.2f} M | {each['answer']!r} |")


if __name__ == "__main__":
    main()
