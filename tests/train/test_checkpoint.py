"""polymodal/train/checkpoint.py: what a checkpoint holds."""

import torch

from polymodal.config import ModelConfig, from_dict
from polymodal.contrastive.model import DualEncoder
from polymodal.train.checkpoint import trained_tensors


def test_parts_an_earlier_stage_trained_that_the_model_lacks_are_skipped():
    config = from_dict(ModelConfig, {"kind": "dual-encoder",
                                     "encoder": {"kind": "cnn", "image_size": 32, "channels": [8, 16]},
                                     "contrastive": {"text": "tiny:bert", "pool": "max", "dim": 16}})
    torch.manual_seed(0)
    model = DualEncoder.from_config(config)
    # `encoder.image` and `llm.lora` come from an earlier lm stage; the dual encoder has neither
    tensors = trained_tensors(model, ["encoder.image", "llm.lora", "encoder"])
    encoder = {name for name, _ in model.named_parameters() if name.startswith("image.encoder.")}
    assert encoder and encoder <= set(tensors)
    assert not any(name.startswith("text.") for name in tensors if name in dict(model.named_parameters()))
