"""Training data: formats (LLaVA JSON, caption JSONL, easy-VQA) as conversations, checked up front."""

from polymodal.data.formats import Sample, read_captions, read_easy_vqa, read_llava_json

__all__ = ["Sample", "read_captions", "read_easy_vqa", "read_llava_json"]
