"""The judge of drawn images (issue 17 §5): a small CNN that names the shape and the colour
of an easy-VQA-style image, trained here on easy-VQA's training images, so that the images a
model draws are graded by something made and measured on this machine (not by a model the
drawing model could have been tuned against).

Two heads over one convolutional trunk: shape (easy_vqa.SHAPES' 3 and "none") and colour
(easy_vqa.COLORS' 8 and "none"), each trained with cross-entropy on the labels the image's
questions give (easy_vqa.image_attributes; an attribute the questions do not reveal is not
scored) and on synthetic images without a shape (labelled "none", so that a blank or noisy
drawing is not credited with a shape), on batches blurred and noised as drawings may be. It is
trained on first use (about half a minute on 2 cores) and cached: `judge-{key}.safetensors`
and `judge-{key}.json` (its test-split accuracy per head, the data fingerprint, the
settings, the training seconds) in `$POLYMODAL_CACHE/judge/` (default
`~/.cache/polymodal/judge/`; `POLYMODAL_CACHE=off` trains it in memory every time). The key
is a hash of the settings and of the bytes of both splits' questions and images: changed
data trains a new judge. Both files are written atomically, under a lock, so two evaluations
started together train it once.

Example:
    judge = load_judge()
    shapes, colors = judge.classify(pixels)  # pixels [N, 3, 64, 64] in [0, 1]
    print(judge.accuracy)  # {"shape": 1.0, "color": 1.0} on easy-VQA's test images
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from polymodal.data.easy_vqa import COLORS, SHAPES, attributes_by_image, easy_vqa_folder
from polymodal.gguf_cache import cache_root
from polymodal.safe_files import atomic_write

IMAGE_SIZE = 64  # easy-VQA's images; others are resized to it
IGNORE = -100  # the label of an attribute an image's questions do not reveal
# What the heads name: easy-VQA's shapes and colours, and "none" (an image with no shape on
# it: a blank background, noise, one colour filling the frame; trained on synthetic ones).
SHAPE_NAMES = (*SHAPES, "none")
COLOR_NAMES = (*COLORS, "none")
NO_SHAPE, NO_COLOR = len(SHAPES), len(COLORS)
VERSION = 3  # part of the cache key: a change to the network or its training trains anew


@dataclass(frozen=True)
class JudgeSettings:
    """How the judge is built and trained (all part of its cache key)."""

    width: int = 16  # channels of the first block; the next blocks have 2x, 4x, 4x
    epochs: int = 6
    batch_size: int = 64
    learning_rate: float = 3e-3
    limit: int | None = None  # only the first N images of each split (tests)
    seed: int = 0


class JudgeNetwork(nn.Module):
    """pixels [N, 3, 64, 64] in [0, 1] -> (shape logits [N, 4], colour logits [N, 9]): the
    last class of each is "none" (SHAPE_NAMES, COLOR_NAMES).

    Four 3x3 conv blocks (conv, batch norm, ReLU, 2x2 max pool: 64 -> 4 pixels), then the
    mean and the max over positions (the max keeps a small shape's evidence), then one
    linear layer per head.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        channels = [3, width, 2 * width, 4 * width, 4 * width]
        blocks = []
        for inputs, outputs in itertools.pairwise(channels):
            blocks += [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.trunk = nn.Sequential(*blocks)
        self.shape_head = nn.Linear(2 * channels[-1], len(SHAPE_NAMES))
        self.color_head = nn.Linear(2 * channels[-1], len(COLOR_NAMES))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(pixels * 2 - 1)  # [N, C, 4, 4]
        pooled = torch.cat([features.mean((2, 3)), features.amax((2, 3))], dim=1)  # [N, 2C]
        return self.shape_head(pooled), self.color_head(pooled)


class Judge:
    """A trained JudgeNetwork and its measured accuracy.

    `accuracy`: {"shape", "color"}: the share of easy-VQA's test images (those whose questions
    reveal the attribute) each head names right. `info`: what the cache's JSON file holds.
    """

    def __init__(self, network: JudgeNetwork, info: dict):
        self.network = network.eval()
        self.info = info
        self.accuracy: dict[str, float] = info["accuracy"]

    @torch.no_grad()
    def classify(self, pixels: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [N, 3, H, W] in [0, 1] (resized to 64 x 64 when H, W differ) -> (shape index
        [N] into SHAPE_NAMES, colour index [N] into COLOR_NAMES), int64: easy_vqa.SHAPES' and
        COLORS' indices, or NO_SHAPE / NO_COLOR for an image that shows none."""
        pixels = resized(pixels)
        shapes, colors = [], []
        for start in range(0, len(pixels), batch_size):
            shape_logits, color_logits = self.network(pixels[start : start + batch_size].clamp(0, 1))
            shapes.append(shape_logits.argmax(1))
            colors.append(color_logits.argmax(1))
        if not shapes:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        return torch.cat(shapes), torch.cat(colors)


# ---------------------------------------------------------------- data


def resized(pixels: torch.Tensor) -> torch.Tensor:
    """pixels [N, 3, H, W] -> float [N, 3, 64, 64] (bilinear, antialiased; as they are when 64 x 64)."""
    pixels = pixels.float()
    if pixels.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE) or not len(pixels):
        return pixels
    return F.interpolate(pixels, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)


def read_pixels(paths: list[str]) -> torch.Tensor:
    """Image files -> uint8 pixels [N, 3, 64, 64] (RGB; resized when another size)."""
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            arrays.append(np.asarray(image))
    if not arrays:
        return torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def labelled_images(folder: Path, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An easy-VQA folder's images whose questions reveal their shape or colour:
    (pixels uint8 [N, 3, 64, 64], shape labels [N], colour labels [N]; IGNORE where unknown)."""
    found = [(image, attributes) for image, attributes in attributes_by_image(folder) if attributes]
    found = found[:limit] if limit else found
    shapes = [SHAPES.index(a["shape"]) if "shape" in a else IGNORE for _, a in found]
    colors = [COLORS.index(a["color"]) if "color" in a else IGNORE for _, a in found]
    return read_pixels([image for image, _ in found]), torch.tensor(shapes), torch.tensor(colors)


def data_fingerprint(folders: list[Path], settings: JudgeSettings) -> str:
    """A hash of the judge's version, its settings, and every byte of the folders'
    questions.json and images (a few MB: read in well under a second)."""
    digest = hashlib.sha256(f"judge {VERSION} {dataclasses.asdict(settings)}".encode())
    for folder in folders:
        digest.update((folder / "questions.json").read_bytes())
        for path in sorted((folder / "images").glob("*.png")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- training


def blurred(pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """pixels [N, 3, 64, 64] down-sampled `factor` times (antialiased) and back up (bilinear)."""
    small = F.interpolate(pixels, scale_factor=1 / factor, mode="bilinear", antialias=True)
    return F.interpolate(small, size=pixels.shape[-2:], mode="bilinear")


def augmented(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A training batch [N, 3, 64, 64] in [0, 1] as a drawing model might render it: half
    mirrored (a mirrored shape keeps its label), a third each kept sharp, blurred through 32
    or through 16 pixels, and Gaussian noise of a standard deviation up to 0.1. Trained on
    sharp images alone, the judge named the shape of easy-VQA's test images blurred through
    16 pixels right 37% of the time (chance: 33%; benchmarks/judge.py)."""
    count = len(images)
    flip = torch.rand(count, generator=generator) < 0.5
    images[flip] = images[flip].flip(-1)
    blur = torch.randint(0, 3, (count,), generator=generator)
    for choice, factor in ((1, 2), (2, 4)):
        chosen = blur == choice
        if chosen.any():
            images[chosen] = blurred(images[chosen], factor)
    noise = 0.1 * torch.rand(count, 1, 1, 1, generator=generator)
    return (images + noise * torch.randn(images.shape, generator=generator)).clamp(0, 1)


def negatives(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`count` images with no shape [count, 3, 64, 64], a third each: a light background tint
    (easy-VQA's backgrounds) alone, uniform noise, one colour filling the frame; (images,
    shape labels: NO_SHAPE, colour labels: NO_COLOR, IGNORE for the filled frames). Without
    them the judge named a shape and a colour with full confidence for any image: noise was
    "a black rectangle" (softmax 1.0), a grey frame "a gray rectangle"."""
    kind = torch.randint(0, 3, (count, 1, 1, 1), generator=generator)
    tint = 0.85 + 0.15 * torch.rand(count, 3, 1, 1, generator=generator)
    noise = torch.rand(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    fill = torch.rand(count, 3, 1, 1, generator=generator)
    images = torch.where(kind == 0, tint, torch.where(kind == 1, noise, fill)).expand(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
    colors = torch.where(kind.view(-1) == 2, IGNORE, NO_COLOR)
    return images.contiguous(), torch.full((count,), NO_SHAPE), colors


def training_batches(pixels: torch.Tensor, shapes: torch.Tensor, colors: torch.Tensor, settings: JudgeSettings,
                     generator: torch.Generator):
    """One epoch of (images [B', 3, 64, 64], shape labels [B'], colour labels [B']): each batch
    of real images in a seeded order, an eighth as many `negatives` beside them, `augmented`."""
    for batch in torch.randperm(len(pixels), generator=generator).split(settings.batch_size):
        blank, blank_shapes, blank_colors = negatives(max(1, len(batch) // 8), generator)
        images = torch.cat([pixels[batch].float() / 255, blank])
        yield (augmented(images, generator), torch.cat([shapes[batch], blank_shapes]),
               torch.cat([colors[batch], blank_colors]))


def train_judge(train_folder: Path, test_folder: Path, settings: JudgeSettings | None = None,
                progress: bool = True) -> Judge:
    """A JudgeNetwork trained on `train_folder`'s labelled images and synthetic `negatives`
    (AdamW, one-cycle learning rate, `augmented` batches), measured on `test_folder`'s.
    `info` holds the accuracy per head, the image counts and the training seconds."""
    settings = settings or JudgeSettings()
    started = time.perf_counter()
    pixels, shapes, colors = labelled_images(train_folder, settings.limit)
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)  # the network's initial weights
    network = JudgeNetwork(settings.width)
    steps_per_epoch = max(1, -(-len(pixels) // settings.batch_size))
    optimizer = torch.optim.AdamW(network.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.learning_rate,
                                                   total_steps=settings.epochs * steps_per_epoch)
    network.train()
    bar = tqdm(total=settings.epochs * steps_per_epoch, desc="training the judge", unit="step",
               disable=not progress, leave=False)
    with torch.enable_grad():  # a judge trained on first use may be asked for under no_grad
        for _ in range(settings.epochs):
            for images, shape_labels, color_labels in training_batches(pixels, shapes, colors, settings, generator):
                shape_logits, color_logits = network(images)
                loss = (F.cross_entropy(shape_logits, shape_labels, ignore_index=IGNORE)
                        + F.cross_entropy(color_logits, color_labels, ignore_index=IGNORE))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    seconds = time.perf_counter() - started
    judge = Judge(network, {"accuracy": {}})
    accuracy, counts = measure_accuracy(judge, test_folder, settings.limit)
    judge.accuracy = accuracy
    judge.info = {"accuracy": accuracy, "test_images": counts, "train_images": len(pixels),
                  "train_seconds": round(seconds, 1), "settings": dataclasses.asdict(settings)}
    return judge


def measure_accuracy(judge: Judge, folder: Path, limit: int | None = None) -> tuple[dict, dict]:
    """({"shape", "color"}: share named right, {"shape", "color"}: images scored) on a folder's
    labelled images."""
    pixels, shapes, colors = labelled_images(folder, limit)
    predicted_shapes, predicted_colors = judge.classify(pixels.float() / 255)
    accuracy, counts = {}, {}
    for name, labels, predicted in (("shape", shapes, predicted_shapes), ("color", colors, predicted_colors)):
        known = labels != IGNORE
        counts[name] = int(known.sum())
        accuracy[name] = float((predicted[known] == labels[known]).float().mean()) if counts[name] else 0.0
    return accuracy, counts


# ---------------------------------------------------------------- the cache


def judge_cache() -> Path | None:
    """`$POLYMODAL_CACHE/judge` (default ~/.cache/polymodal/judge), or None when the cache is off."""
    root = cache_root()
    return None if root is None else root / "judge"


def load_judge(train_folder: str | Path | None = None, test_folder: str | Path | None = None,
               settings: JudgeSettings | None = None, cache: Path | bool | None = True,
               progress: bool = True) -> Judge:
    """The judge for these easy-VQA folders (default: the package's train and test splits):
    read from the cache when trained before on the same data and settings, else trained now
    and saved there. `cache`: a folder, True (judge_cache()) or False/None (not cached).

    Raises:
        UserError: the easy_vqa package is missing (and no folders are given).
    """
    settings = settings or JudgeSettings()
    train = easy_vqa_folder("train", train_folder)
    test = easy_vqa_folder("test", test_folder)
    folder = judge_cache() if cache is True else (Path(cache) if cache else None)
    if folder is None:
        return train_judge(train, test, settings, progress)
    fingerprint = data_fingerprint([train, test], settings)
    weights, info_path = folder / f"judge-{fingerprint[:16]}.safetensors", folder / f"judge-{fingerprint[:16]}.json"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".judge.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then reads what the first saved
        if weights.is_file() and info_path.is_file():
            info = json.loads(info_path.read_text())
            if info.get("fingerprint") == fingerprint:
                network = JudgeNetwork(settings.width)
                network.load_state_dict(load_file(weights))
                return Judge(network, info)
        judge = train_judge(train, test, settings, progress)
        judge.info["fingerprint"] = fingerprint
        state = {name: tensor.contiguous() for name, tensor in judge.network.state_dict().items()}
        atomic_write(weights, lambda path: save_file(state, str(path)))
        atomic_write(info_path, lambda path: path.write_text(json.dumps(judge.info, indent=2) + "\n"))
        return judge
