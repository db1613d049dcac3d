"""How many of an eval's series are longer than the model's series encoder takes.

Such a series is not refused: the encoder keeps its last `length` steps
(`processing.series.crop_series`, the one place a series is cut, as PatchTST's and
Time-LLM's fixed lookback does). An evaluation says how many it cut, in results.json
(`cropped`) and on one stderr line, since a score on cut series is not a score on whole
ones (JapaneseVowels' test split has series up to 29 steps; its training split, which
fits the length, up to 26).
"""

from __future__ import annotations

import sys

from polymodal.data.sample import Item
from polymodal.processing.series import read_series


def count_cropped(model, items: list[Item], task: str, modality: str = "series") -> int:
    """The number of `items` whose `modality` series has more steps than the model's
    encoder's `length` (each is cropped to its last `length` steps when loaded); prints one
    line to stderr when there are any. 0 for a model without such an encoder (the task
    names that mistake when it answers)."""
    encoders = getattr(model, "encoders", {})
    if modality not in encoders:
        return 0
    length = encoders[modality].length
    steps = [read_series(source).shape[1] for item in items for source in item.media.get(modality, [])]
    cropped = sum(count > length for count in steps)
    if cropped:
        print(f"{task}: {cropped} of {len(steps)} series are longer than the encoder's length {length}; "
              f"each was cropped to its last {length} steps", file=sys.stderr)
    return cropped
