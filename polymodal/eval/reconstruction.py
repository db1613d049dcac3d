"""`reconstruction`: how well a model's image tokenizer gives images back through its codes.

The images are the dataset's (`--split`, `--limit`: easy-VQA's test split by default, one
per image). Metrics: PSNR in dB (10 log10(1 / MSE) of each image's pixels in [0, 1], the
mean over images), and for a tokenizer with codes how much of the codebook the split uses
(the share of codes that occur at least once) and the codes' perplexity (exp of the
entropy of their frequencies: the number of equally used codes with the same spread; the
codebook size at most). On easy-VQA's own splits (no `--data`), also `judged`: the share of
reconstructions whose shape, colour and both the judge (eval/judge.py, a CNN trained on
easy-VQA's images, the one `text-to-image` grades drawings with) names as it names the
original: whether the codes keep what a drawing must show. A picture, `reconstruction.png`:
16 originals above their reconstructions.

The tokenizer is the model's `image_tokenizer` (a model that draws images) or the one inside
an `image-tokens` image encoder (encoders/image_tokens.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from polymodal.encoders.image_tokenizer import ImageTokenizer
from polymodal.encoders.image_tokens import image_tokenizer_of
from polymodal.errors import UserError
from polymodal.eval.judge import load_judge
from polymodal.eval.tasks import Task, TaskOptions, register_task, seeded_sample, task_dataset
from polymodal.processing.images import load_image

PICTURED = 16  # images in reconstruction.png
# A row of predictions.jsonl is `correct` at this PSNR or above: on easy-VQA's flat shapes a
# reconstruction below it showed blurred edges or shifted colours (docs/image-generation.md).
GOOD_PSNR = 25.0


def psnr(reconstruction: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each image: [N, 3, S, S] in [0, 1] -> [N]."""
    mse = (reconstruction.float() - pixels.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def code_statistics(counts: torch.Tensor) -> dict:
    """A histogram of codes [codebook_size] -> {codebook_usage (share used), codes_used,
    codebook_size, perplexity (exp of the frequencies' entropy, in nats)}."""
    frequencies = counts.double() / counts.sum().clamp_min(1)
    used = frequencies[frequencies > 0]
    entropy = -(used * used.log()).sum()
    return {"codebook_usage": int((counts > 0).sum()) / len(counts), "codes_used": int((counts > 0).sum()),
            "codebook_size": len(counts), "perplexity": math.exp(float(entropy))}


@torch.no_grad()
def judged_alike(tokenizer: ImageTokenizer, paths: list[str], batch_size: int) -> dict[str, float]:
    """{shape, color, both}: the share of images whose reconstruction the easy-VQA judge names
    as it names the original (the judge is trained on first use, then cached)."""
    judge = load_judge()
    alike = {"shape": 0, "color": 0, "both": 0}
    device = next(tokenizer.parameters()).device
    for start in range(0, len(paths), batch_size):
        pixels = torch.stack([load_image(path, tokenizer.image_size) for path in paths[start : start + batch_size]])
        reconstruction = tokenizer(pixels.to(device))[0].float().cpu()
        (shape, color), (shape_back, color_back) = judge.classify(pixels), judge.classify(reconstruction)
        alike["shape"] += int((shape == shape_back).sum())
        alike["color"] += int((color == color_back).sum())
        alike["both"] += int(((shape == shape_back) & (color == color_back)).sum())
    return {name: count / len(paths) for name, count in alike.items()}


@register_task("reconstruction")
class Reconstruction(Task):
    """An image tokenizer's reconstructions: PSNR, codebook usage and perplexity, a picture."""

    generative = False  # no questions answered: the tokenizer alone runs
    headline = "psnr"

    def __init__(self):
        self.pictured: tuple[torch.Tensor, torch.Tensor] | None = None  # (originals, reconstructions)

    def run(self, model, options: TaskOptions, batch_size: int, items=None) -> tuple[dict, list[dict]]:
        found = image_tokenizer_of(model)
        if found is None:
            raise UserError("task reconstruction needs a model with an image tokenizer (model.image_output, "
                            "or an image encoder of kind image-tokens)")
        tokenizer = found[1]
        pairs = seeded_sample(task_dataset(options).caption_pairs(), options.limit, options.seed)
        if not pairs:
            raise UserError("task reconstruction: the data holds no images")
        scores, counts, rows = self.reconstruct(tokenizer, pairs, batch_size)
        results = {"psnr": float(scores.mean()), "psnr_min": float(scores.min()), "images": len(pairs),
                   "tokens_per_image": tokenizer.num_codes, "kind": tokenizer.kind}
        if counts is not None:
            results.update(code_statistics(counts))
        if options.dataset == "easy-vqa" and not options.data:
            results["judged"] = judged_alike(tokenizer, [path for path, _ in pairs], batch_size)
        return results, rows

    @torch.no_grad()
    def reconstruct(self, tokenizer: ImageTokenizer, pairs: list[tuple[str, str]],
                    batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None, list[dict]]:
        """(PSNR of each image [N], the codes' histogram [codebook_size] or None, rows)."""
        tokenizer.eval()
        device = next(tokenizer.parameters()).device
        scores, rows, pictured = [], [], []
        counts = torch.zeros(tokenizer.codebook_size, dtype=torch.long) if tokenizer.codebook_size else None
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            pixels = torch.stack([load_image(path, tokenizer.image_size) for path, _ in chunk]).to(device)
            reconstruction, codes = tokenizer(pixels)
            batch_scores = psnr(reconstruction, pixels).cpu()
            scores.append(batch_scores)
            if codes is not None:
                counts += torch.bincount(codes.flatten().cpu(), minlength=len(counts))
            for index, ((path, caption), score) in enumerate(zip(chunk, batch_scores.tolist())):
                row = {"id": Path(path).stem, "prompt": "", "prediction": f"{score:.2f} dB", "reference": caption,
                       "correct": score >= GOOD_PSNR, "psnr": score}
                if codes is not None:
                    row["codes_used"] = len(set(codes[index].tolist()))
                rows.append(row)
            wanted = max(0, PICTURED - start)  # the first 16 images
            pictured.append((pixels[:wanted].cpu(), reconstruction[:wanted].float().cpu()))
        self.pictured = tuple(torch.cat(parts) for parts in zip(*pictured))
        return torch.cat(scores), counts, rows

    def pictures(self, results: dict, rows: list[dict], out: Path) -> None:
        if self.pictured is not None:
            title = f"reconstruction: PSNR {results['psnr']:.2f} dB"
            if "codebook_usage" in results:
                title += f", codebook usage {results['codebook_usage']:.1%} of {results['codebook_size']}"
            plot_reconstructions(*self.pictured, out / "reconstruction.png", title)


def plot_reconstructions(originals: torch.Tensor, reconstructions: torch.Tensor, out: Path, title: str,
                         columns: int = 8) -> None:
    """Originals [N, 3, S, S] in rows above their reconstructions, `columns` images a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bands = math.ceil(len(originals) / columns)
    figure, axes = plt.subplots(2 * bands, columns, figsize=(1.2 * columns, 2.5 * bands + 0.4), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for index in range(len(originals)):
        band, column = divmod(index, columns)
        for offset, images in enumerate((originals, reconstructions)):
            axis = axes[2 * band + offset, column]
            axis.imshow(images[index].clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
            if column == 0:
                axis.set_title("original" if offset == 0 else "reconstruction", fontsize=7, loc="left")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
