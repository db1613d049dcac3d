"""`easy-vqa-draw`: easy-VQA's images as drawings to make (issue 17 §5). One sample per image
of the split: the user asks for the image's caption, the assistant answers with the image
(`Sample.draws`; the lm objective splices the image's codes into the answer):

    user: Draw a red triangle.
    assistant: <begin_of_image> code ... code <end_of_image>

The caption is the one `easy-vqa-captions` derives from the image's questions
(easy_vqa.caption_of): "Draw a red triangle.", or "Draw a triangle." / "Draw a red shape."
when its questions reveal only one attribute. A share `unconditional` of the samples (chosen
by a hash of the sample id, so the same ones in every run and process) get the user content
"" instead: the unconditional prompt that classifier-free guidance contrasts with the
caption at sampling time (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"; the
same caption dropout as Chameleon's and Janus's image generation). An image whose questions
reveal neither attribute has no caption: its sample is unconditional too.

`draw_prompts()` gives the 24 prompts of the eval task `text-to-image` (3 shapes x 8
colours) with their labels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from polymodal.data.easy_vqa import (
    COLORS,
    SHAPES,
    EasyVQASplit,
    attributes_by_image,
    caption_of,
    easy_vqa_folder,
)
from polymodal.data.sample import Sample
from polymodal.errors import ConfigError
from polymodal.registry import register_dataset_format


class DrawPrompt(NamedTuple):
    text: str  # "Draw a red triangle."
    shape: str  # one of easy_vqa.SHAPES
    color: str  # one of easy_vqa.COLORS


@dataclass
class EasyVQADrawOptions(EasyVQASplit):
    """easy-VQA images as drawings asked for by their captions."""

    format: str = "easy-vqa-draw"
    # The share of samples whose prompt is "" (classifier-free guidance's unconditional prompt).
    unconditional: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.unconditional <= 1:
            raise ConfigError(f"unconditional: a share from 0 to 1, got {self.unconditional}", "unconditional")


def draw_prompt(caption: str) -> str:
    """"a red triangle" -> "Draw a red triangle." (the issue's wording)."""
    return f"Draw {caption}."


def draw_prompts() -> list[DrawPrompt]:
    """The 24 prompts of easy-VQA's captions naming both attributes, shape-major
    ("Draw a red circle.", "Draw a green circle.", ..., "Draw a brown triangle.")."""
    return [DrawPrompt(draw_prompt(caption_of({"shape": shape, "color": color})), shape, color)
            for shape in SHAPES for color in COLORS]


def is_unconditional(sample_id: str, share: float) -> bool:
    """Whether the sample `sample_id` gets the empty prompt: a hash of the id read as a number
    in [0, 1) falls below `share` (the same answer in every run, process and order)."""
    digest = hashlib.sha256(sample_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def read_easy_vqa_draw(split: str = "train", folder: str | Path | None = None,
                       unconditional: float = 0.1) -> list[Sample]:
    """One drawing sample per image of the split (module docstring), in file order."""
    samples = []
    for image, found in attributes_by_image(easy_vqa_folder(split, folder)):
        identifier = Path(image).stem
        caption = caption_of(found)
        prompt = "" if caption is None or is_unconditional(identifier, unconditional) else draw_prompt(caption)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]
        samples.append(Sample(identifier, messages, images=[], draws=[image]))
    return samples


@register_dataset_format("easy-vqa-draw", config=EasyVQADrawOptions)
def read_easy_vqa_draw_format(options: EasyVQADrawOptions) -> list[Sample]:
    """easy-VQA images drawn from their captions ("Draw a red triangle."); a share unconditional."""
    return read_easy_vqa_draw(options.split, options.path, options.unconditional)
