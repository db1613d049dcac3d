"""`text-to-image`: how well a model draws what it is asked (issue 17 §5).

Each of the 24 prompts of easy-VQA's captions ("Draw a red circle.": 3 shapes x 8 colours,
data/easy_vqa_draw.py) is drawn `--images-per-prompt` times (default 8) through
`Engine.generate_images` (sampling: `--temperature`, default 1; `--top-k`; `--cfg`, the
classifier-free guidance scale, default 1 = none; `--seed`: image j of every prompt samples
with seed + j, so the images do not depend on the batch size). A judge trained here on
easy-VQA's labelled images (eval/judge.py; its test accuracy is in the results) names each
image's shape and colour, or "none" for an image that shows no shape. Metrics:

- `shape`, `color`, `both`: the share of images showing the asked shape, colour, both (the
  headline), overall, per shape (`by_shape`), per colour (`by_color`) and per prompt;
- `diversity`: per prompt, the mean pairwise L2 pixel distance between its images divided by
  the same figure for the real images of that caption in easy-VQA's `--split` (test): 1 = as
  varied as the data, 0 = identical copies; the mean over prompts;
- `distinct`: per prompt, its distinct images (as 8-bit pixels) over its images (1: all
  differ; 1/n: n copies of one); the mean over prompts.

Files: results.json, predictions.jsonl (prompt, sample index, judged shape and colour),
report.md and grid.png (prompts in rows, labelled; samples in columns; a green frame where
the judge saw both the asked shape and colour, red where not). `--limit N`: a seeded sample
of N prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from polymodal.data.easy_vqa import COLORS, SHAPES, easy_vqa_folder, full_captions
from polymodal.data.easy_vqa_draw import draw_prompts
from polymodal.engine.generate import Engine
from polymodal.engine.sampling import SamplingParams
from polymodal.errors import UserError
from polymodal.eval.judge import (
    COLOR_NAMES,
    IMAGE_SIZE,
    SHAPE_NAMES,
    load_judge,
    read_pixels,
    resized,
)
from polymodal.eval.tasks import (
    Item,
    Task,
    TaskOptions,
    check_data_folder,
    register_task,
    seeded_sample,
)


@dataclass
class Drawings:
    """What one evaluation drew and what the judge saw: pixels [P * n, 3, S, S] in [0, 1],
    prompt-major; judged shape and colour indices [P * n]."""

    items: list[Item]
    per_prompt: int
    pixels: torch.Tensor
    shapes: torch.Tensor
    colors: torch.Tensor


def draws_images(model) -> bool:
    """Whether `model` has an image output (an image tokenizer, model.image_output)."""
    return getattr(model, "image_tokenizer", None) is not None


@register_task("text-to-image")
class TextToImage(Task):
    """Images drawn from easy-VQA's 24 captions, graded by a judge trained here."""

    headline = "both"
    draws = True

    def __init__(self):
        self.drawings: Drawings | None = None  # the last run's, for pictures()

    def items(self, options: TaskOptions) -> list[Item]:
        """One item per prompt ("Draw a red circle."; reference "a red circle"), in the
        shape-major order of draw_prompts; `options.limit`: a seeded sample of them."""
        prompts = draw_prompts()
        chosen = sorted(seeded_sample(list(range(len(prompts))), options.limit, options.seed))
        return [Item(f"{prompts[i].color}-{prompts[i].shape}", prompts[i].text, [],
                     [f"a {prompts[i].color} {prompts[i].shape}"],
                     {"shape": prompts[i].shape, "color": prompts[i].color}) for i in chosen]

    def run(self, model, options: TaskOptions, batch_size: int,
            items: list[Item] | None = None) -> tuple[dict, list[dict]]:
        """(metrics, rows: one per image). Raises UserError for a model that does not draw,
        for --shots, or for a task file in --data (the prompts are built in)."""
        if not draws_images(model):
            raise UserError(f"task {self.name} needs a model that draws images (model.image_output); "
                            f"this one does not")
        if options.shots:
            raise UserError(f"--shots: task {self.name} draws from one-line prompts; it takes no examples")
        check_data_folder(options, "easy-vqa")
        if options.data and Path(options.data).is_file():
            raise UserError(f"--data: task {self.name} builds its prompts; give an easy-VQA folder, not a file")
        items = self.items(options) if items is None else items
        judge = load_judge()
        pixels = draw(model, items, options, batch_size)
        shapes, colors = judge.classify(pixels)
        self.drawings = Drawings(items, options.images_per_prompt, pixels, shapes, colors)
        reference = full_captions(easy_vqa_folder(options.split, options.data))
        metrics = drawing_metrics(self.drawings, reference)
        settings = {"images_per_prompt": options.images_per_prompt, "guidance_scale": options.guidance_scale,
                    "temperature": options.temperature, "top_k": options.top_k}
        return {**metrics, "judge_accuracy": judge.accuracy, **settings}, drawing_rows(self.drawings)

    def score(self, items: list[Item], predictions: list[str]) -> tuple[dict, list[dict]]:
        raise UserError(f"task {self.name} scores drawn images, not text answers (use polymodal eval)")

    def without_question(self, item: Item) -> Item:
        raise UserError(f"task {self.name} has no images to blank or shuffle (use polymodal eval)")

    def pictures(self, results: dict, rows: list[dict], out: Path) -> None:
        if self.drawings is not None:
            diversity = "n/a" if results["diversity"] is None else f"{results['diversity']:.2f}"
            title = (f"text-to-image: both {results['both']:.1%}, shape {results['shape']:.1%}, "
                     f"colour {results['color']:.1%}, diversity {diversity}")
            plot_grid(self.drawings, out / "grid.png", title)


def draw(model, items: list[Item], options: TaskOptions, batch_size: int) -> torch.Tensor:
    """pixels [len(items) * n, 3, S, S] in [0, 1], prompt-major: n images per item, at most
    `batch_size` images per engine call (the engine doubles the rows under guidance)."""
    count = options.images_per_prompt
    params = SamplingParams(temperature=options.temperature, top_k=options.top_k, seed=options.seed,
                            guidance_scale=options.guidance_scale)
    prompts = [item.prompt() for item in items]
    with tqdm(total=len(items) * count, desc="drawing", unit="image") as bar:
        return Engine(model).generate_images_in_batches(prompts, params, count, batch_size, bar.update)


# ---------------------------------------------------------------- metrics


def mean_pairwise_distance(pixels: torch.Tensor) -> float | None:
    """pixels [M, 3, S, S] -> the mean L2 distance over the M (M - 1) / 2 pairs (None when M < 2)."""
    count = len(pixels)
    if count < 2:
        return None
    flat = pixels.flatten(1).double()
    return float(torch.cdist(flat, flat).sum() / (count * (count - 1)))


def distinct_share(pixels: torch.Tensor) -> float:
    """pixels [M, 3, S, S] in [0, 1] -> distinct images (as 8-bit pixels) / M: 1 when all
    differ, 1 / M for M copies of one image."""
    quantised = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).flatten(1)
    return len(torch.unique(quantised, dim=0)) / max(1, len(pixels))


def prompt_metrics(drawings: Drawings, index: int, reference: dict[str, list[str]]) -> dict:
    """The shape, colour and both shares, diversity and distinct share of prompt `index`'s images."""
    item, n = drawings.items[index], drawings.per_prompt
    rows = slice(index * n, (index + 1) * n)
    shape_right = drawings.shapes[rows] == SHAPES.index(item.info["shape"])
    color_right = drawings.colors[rows] == COLORS.index(item.info["color"])
    pixels = resized(drawings.pixels[rows])
    drawn, real = mean_pairwise_distance(pixels), None
    if reference.get(item.references[0]):
        real = mean_pairwise_distance(read_pixels(reference[item.references[0]]).float() / 255)
    return {"shape": float(shape_right.float().mean()), "color": float(color_right.float().mean()),
            "both": float((shape_right & color_right).float().mean()),
            "diversity": drawn / real if drawn is not None and real else None,
            "distinct": distinct_share(drawings.pixels[rows])}


def drawing_metrics(drawings: Drawings, reference: dict[str, list[str]]) -> dict:
    """Overall, per-shape, per-colour and per-prompt metrics (module docstring); `reference`:
    caption -> the real images it describes (easy_vqa.full_captions)."""
    per_prompt = [prompt_metrics(drawings, index, reference) for index in range(len(drawings.items))]

    def mean(rows: list[dict], key: str) -> float | None:
        values = [row[key] for row in rows if row[key] is not None]
        return sum(values) / len(values) if values else None

    def group(attribute: str, names: tuple[str, ...]) -> dict[str, dict]:
        grouped = {}
        for name in names:
            rows = [row for row, item in zip(per_prompt, drawings.items) if item.info[attribute] == name]
            if rows:  # every prompt has n images: the mean over prompts is the share over images
                grouped[name] = {key: mean(rows, key) for key in ("shape", "color", "both", "diversity")}
        return grouped

    return {**{key: mean(per_prompt, key) for key in ("both", "shape", "color", "diversity", "distinct")},
            "images": len(drawings.pixels), "prompts": len(drawings.items),
            "by_shape": group("shape", SHAPES), "by_color": group("color", COLORS),
            "by_prompt": {item.question: row for item, row in zip(drawings.items, per_prompt)}}


def drawing_rows(drawings: Drawings) -> list[dict]:
    """predictions.jsonl: one row per image: its prompt, sample index and what the judge saw."""
    rows = []
    for index, item in enumerate(drawings.items):
        for sample in range(drawings.per_prompt):
            shape = SHAPE_NAMES[int(drawings.shapes[index * drawings.per_prompt + sample])]  # or "none"
            color = COLOR_NAMES[int(drawings.colors[index * drawings.per_prompt + sample])]
            rows.append({"id": f"{item.id}:{sample}", "prompt": item.question, "sample": sample,
                         "shape": shape, "color": color, "prediction": f"a {color} {shape}",
                         "reference": item.references[0], "shape_correct": shape == item.info["shape"],
                         "color_correct": color == item.info["color"],
                         "correct": shape == item.info["shape"] and color == item.info["color"]})
    return rows


# ---------------------------------------------------------------- the picture


def plot_grid(drawings: Drawings, out: Path, title: str) -> None:
    """Prompts (rows, labelled) against samples (columns), each image framed green where the
    judge saw the asked shape and colour, red where not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, size, frame = drawings.per_prompt, IMAGE_SIZE, 2
    cell = size + 2 * frame
    canvas = torch.ones(3, len(drawings.items) * cell, n * cell)
    pixels = resized(drawings.pixels)
    for index, item in enumerate(drawings.items):
        for sample in range(n):
            row = index * n + sample
            right = (int(drawings.shapes[row]) == SHAPES.index(item.info["shape"])
                     and int(drawings.colors[row]) == COLORS.index(item.info["color"]))
            top, left = index * cell, sample * cell
            canvas[:, top : top + cell, left : left + cell] = torch.tensor(
                [0.1, 0.7, 0.2] if right else [0.85, 0.1, 0.1]).view(3, 1, 1)
            canvas[:, top + frame : top + frame + size, left + frame : left + frame + size] = pixels[row]
    figure, axis = plt.subplots(figsize=(1.6 + n * cell / 100, 0.7 + len(drawings.items) * cell / 100))
    axis.imshow(canvas.permute(1, 2, 0).numpy(), interpolation="nearest")
    axis.set_yticks([i * cell + cell / 2 for i in range(len(drawings.items))],
                    [item.question for item in drawings.items], fontsize=8)
    axis.set_xticks([s * cell + cell / 2 for s in range(n)], [str(s) for s in range(n)], fontsize=8)
    axis.set_title(title, fontsize=9)
    axis.tick_params(length=0)
    figure.tight_layout()
    figure.savefig(out, dpi=100, bbox_inches="tight")  # the prompts' labels whole
    plt.close(figure)
