"""Contrastive learning (CLIP, SigLIP, LiT): two towers embedding into one space."""
