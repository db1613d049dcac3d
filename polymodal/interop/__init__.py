"""Stock checkpoints out and in: export to transformers (LLaVA, SmolVLM/Idefics3) and GGUF, import llava-hf and SmolVLM directories."""
