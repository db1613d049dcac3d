"""Training and evaluation data: dataset formats as registered kinds, each reading into the
same `Sample` (a conversation and its media), checked up front (validate.py).

Formats: `llava` (llava.py), `captions` (captions.py), `interleaved` (interleaved.py: text and
images in any order), `replay` (replay.py), easy-VQA's
(easy_vqa.py: its one home; easy_vqa_draw.py: its drawings to make), time series (`series`: series.py; `aeon`: aeon.py). Importing this package registers them all (registry.discover
imports it by name).
"""

from polymodal.data import (  # noqa: F401  (they register their formats)
    aeon,
    captions,
    easy_vqa,
    easy_vqa_draw,
    easy_vqa_spoken,
    interleaved,
    llava,
    replay,
    series,
)
from polymodal.data.captions import read_captions
from polymodal.data.easy_vqa import read_easy_vqa
from polymodal.data.interleaved import read_interleaved
from polymodal.data.llava import read_llava_json
from polymodal.data.sample import Item, Sample

__all__ = ["Item", "Sample", "read_captions", "read_easy_vqa", "read_interleaved", "read_llava_json"]
