"""Preprocessing outside nn.Module: chat template, placeholders, images to tensors, collation."""

from polymodal.processing.collate import collate
from polymodal.processing.images import load_image
from polymodal.processing.processor import Processor

__all__ = ["Processor", "collate", "load_image"]
