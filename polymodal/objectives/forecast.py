"""`objective: forecast`: the model's forecast head regresses a series' next values (Time-LLM's
training, Jin et al., ICLR 2024): the mean squared error between the head's values and the
true future, both in the series encoder's RevIN space (each channel's mean and spread over
the observed context; Kim et al., ICLR 2022), so every window counts alike whatever its level.

The samples are the forecasting samples of the data formats (data/aeon.py, data/series.py):
a series, a question, and the next values written as text (`format_values`), which this
objective reads back as the target (`parse_values`). The head reads the LLM's last hidden
states at the series' tokens, so each example stops right after them: the question and the
answer after them change nothing the head sees (causal attention) and would only cost time.

What trains is the stage's `train`: `forecast_head` with the encoder and connector, the LLM
frozen (its weights as they are; Time-LLM) or with `llm.lora`.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from polymodal.config import StageConfig
from polymodal.data.series_records import parse_values
from polymodal.errors import UserError
from polymodal.llm import merged_lora
from polymodal.model import MultimodalLM
from polymodal.objectives.base import (
    StepLoss,
    TrainsStageParts,
    encoder_is_frozen,
    module_device,
    refuse_lm_loss_options,
)
from polymodal.objectives.features import FeatureCache
from polymodal.processing.batch import Batch
from polymodal.processing.collate import collate
from polymodal.registry import register_objective


@dataclass
class ForecastBatch:
    """A batch of forecasting examples: `inputs` (token ids up to each series' last token and
    the media, or a frozen encoder's features), `series` the encoder's inputs [B, C, L] (NaN
    where padded; what the statistics come from), `future` [B, C, H] the true next values
    (NaN for channels the series lacks)."""

    inputs: Batch
    series: torch.Tensor
    future: torch.Tensor

    def to(self, device) -> ForecastBatch:
        return replace(self, inputs=self.inputs.to(device), series=self.series.to(device),
                       future=self.future.to(device))

    @property
    def num_series(self) -> int:
        return self.series.shape[0]


@register_objective("forecast")
class Forecasting(TrainsStageParts):
    """Mean squared error of the forecast head on the normalised future of each series."""

    unit = "series"
    skip_reason = "not one series with its future"

    def __init__(self, stage: StageConfig, model: nn.Module):
        self.check(stage)
        if not isinstance(model, MultimodalLM) or model.forecast_head is None:
            raise UserError(f"stage {stage.name!r}: objective forecast trains a model's forecast head; "
                            f"give the model one (model.forecast_head: {{horizon: H}})")
        self.stage, self.module = stage, model
        self.modality = model.forecast_head.config.modality
        self.placeholder = model.image_placeholder
        self.features = FeatureCache() if stage.cache_features else None

    @classmethod
    def check(cls, stage: StageConfig) -> None:
        """Options of the next-token loss are refused by name."""
        refuse_lm_loss_options(stage)

    # ------------------------------------------------------------ parts

    def stage_context(self):
        """LoRA adapters folded into the LLM while they do not train (as objective lm)."""
        if {"llm", "llm.lora"} & set(self.stage.train):
            return nullcontext()
        return merged_lora(self.module.llm.model)

    # ------------------------------------------------------------ data

    def example(self, sample, memo: dict) -> dict | None:
        """A `Sample` of one series whose last answer is its future -> {input_ids (up to the
        series' tokens), media_paths, future [C', H]}; None without exactly one series.

        Raises:
            UserError: the answer is not `horizon` values per channel (the sample is listed).
        """
        paths = sample.media.get(self.modality, [])
        answers = [turn for turn, m in enumerate(sample.messages) if m["role"] == "assistant"]
        if len(paths) != 1 or not answers or sample.images:
            return None
        head = self.module.forecast_head
        values = parse_values(sample.messages[answers[-1]]["content"])  # time first: step 1's channels, ...
        if not values or len(values) % head.horizon or len(values) // head.horizon > head.channels:
            raise UserError(f"its answer holds {len(values)} values; the forecast head predicts "
                            f"{head.horizon} steps of up to {head.channels} channels")
        future = np.asarray(values).reshape(head.horizon, -1).T  # [C', H]
        return {"input_ids": prompt_ids(self.module, sample.messages[: answers[-1]], self.modality, memo),
                "media_paths": {self.modality: paths}, "future": future.tolist()}

    def batch(self, examples: list[dict]) -> ForecastBatch:
        """Examples -> a `ForecastBatch`: the series loaded (and a frozen encoder's features
        from the cache), the futures padded to the head's channels with NaN."""
        rows = [(example["input_ids"], example["media_paths"][self.modality][0]) for example in examples]
        inputs, series = series_batch(self.module, self.modality, rows, self.features)
        futures = padded_futures([example["future"] for example in examples], self.module.forecast_head.channels)
        return ForecastBatch(inputs, series, futures)

    # ------------------------------------------------------------ loss

    def loss(self, forward: nn.Module, batch: ForecastBatch) -> StepLoss:
        if forward is not self.module:  # DDP's forward is the LM's; the head's would skip its gradient sync
            raise UserError(f"stage {self.stage.name!r}: objective forecast trains in one process "
                            f"(run it without torchrun)")
        total, count = self._squared_errors(batch)
        return StepLoss(total / max(count, 1), batch.num_series)

    def summed_loss(self, batch: ForecastBatch) -> tuple[float, int]:
        """(summed squared error, values) on held-out series: `val_loss` is their mean."""
        total, count = self._squared_errors(batch)
        return float(total), count

    def _squared_errors(self, batch: ForecastBatch) -> tuple[torch.Tensor, int]:
        """(sum of squared errors, number of values) in the normalised space, over the
        channels each series has."""
        predicted = self.module.forecast(batch.inputs)  # [B, C, H]
        statistics = self.module.encoders[self.modality].statistics(batch.series)
        target = (batch.future - statistics.mean) / statistics.std  # [B, C, H], NaN where no channel
        known = ~torch.isnan(target)
        return (predicted[known] - target[known]).pow(2).sum(), int(known.sum())


def prompt_ids(model: MultimodalLM, messages: list[dict], modality: str, memo: dict) -> list[int]:
    """Token ids of a conversation up to its last `modality` token (the placeholder expanded
    to the connector's K tokens): all a forecast head's hidden states depend on."""
    key = json.dumps(messages)
    if key not in memo:
        ids = model.processor.encode_for_training(messages, load_images=False, media={modality: [None]})["input_ids"]
        token = model.placeholder_ids[modality]
        memo[key] = ids[: len(ids) - ids[::-1].index(token)]
    return memo[key]


def series_batch(model: MultimodalLM, modality: str, rows: list[tuple[list[int], str]],
                 features: FeatureCache | None = None) -> tuple[Batch, torch.Tensor]:
    """(token ids, series path) rows -> (a `Batch` with the series as media, or a frozen
    encoder's cached features; the series [B, C, L], NaN-padded)."""
    inputs = collate([{"input_ids": ids} for ids, _ in rows], model.pad_id)
    paths = [path for _, path in rows]

    def load(items: list) -> torch.Tensor:
        return model.processor.media_inputs({modality: items})[modality]

    series = load(paths)
    inputs.media[modality] = series
    encoder = model.encoders[modality]
    if features is not None and encoder_is_frozen(encoder):
        inputs.media_features[modality] = features.get(modality, encoder, load, paths)
    return inputs, series


@torch.no_grad()
def head_forecasts(model: MultimodalLM, prompts: list[tuple[list[dict], str]], batch_size: int = 32,
                   system: str | None = None) -> list[np.ndarray]:
    """The forecast head's values for each (messages, series path) prompt, in the series'
    own units: [C, H] arrays (C the encoder's channels; a series' padded channels last).

    The head's normalised values are mapped back with each context's RevIN statistics:
    value * std + mean (the exact inverse of the objective's target).
    """
    modality = model.forecast_head.config.modality
    model.eval()
    memo, out = {}, []
    device = module_device(model)
    with merged_lora(model.llm.model):
        for start in range(0, len(prompts), batch_size):
            rows = [(prompt_ids(model, ([{"role": "system", "content": system}] if system else []) + messages,
                                modality, memo), path)
                    for messages, path in prompts[start : start + batch_size]]
            inputs, series = series_batch(model, modality, rows)
            statistics = model.encoders[modality].statistics(series.to(device))
            values = model.forecast(inputs.to(device)) * statistics.std + statistics.mean  # [B, C, H]
            out += list(values.double().cpu().numpy())
    return out


def padded_futures(futures: list, channels: int) -> torch.Tensor:
    """Futures [C_i, H] (lists) -> [B, channels, H] float32, NaN for the channels a series lacks."""
    horizon = len(futures[0][0])
    out = torch.full((len(futures), channels, horizon), float("nan"))
    for row, future in enumerate(futures):
        out[row, : len(future)] = torch.tensor(future, dtype=torch.float32)
    return out
