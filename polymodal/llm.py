"""The decoder LLM part: a transformers causal LM with image placeholders, a chat template and LoRA."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from transformers import AddedToken

from polymodal.config import LLMConfig
from polymodal.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Used when a tokenizer has no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class LanguageModel(nn.Module):
    """Wraps a causal LM: `model` (transformers), `tokenizer`, and the image placeholder id."""

    def __init__(self, config: LLMConfig, loader, tokenizer=None):
        super().__init__()
        model, loaded_tokenizer = loader.causal_lm("llm", config.source, DTYPES[config.dtype])
        if config.init == "random" and not loader.from_saved:  # a saved model's weights load over
            reinitialise_weights(model, config.init_seed)
        self.tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.image_token = config.image_token
        self.image_token_id = add_placeholder_token(self.tokenizer, model, config.image_token)
        self.chat_template = config.chat_template or self.tokenizer.chat_template or CHATML_TEMPLATE
        self.system_prompt = config.system_prompt
        if config.lora is not None:
            model = add_lora(model, config.lora)
        self.model = model
        self.hidden_size = model.config.hidden_size
        self.max_length = config.max_length or getattr(model.config, "max_position_embeddings", 2048)

    @property
    def decoder(self) -> nn.Module:
        """The transformer body: inputs_embeds -> hidden states [B, T, D]."""
        return self.model.get_decoder()

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T, D]; placeholder ids embed as token 0 and are overwritten by fusion."""
        safe = input_ids.masked_fill(input_ids == self.image_token_id, 0)
        return self.model.get_input_embeddings()(safe)

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The chat template applied to messages whose content is text (placeholders inline);
        the configured system prompt goes first when the conversation has none."""
        if self.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except (TemplateError, ValueError) as error:  # a template's raise_exception(...)
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UserError(f"the chat template refused the conversation: {first_line}") from None

    def stop_token_ids(self) -> set[int]:
        """Ids that end an answer: EOS and, for chat templates, the end-of-turn token."""
        ids = set()
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        for value in (self.tokenizer.eos_token_id, eos):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(value)
        end_of_turn = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(end_of_turn, int) and end_of_turn != self.tokenizer.unk_token_id:
            ids.add(end_of_turn)
        return ids


def reinitialise_weights(model: nn.Module, seed: int) -> None:
    """Re-draw every weight of a transformers model with its own `_init_weights` (normal
    with the config's initializer_range, norms at one, biases zero), from `seed`, leaving
    the global random generator as it was. The control of "are language models actually
    useful" studies (Tan et al., NeurIPS 2024): same architecture and tokenizer, no
    pretraining."""
    for item in (*model.modules(), *model.parameters(), *model.buffers()):
        item._is_hf_initialized = False  # transformers skips what it marked as loaded
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.init_weights()


def add_placeholder_token(tokenizer, model, token: str) -> int:
    """Add `token` as a special token; resize the embeddings only if its id has no row yet."""
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    rows = model.get_input_embeddings().weight.shape[0]
    if token_id >= rows:
        # Padding to a multiple of 64 keeps matmuls aligned and leaves room for later tokens.
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    return token_id


def add_lora(model: nn.Module, lora) -> nn.Module:
    """Inject peft LoRA adapters into the named modules, in place."""
    from peft import LoraConfig, inject_adapter_in_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(lora.target_modules) - present)
    if missing:
        raise UserError(f"model.llm.lora.target_modules: no module named {', '.join(missing)} "
                        f"in this LLM")
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    outside = [layer for layer in lora.layers or () if count is not None and not 0 <= layer < count]
    if outside:  # peft would raise deep inside its injection, with a traceback
        raise UserError(f"model.llm.lora.layers: {outside} outside this LLM's {count} layers "
                        f"(0..{count - 1})")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), layers_to_transform=lora.layers)
    return inject_adapter_in_model(config, model)


@contextmanager
def merged_lora(model: nn.Module):
    """Fold LoRA adapters into their base weights for the duration (inference runs plain
    matmuls, ~no adapter overhead), then restore the base weights exactly: peft's `unmerge`
    subtracts the update again, which would leave float round-off behind after each use."""
    from peft.tuners.lora import LoraLayer

    # (a quantized base layer, polymodal.quantization, keeps its adapters beside it: not merged)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and not m.merged
              and isinstance(m.get_base_layer(), nn.Linear)]
    saved = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    try:
        for layer in layers:
            layer.merge()
        yield model
    finally:
        for layer, weight in zip(layers, saved):
            if layer.merged:
                layer.unmerge()
            with torch.no_grad():
                layer.get_base_layer().weight.copy_(weight)
