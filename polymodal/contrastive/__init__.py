"""Contrastive learning (CLIP, SigLIP, LiT): two towers embedding into one space."""

from polymodal.contrastive import model  # noqa: F401  (registers the model kind dual-encoder)
