"""Stock checkpoints out and in: export to transformers (LLaVA, SmolVLM/Idefics3) and GGUF, import llava-hf and SmolVLM directories.

Importing this package registers every export format (common.EXPORT_FORMATS); each format's
module holds its key table for both directions (llava.py, idefics3.py, gguf.py).
"""

# gguf, idefics3, llava register --format gguf, smolvlm, llava; imports the stock types init_from reads
from polymodal.interop import gguf, idefics3, imports, llava  # noqa: F401
from polymodal.interop.common import EXPORT_FORMATS, export_model, refuse

__all__ = ["EXPORT_FORMATS", "export_model", "refuse"]
