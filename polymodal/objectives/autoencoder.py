"""`objective: autoencoder`: an image tokenizer learns to reconstruct the images of the
stage's data through its codes (encoders/image_tokenizer.py; FSQ needs no codebook or
commitment loss, so the reconstruction's is the whole loss).

The tokenizer is the stage's part: `image_tokenizer` (a model that draws images,
`model.image_output`) or `encoder.image` when that encoder is of kind `image-tokens` (the
tokenizer inside it; the codes' embedding gets no gradient here). The LLM never runs.

Data: any format whose samples carry images (`easy-vqa-captions`: one sample per image) or
images to draw (`Sample.draws`); every one of a sample's images is a training image, its
text is not read. The loss is the mean squared error of the pixels in [0, 1]
(`reconstruction_loss`); it counts images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.config import StageConfig
from polymodal.encoders.image_tokens import image_tokenizer_of
from polymodal.errors import UserError
from polymodal.objectives.base import (
    StepLoss,
    TrainsStageParts,
    refuse_answered_data,
    refuse_lm_loss_options,
)
from polymodal.processing.images import load_image
from polymodal.registry import register_objective


def reconstruction_loss(reconstruction: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Mean squared error over pixels [N, 3, S, S] in [0, 1]: a scalar (what PSNR measures).

    MSE + L1 (the L1 term's gradient does not shrink with the error) was measured against it
    on easy-VQA, the same run otherwise (docs/image-generation.md): 28.06 against 27.97 dB,
    and the judge named 96.7% against 98.0% of reconstructions as their originals. No gain
    for a second term, so one."""
    return F.mse_loss(reconstruction, pixels)


@register_objective("autoencoder")
class Autoencoding(TrainsStageParts):
    """Reconstruction loss of the model's image tokenizer on the stage's images."""

    unit = "images"
    skip_reason = "no image"

    def __init__(self, stage: StageConfig, model: nn.Module):
        self.check(stage)
        if image_tokenizer_of(model) is None:
            raise UserError(f"stage {stage.name!r}: objective autoencoder trains an image tokenizer; this model "
                            f"has none (give it model.image_output, or an image encoder of kind image-tokens)")
        found = image_tokenizer_of(model, stage.train)
        if found is None:
            part = image_tokenizer_of(model)[0]
            raise UserError(f"stage {stage.name!r}: objective autoencoder trains the image tokenizer; "
                            f"add {part} to the stage's train")
        self.part, self.tokenizer = found
        self.stage, self.module = stage, model
        self.placeholder = getattr(model, "image_placeholder", "<image>")

    @classmethod
    def check(cls, stage: StageConfig) -> None:
        """Options of the next-token loss, and data the LLM answers, are refused by name."""
        refuse_lm_loss_options(stage)
        refuse_answered_data(stage)

    # ------------------------------------------------------------ data

    def example(self, sample, memo: dict) -> dict | None:
        """A `Sample` -> {images: its image paths and those it draws}; None without any."""
        paths = [*sample.images, *sample.draws]
        return {"images": paths} if paths else None

    def batch(self, examples: list[dict]) -> torch.Tensor:
        """Examples -> pixels [N, 3, S, S] in [0, 1] at the tokenizer's size (N: all their images)."""
        size = self.tokenizer.image_size
        return torch.stack([load_image(path, size) for example in examples for path in example["images"]])

    # ------------------------------------------------------------ loss

    def loss(self, forward: nn.Module, batch: torch.Tensor) -> StepLoss:
        if forward is not self.module:  # DDP's forward is the LM's; the tokenizer's would skip its gradient sync
            raise UserError(f"stage {self.stage.name!r}: objective autoencoder trains in one process "
                            f"(run it without torchrun)")
        reconstruction, _ = self.tokenizer(batch)
        return StepLoss(reconstruction_loss(reconstruction, batch), len(batch))

    def summed_loss(self, batch: torch.Tensor) -> tuple[float, int]:
        """(summed per-image loss, images) on held-out images: `val_loss` is their mean."""
        reconstruction, _ = self.tokenizer(batch)
        return float(reconstruction_loss(reconstruction, batch)) * len(batch), len(batch)
