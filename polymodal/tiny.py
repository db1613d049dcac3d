"""`tiny:ARCH` sources: small random models of real architectures, for tests and trials.

They are built in memory from a transformers config with a fixed seed, so every
`tiny:llama` has the same weights, and come with a byte-level tokenizer that needs
no download (it has no chat template, which exercises the ChatML fallback).

A language model's sizes can be chosen in the source, for models trained from scratch at
several scales: `tiny:llama?hidden_size=128&num_hidden_layers=4` (the keys of
`LANGUAGE_SIZES`; polymodal.sources parses the query).
"""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from polymodal.errors import UserError

_LANGUAGE = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
_VISION = {
    "clip": (CLIPVisionConfig, CLIPVisionModel),
    "siglip": (SiglipVisionConfig, SiglipVisionModel),
    "dinov2": (Dinov2Config, Dinov2Model),
}
_TEXT = {"bert": (BertConfig, BertModel)}  # all-MiniLM-L6-v2's architecture
ARCHITECTURES = (*_LANGUAGE, *_VISION, *_TEXT)
SEED = 0
# A tiny language model's sizes, which `tiny:ARCH?key=value&...` may set. intermediate_size
# defaults to twice hidden_size, as the default 64/128 has it.
LANGUAGE_SIZES = {"hidden_size": 64, "intermediate_size": None, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}


def _unknown(arch: str, kind: str, known) -> UserError:
    return UserError(f"unknown tiny {kind} architecture {arch!r}; known: {', '.join(known)}")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: index for index, char in enumerate(_byte_characters())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token="<|im_start|>"
    )
    return tokenizer


def _byte_characters() -> list[str]:
    # GPT-2's reversible byte -> printable character map, so every byte has a token.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    characters, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            characters[byte] = chr(byte)
        else:
            characters[byte] = chr(256 + extra)
            extra += 1
    return [characters[byte] for byte in range(256)]


def language_sizes(arch: str, sizes: dict[str, int] | None = None) -> dict[str, int]:
    """The sizes of `tiny:ARCH` with `sizes` (a subset of LANGUAGE_SIZES' keys) applied.

    Raises:
        UserError: an unknown key, a value below 1, heads that do not divide (the width by
            the attention heads, the attention heads by the key-value heads) or an odd head
            width (rotary embeddings need pairs), naming them.
    """
    sizes = dict(sizes or {})
    unknown = sorted(set(sizes) - set(LANGUAGE_SIZES))
    if unknown:
        raise UserError(f"tiny:{arch}: unknown size {', '.join(unknown)}; known: {', '.join(LANGUAGE_SIZES)}")
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"tiny:{arch}: {key}={value!r} must be a whole number of at least 1")
    chosen = {**LANGUAGE_SIZES, **sizes}
    if chosen["intermediate_size"] is None:
        chosen["intermediate_size"] = 2 * chosen["hidden_size"]
    hidden, heads, kv_heads = chosen["hidden_size"], chosen["num_attention_heads"], chosen["num_key_value_heads"]
    if hidden % heads:
        raise UserError(f"tiny:{arch}: num_attention_heads={heads} does not divide hidden_size={hidden}")
    if heads % kv_heads:
        raise UserError(f"tiny:{arch}: num_key_value_heads={kv_heads} does not divide num_attention_heads={heads}")
    if (hidden // heads) % 2:  # rotary embeddings turn pairs of a head's features
        raise UserError(f"tiny:{arch}: hidden_size={hidden} / num_attention_heads={heads} = {hidden // heads} "
                        f"features per head must be even (rotary embeddings)")
    return chosen


def causal_lm(arch: str, dtype: torch.dtype = torch.float32, sizes: dict[str, int] | None = None):
    """(model, tokenizer) for `tiny:llama` or `tiny:qwen2`: by default 2 layers, width 64, GQA
    4/2 heads; `sizes` (keys of LANGUAGE_SIZES) changes them (errors: `language_sizes`)."""
    if arch not in _LANGUAGE:
        raise _unknown(arch, "language", _LANGUAGE)
    chosen = language_sizes(arch, sizes)
    tokenizer = byte_tokenizer()
    config_class, model_class = _LANGUAGE[arch]
    config = config_class(
        vocab_size=len(tokenizer),  # exactly full: adding the image token must resize
        **chosen,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = model_class(config)
    return model.to(dtype).eval(), tokenizer


def vision_model(arch: str):
    """`tiny:clip`, `tiny:siglip` or `tiny:dinov2`: 32x32 images, 8x8 patches (a 4x4 grid), width 32."""
    if arch not in _VISION:
        raise _unknown(arch, "vision", _VISION)
    config_class, model_class = _VISION[arch]
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "image_size": 32, "patch_size": 8}
    if arch == "dinov2":
        config = config_class(mlp_ratio=2, **sizes)
    else:
        config = config_class(intermediate_size=64, **sizes)
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = model_class(config)
    return model.eval()


def text_model(arch: str):
    """(model, tokenizer) for `tiny:bert`, a text tower: 2 layers, width 32, byte tokenizer."""
    if arch not in _TEXT:
        raise _unknown(arch, "text", _TEXT)
    tokenizer = byte_tokenizer()
    config_class, model_class = _TEXT[arch]
    config = config_class(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                          pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = model_class(config)  # with its pooler, as AutoModel builds the real ones
    return model.eval(), tokenizer
