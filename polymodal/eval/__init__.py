"""Evaluation tasks; each writes results.json, predictions.jsonl and pictures to an output folder.

Importing this package registers every task (registry.EVAL_TASKS); discovery imports it by name.
"""

from polymodal.eval import (  # noqa: F401  (each registers its task)
    audio_image,
    binding,
    caption,
    easy_vqa,
    easy_vqa_spoken,
    forecast,
    multiple_choice,
    pope,
    reconstruction,
    retrieval,
    series_classification,
    text_to_image,
    vqa,
    zeroshot,
)
