"""Issue 16 §4's two claims, on tiny models trained from scratch on easy-VQA at several LLM sizes.

The claims come from "Scaling Laws for Native Multimodal Models" (Shukor et al. 2025):
(1) `early-late`: early fusion (`patches`: raw 16x16 pixel patches, one linear map into the
    LLM, no vision tower; Fuyu) holds a small edge over late fusion (`vit`, a ViT of half the
    LLM's width and 2 layers, trained with it, and an MLP connector; LLaVA) at small scale;
(2) `moe`: with mixture-of-experts feed-forwards (`moe` fusion on the early-fusion model: 4
    routed experts as wide as the LLM's hidden size beside its own MLP, top-1), experts open
    to every token (modality-agnostic) beat experts split by modality (MoMa: 2 for image
    tokens, 2 for text), at equal active and total parameters.

Every run trains its LLM from scratch (`tiny:llama?hidden_size=W&num_hidden_layers=L`,
`llm.init: random`) with all its parts, on easy-VQA's training split: half the samples one
question each, half the image's caption ("a red triangle"). Without the captions, models of
this size trained for 1,200 steps answered no better than a blind guess from the question's
text (67% of the test questions; docs/fusion.md). Compute: every run of a row (one LLM size) takes the same steps x batch (the same
samples, the same LLM tokens); its parameters and training FLOPs are counted: FLOPs = 6 x
parameters a token passes x tokens (Kaplan et al. 2020's C = 6ND; the LLM's input
embeddings and the attention scores' n_ctx term are left out; the LM head runs only on
answer tokens and is left out too). Held out: the mean next-token loss on the answers of
the questions on the first --loss-images images of easy-VQA's test split (~10 each), and the accuracy on a fixed,
seeded sample of --questions test questions (`polymodal eval --task easy-vqa --limit N`).

Each run is its own process (`--one`), started under `--lock` (flock, nice 5) so that other
work can run between them. Written: OUT/RUN/ (the run directory, recipe.yaml, result.json),
OUT/results.jsonl, the numbers as JSON (--json), one picture per study (--images), and a
markdown table on stdout.

    python benchmarks/fusion_claims.py [--study both|early-late|moe] [--sizes 64x2:0,1 96x3 128x4]
        [--steps 1000] [--batch-size 16] [--seeds 0] [--lock /tmp/cpu.lock] [--reuse]

With the defaults: 16 runs, about 20 minutes of 2 CPU cores (the 64x2 row has two seeds, to
see how far one seed's result moves).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

STUDIES = {"early-late": ("early", "late"), "moe": ("moe-agnostic", "moe-aware")}
LABELS = {"early": "early fusion (patches + linear)", "late": "late fusion (ViT + MLP connector)",
          "moe-agnostic": "MoE, modality-agnostic experts", "moe-aware": "MoE, modality-aware experts (MoMa)"}
COLOURS = {"early": "#c44e52", "late": "#4c72b0", "moe-agnostic": "#55a868", "moe-aware": "#dd8452"}
IMAGE_SIZE, PATCH_SIZE = 64, 16  # easy-VQA's 64x64 images: 16 image tokens per question
EXPERTS, IMAGE_EXPERTS, TOP_K = 4, 2, 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=("both", *STUDIES), default="both")
    parser.add_argument("--sizes", nargs="+", default=["64x2:0,1", "96x3", "128x4"],
                        help="LLM sizes as WIDTHxLAYERS (hidden size x decoder layers), with :SEED,SEED "
                             "for seeds of that size other than --seeds")
    parser.add_argument("--steps", type=int, default=1000, help="training steps of every run")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of every part")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--questions", type=int, default=500, help="test questions answered per run")
    parser.add_argument("--loss-images", type=int, default=100,
                        help="test images whose questions (~10 each) give the held-out loss")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lock", default=None, help="a lock file each run takes (flock) while it runs")
    parser.add_argument("--reuse", action="store_true", help="keep runs whose result.json exists")
    parser.add_argument("--out", default="runs/fusion-claims")
    parser.add_argument("--images", default="docs/images", help="where fusion-claims-STUDY.png go")
    parser.add_argument("--json", default="docs/images/fusion-claims-results.json", help="the numbers")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one (JSON spec)
    return parser.parse_args(argv)


def parse_size(text: str, seeds: list[int]) -> tuple[int, int, list[int]]:
    """'128x4' -> (128, 4, seeds); '64x2:0,1' -> (64, 2, [0, 1]); exits with a one-line
    message when malformed."""
    size, _, own_seeds = text.lower().partition(":")
    try:
        width, layers = (int(part) for part in size.split("x"))
        chosen = [int(seed) for seed in own_seeds.split(",")] if own_seeds else seeds
    except ValueError:
        sys.exit(f"--sizes: {text!r} is not WIDTHxLAYERS or WIDTHxLAYERS:SEED,SEED (e.g. 128x4, 64x2:0,1)")
    return width, layers, chosen


def llm_source(width: int, layers: int) -> str:
    """A tiny Llama of this width and depth: heads of 32 features (at least 2), half as many
    key-value heads (grouped-query attention, as the default tiny:llama), MLP 2x the width."""
    heads = max(2, width // 32)
    return (f"tiny:llama?hidden_size={width}&num_hidden_layers={layers}"
            f"&num_attention_heads={heads}&num_key_value_heads={heads // 2}")


def model_section(variant: str, width: int, layers: int, seed: int) -> dict:
    """The recipe's `model` for one variant at one LLM size."""
    llm = {"source": llm_source(width, layers), "init": "random", "init_seed": seed, "system_prompt": "Answer."}
    if variant == "late":
        vision = width // 2
        encoder = {"kind": "vit", "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "width": vision,
                   "depth": 2, "heads": max(2, vision // 32)}
        return {"encoder": encoder, "connector": {"kind": "mlp", "depth": 2}, "llm": llm}
    model = {"encoder": {"kind": "patches", "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE},
             "connector": {"kind": "linear"}, "llm": llm}
    if variant.startswith("moe"):
        model["fusion"] = {"kind": "moe", "experts": EXPERTS, "top_k": TOP_K, "expert_size": width,
                           "modality_aware": variant == "moe-aware"}
        if variant == "moe-aware":
            model["fusion"]["image_experts"] = IMAGE_EXPERTS
    return model


def recipe(spec: dict) -> dict:
    """The whole recipe of one run: one stage training every part from scratch."""
    variant, seed = spec["variant"], spec["seed"]
    parts = {"early": ["connector", "llm"], "late": ["encoder", "connector", "llm"]}.get(
        variant, ["connector", "llm", "fusion"])
    held_out = [{"format": "easy-vqa", "split": "test", "turns": 1, "limit": spec["loss_images"]}]
    stage = {"name": "train", "train": parts, "lr": dict.fromkeys(parts, spec["lr"]), "steps": spec["steps"],
             "batch_size": spec["batch_size"], "share_prefix": 8, "warmup_ratio": 0.05, "schedule": "wsd",
             "decay_ratio": 0.2, "seed": seed, "log_every": 10,
             "data": [{"format": "easy-vqa", "split": "train", "turns": 1},
                      {"format": "easy-vqa-captions", "split": "train"}],
             "validation": {"every": spec["steps"], "data": held_out, "batch_size": 64}}
    return {"name": f"fusion-claims-{spec['name']}", "model": model_section(variant, *spec["size"], seed),
            "stages": [stage]}


def parameters(module) -> int:
    return sum(parameter.numel() for parameter in module.parameters()) if module is not None else 0


def counts(model, tokens: int, images: int) -> dict:
    """Parameters (all; the LLM's without its input embeddings; active per token) and the
    training FLOPs estimate 6 x (LLM and fusion parameters a token passes x LLM tokens +
    encoder and connector parameters x image tokens)."""
    llm = model.llm.model
    embeddings = llm.get_input_embeddings().weight.numel()
    decoder = parameters(llm) - embeddings  # tied: the LM head is the embedding matrix
    fusion = model.fusion if parameters(model.fusion) else None
    active_fusion = 0
    if fusion is not None:  # `moe`: every token runs the router and top_k of the routed experts
        for routed in fusion.layers.values():
            active_fusion += routed.router.weight.numel() + fusion.config.top_k * parameters(routed.experts[0])
    vision = parameters(model.encoders) + parameters(model.connectors)
    image_tokens = images * model.encoders["image"].num_tokens
    return {"parameters": parameters(model), "llm_parameters": decoder, "fusion_parameters": parameters(fusion),
            "vision_parameters": vision, "active_parameters": decoder + active_fusion + vision,
            "flops": 6 * ((decoder + active_fusion) * tokens + vision * image_tokens)}


def run_one(spec: dict, out: Path) -> dict:
    """Train, count and evaluate one configuration (in this process); result.json in its folder."""
    import torch
    import yaml

    from polymodal.build import load_any
    from polymodal.config import load_recipe
    from polymodal.eval.run import evaluate
    from polymodal.eval.tasks import TaskOptions
    from polymodal.safe_files import atomic_write
    from polymodal.train.run import train

    torch.set_num_threads(spec["threads"])
    run_dir = out / spec["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "fusion-claims-recipe.yaml").write_text(yaml.safe_dump(recipe(spec), sort_keys=False))
    started = time.perf_counter()
    summary = train(load_recipe(run_dir / "fusion-claims-recipe.yaml"), run_dir, overwrite=True)
    model = load_any(str(run_dir / "model")).eval()
    held_out = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                if '"val_loss"' in line][-1]["val_loss"]
    results, _rows = evaluate(model, "easy-vqa", TaskOptions(split="test", limit=spec["questions"], seed=0),
                              batch_size=64, out=run_dir / "eval")
    result = {**spec, "width": spec["size"][0], "layers": spec["size"][1], "held_out_loss": held_out,
              "accuracy": results["accuracy"], "accuracy_by_type": results["accuracy_by_type"],
              "train_seconds": summary["train_seconds"], "tokens": summary["tokens"], "samples": summary["samples"],
              "final_train_loss": summary["final_loss"], "seconds": time.perf_counter() - started,
              **counts(model, summary["tokens"], summary["samples"])}
    atomic_write(run_dir / "result.json", lambda path: path.write_text(json.dumps(result, indent=1)))
    return result


def specs(args: argparse.Namespace) -> list[dict]:
    """Every run of the chosen studies: size x seed x variant, smallest size first."""
    variants = [variant for study, names in STUDIES.items() if args.study in ("both", study) for variant in names]
    runs = []
    for width, layers, seeds in (parse_size(text, args.seeds) for text in args.sizes):
        for seed in seeds:
            for variant in variants:
                runs.append({"name": f"{variant}-{width}x{layers}-seed{seed}", "variant": variant, "size": [width, layers],
                             "seed": seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                             "questions": args.questions, "loss_images": args.loss_images,
                             "threads": args.threads})
    return runs


def launch(spec: dict, args: argparse.Namespace) -> dict:
    """One run as its own process (under the lock when given); its result.json."""
    result = Path(args.out) / spec["name"] / "result.json"
    if args.reuse and result.is_file():
        return json.loads(result.read_text())
    command = [sys.executable, os.path.abspath(__file__), "--one", json.dumps(spec), "--out", args.out]
    if args.lock:
        command = ["flock", args.lock, "nice", "-n", "5", "timeout", "900", *command]
    print(f"[{time.strftime('%H:%M:%S')}] {spec['name']}{' (waits for ' + args.lock + ')' if args.lock else ''}",
          file=sys.stderr, flush=True)
    log = Path(args.out) / f"{spec['name']}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as output:
        code = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode
    if code != 0 or not result.is_file():
        sys.exit(f"{spec['name']} failed (exit {code}); its output: {log}")
    return json.loads(result.read_text())


def summarise(results: list[dict]) -> list[dict]:
    """One row per variant and size: the mean (and spread, over seeds) of each measure."""
    groups: dict = {}
    for result in results:
        groups.setdefault((result["variant"], result["width"], result["layers"]), []).append(result)
    rows = []
    for (variant, width, layers), runs in groups.items():
        row = {"variant": variant, "width": width, "layers": layers, "seeds": [run["seed"] for run in runs]}
        for key in ("accuracy", "held_out_loss", "train_seconds"):
            values = [run[key] for run in runs]
            row[key] = statistics.fmean(values)
            row[f"{key}_spread"] = (max(values) - min(values)) / 2
        types = runs[0]["accuracy_by_type"]
        row["accuracy_by_type"] = {name: statistics.fmean(run["accuracy_by_type"][name] for run in runs)
                                   for name in types}
        for key in ("parameters", "active_parameters", "vision_parameters", "fusion_parameters", "flops",
                    "steps", "batch_size", "tokens"):
            row[key] = runs[0][key]
        rows.append(row)
    return rows


def blind_accuracy(predictions: Path) -> dict:
    """The accuracy of answering without the image, on the questions one run answered
    (its eval/predictions.jsonl): the training split's most common answer to the exact same
    question text ("is there not a red shape?" -> yes). {"accuracy": .., "by_type": {..}}."""
    from collections import Counter, defaultdict

    from polymodal.data.easy_vqa import easy_vqa_folder, read_questions

    answers: dict = defaultdict(Counter)
    for question, answer, _image in read_questions(easy_vqa_folder("train", None)):
        answers[question][answer] += 1
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    correct: dict = defaultdict(list)
    for row in rows:
        guess = answers[row["prompt"]].most_common(1)[0][0] if row["prompt"] in answers else "yes"
        correct[row["type"]].append(guess == row["reference"])
    return {"accuracy": sum(map(sum, correct.values())) / len(rows),
            "by_type": {name: sum(values) / len(values) for name, values in correct.items()}}


def _count(number: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if number >= size:
            return f"{number / size:.1f}{unit}" if unit != "G" else f"{number / size:.0f}{unit}"
    return str(int(number))


def markdown_table(rows: list[dict]) -> str:
    """One line per study, size and variant."""
    lines = ["| study | LLM | variant | params (active) | train FLOPs | test acc | shape / colour / yes-no | "
             "held-out loss | train s |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for study, variants in STUDIES.items():
        for row in (row for row in rows if row["variant"] in variants):
            spread = f" ± {100 * row['accuracy_spread']:.1f}" if len(row["seeds"]) > 1 else ""
            types = " / ".join(f"{100 * row['accuracy_by_type'].get(name, 0):.0f}"
                               for name in ("shape", "colour", "yes/no"))
            lines.append(f"| {study} | {row['width']}x{row['layers']} | {row['variant']} | "
                         f"{_count(row['parameters'])} ({_count(row['active_parameters'])}) | {row['flops']:.2e} | "
                         f"{100 * row['accuracy']:.1f}%{spread} | {types} | {row['held_out_loss']:.3f} | "
                         f"{row['train_seconds']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], study: str, path: Path, steps: int, batch_size: int, blind: float) -> None:
    """Test accuracy and held-out loss against active parameters and training FLOPs (log),
    one line per variant (error bars: half the range over seeds); `blind`, the accuracy
    without the image, as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    figure, axes = plt.subplots(2, 2, figsize=(9.6, 6.8), sharex="col")
    for axis in axes.flat:  # before the ticks are set: a change of scale resets them
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(NullFormatter())  # overlapping labels within a decade
    for column in (0, 1):
        axes[0][column].axhline(100 * blind, color="#8c8c8c", linestyle="--", linewidth=1,
                                label=f"no image: the question's commonest answer ({100 * blind:.1f}%)")
    for number, variant in enumerate(STUDIES[study]):
        line = sorted((row for row in rows if row["variant"] == variant), key=lambda row: row["flops"])
        for column, key in enumerate(("active_parameters", "flops")):
            xs = [row[key] for row in line]
            for axis, measure, scale in ((axes[0][column], "accuracy", 100), (axes[1][column], "held_out_loss", 1)):
                axis.errorbar(xs, [scale * row[measure] for row in line],
                              yerr=[scale * row[f"{measure}_spread"] for row in line], marker="o", capsize=3,
                              color=COLOURS[variant], label=LABELS[variant])
                if number == 0:  # ticks at the first variant's points: one decade has no major tick
                    axis.set_xticks(xs, [_count(x) for x in xs])
                for x, row in zip(xs, line):  # sizes named once, beside the first variant's points
                    if number == 0:
                        axis.annotate(f"{row['width']}x{row['layers']}", (x, scale * row[measure]), fontsize=7,
                                      textcoords="offset points", xytext=(4, 4))
    for column, name in enumerate(("active parameters (trained, per token)", "training FLOPs (6ND estimate)")):
        axes[1][column].set_xlabel(name)
        for row_index in (0, 1):
            axes[row_index][column].grid(alpha=0.3)
    axes[0][0].set_ylabel("easy-VQA test accuracy %")
    axes[1][0].set_ylabel("held-out loss (answer tokens)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    figure.suptitle(f"Issue 16 §4, {study}: tiny LLMs (WIDTHxLAYERS) from scratch, {steps} steps x {batch_size} "
                    f"questions each", fontsize=10)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.one is not None:
        run_one(json.loads(args.one), out)
        return 0
    results = [launch(spec, args) for spec in specs(args)]
    (out / "results.jsonl").write_text("".join(json.dumps(result) + "\n" for result in results))
    rows = summarise(results)
    blind = blind_accuracy(out / results[0]["name"] / "eval" / "predictions.jsonl")  # every run's questions
    for study in STUDIES:
        if args.study in ("both", study):
            plot(rows, study, Path(args.images) / f"fusion-claims-{study}.png", args.steps, args.batch_size,
                 blind["accuracy"])
    table = markdown_table(rows)
    print(table)
    print(f"without the image (the training split's commonest answer to the same question): "
          f"{100 * blind['accuracy']:.1f}%, by type {json.dumps(blind['by_type'])}")
    numbers = {"study": "fusion_claims", "date": date.today().isoformat(), "steps": args.steps,
               "batch_size": args.batch_size, "lr": args.lr, "seeds": args.seeds, "questions": args.questions,
               "loss_images": args.loss_images, "threads": args.threads,
               "run_seconds": round(sum(result["seconds"] for result in results), 1),  # lock waits left out
               "blind": blind, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(numbers, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
