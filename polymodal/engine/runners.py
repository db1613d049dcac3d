"""Decoder runners: prefill a batch of embeddings, then one token per step, with a KV cache.

Each runner registers in `registry.RUNNERS` with the models it supports and a rank
(lower runs faster); `make_runner` picks the fastest that supports the model.
`LlamaRunner` ("llama") drives the Llama family (Llama, SmolLM2, Qwen2, Mistral) through
the shared decoder-layer step (`engine.decoder`) and a preallocated `KVCache`;
`TransformersRunner` ("transformers") works for any transformers causal LM through its
own forward() and cache.

Both return next-token logits, or with `output_hidden` set the last hidden states [B, D]
(after the final norm, as the training forward's) for a head of the caller's own (MAR's flow
head); `step_embeddings` feeds input embeddings [B, D] instead of token ids (a drawn latent's
projection).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from transformers import DynamicCache

from polymodal.engine.decoder import LlamaDecoder, TokenLayout, rms_norm
from polymodal.engine.kv_cache import KVCache
from polymodal.errors import UserError
from polymodal.fusion.context import FusionState
from polymodal.registry import RUNNERS, register_runner


def make_runner(model, name: str | None = None):
    """A runner for the transformers causal LM `model`: the one registered as `name`, or
    else the fastest (lowest `rank`) that supports the model.

    Raises:
        UserError: `name` is not a registered runner, or does not support this model.
    """
    if name is not None:
        runner = RUNNERS.get(name).builder
        if not runner.supports(model):
            raise UserError(f"the {name!r} runner does not support a {model.config.model_type} model")
        return runner(model)
    runners = sorted((entry.builder for entry in RUNNERS.entries()), key=lambda runner: runner.rank)
    return next(runner for runner in runners if runner.supports(model))(model)


@register_runner("llama")
class LlamaRunner:
    """Llama-family decoding: the model's own modules, a preallocated KVCache, SDPA."""

    rank = 0
    supports = staticmethod(LlamaDecoder.supports)

    def __init__(self, model):
        self.decoder = LlamaDecoder(model)
        self.cache: KVCache | None = None
        self.rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [slots, head_dim]
        self.length = 0  # slots filled, the same in every row (left padding evens the prompts)
        self.positions: torch.Tensor | None = None  # [B] position of each row's next token
        self.fusion: FusionState | None = None  # a fusion inside the layers: its rows' state
        self.output_hidden = False  # return last hidden states [B, D] instead of logits [B, V]

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, max_length: int,
                fusion: FusionState | None = None, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """embeds [B, T, D], attention_mask [B, T] (left padding) -> last-position logits [B, V];
        the cache holds `max_length` slots per row (prompt and new tokens). A fusion inside
        the layers gives its rows' state (`MultimodalLM.prepare`) and the ids [B, T]."""
        self._allocate(embeds, max_length)
        self.fusion = fusion
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
        self.positions = positions[:, -1] + 1
        return self._output(self._forward(embeds, positions, attention_mask.bool(), input_ids))

    def prefill_shared(self, prefix: torch.Tensor, prefix_mask: torch.Tensor, owner: torch.Tensor,
                       suffix: torch.Tensor, suffix_mask: torch.Tensor, max_length: int,
                       fusion: FusionState | None = None, prefix_ids: torch.Tensor | None = None,
                       suffix_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Prompts that share a prefix (system prompt + image) compute it once.

        prefix [G, P, D] and prefix_mask [G, P], left padded; owner [B]: the prefix of each
        row; suffix [B, S, D] and suffix_mask [B, S], left padded (the padding sits between
        prefix and suffix, masked out). Returns last-position logits [B, V]. A fusion's state
        has the G prefixes' rows; the ids [G, P] and [B, S] go with it.
        """
        self._allocate(prefix, max_length)
        self.fusion = fusion
        self._forward(prefix, (prefix_mask.cumsum(-1) - 1).clamp(min=0), prefix_mask.bool(), prefix_ids)
        self.cache.select_rows(owner)  # every row starts from a copy of its prefix: [G] -> [B]
        if fusion is not None:
            fusion.select_rows(owner)
        before = prefix_mask.sum(-1)[owner]  # [B] real prefix tokens of each row
        positions = before[:, None] + (suffix_mask.cumsum(-1) - 1).clamp(min=0)  # [B, S]
        self.positions = positions[:, -1] + 1
        return self._output(self._forward(suffix, positions, suffix_mask.bool(), suffix_ids))

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [B] -> next logits [B, V]; one slot more per row."""
        return self.step_embeddings(self.decoder.embed(token_ids), token_ids)

    def step_embeddings(self, embeds: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """embeds [B, D], the next input of each row (input_ids [B]: their ids, for a fusion's
        call) -> next logits [B, V] (or hidden states [B, D]); one slot more per row."""
        positions = self.positions[:, None]
        self.positions = self.positions + 1
        return self._output(self._forward(embeds[:, None], positions,
                                          input_ids=None if input_ids is None else input_ids[:, None]))

    def _output(self, last: torch.Tensor) -> torch.Tensor:
        """The last layer's output [B, D] -> logits [B, V], or the final norm's [B, D]."""
        return rms_norm(self.decoder.body.norm, last) if self.output_hidden else self.decoder.logits(last)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Carry on with only these rows [B'] of the batch (the others finished)."""
        self.cache.select_rows(rows)
        self.positions = self.positions[rows]
        if self.fusion is not None:
            self.fusion.select_rows(rows)

    def _allocate(self, embeds: torch.Tensor, max_length: int) -> None:
        """An empty cache of `max_length` slots for each row of embeds [B, T, D], and the
        rotary table once for every position this generation can reach."""
        self.cache = self.decoder.empty_cache(embeds.shape[0], max_length, embeds)
        self.rotary = self.decoder.rotary_table(max_length, embeds)
        self.length = 0
        self.decoder.forget_step()  # a new generation: the model is looked at again

    def _forward(self, hidden: torch.Tensor, positions: torch.Tensor, real: torch.Tensor | None = None,
                 input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B, T, D] at positions [B, T], the next T slots of every row -> the last
        layer's output at each row's last token [B, D]. `real` [B, T] marks the tokens that
        are not padding: only they run through the layers (padding exists only inside
        attention, masked out). input_ids [B, T]: the tokens, for a fusion's call."""
        batch, length, _ = hidden.shape
        slots = torch.arange(self.length, self.length + length)[None]  # [1, T]
        layout = TokenLayout.place(self.cache, self.rotary, slice(0, batch), slots, positions, real)
        tokens = hidden.reshape(-1, hidden.shape[-1]) if layout.real is None else hidden[layout.real]
        with fusion_call(self.fusion, input_ids, layout.real):
            tokens = self.decoder.run(tokens, self.cache, layout)  # [N, D]
        self.length += length
        if layout.real is None:
            return tokens.view(batch, length, -1)[:, -1]
        return tokens[layout.real.sum(-1).cumsum(0) - 1]  # left padding: a row's last token ends its run


@register_runner("transformers")
class TransformersRunner:
    """Any transformers causal LM through its own forward() and DynamicCache."""

    rank = 100

    @staticmethod
    def supports(model) -> bool:
        return True

    def __init__(self, model):
        self.model = model
        self.cache: DynamicCache | None = None
        self.attention_mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.fusion: FusionState | None = None
        self.output_hidden = False  # return last hidden states [B, D] instead of logits [B, V]

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, max_length: int,
                fusion: FusionState | None = None, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """As LlamaRunner.prefill; the cache grows as it goes (`max_length` is not needed)."""
        self.cache = DynamicCache()
        self.attention_mask = attention_mask
        self.fusion = fusion
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        self.positions = positions[:, -1] + 1
        with fusion_call(fusion, input_ids):
            return self._run(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions)

    def prefill_shared(self, prefix: torch.Tensor, prefix_mask: torch.Tensor, owner: torch.Tensor,
                       suffix: torch.Tensor, suffix_mask: torch.Tensor, max_length: int,
                       fusion: FusionState | None = None, prefix_ids: torch.Tensor | None = None,
                       suffix_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The same answer as LlamaRunner.prefill_shared, by copying each prefix into its rows."""
        embeds = torch.cat([prefix[owner], suffix], dim=1)
        input_ids = None
        if fusion is not None:
            fusion.select_rows(owner)
            input_ids = torch.cat([prefix_ids[owner], suffix_ids], dim=1)
        return self.prefill(embeds, torch.cat([prefix_mask[owner], suffix_mask], dim=1), max_length,
                            fusion, input_ids)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Carry on with only these rows [B'] of the batch (the others finished)."""
        self.cache.batch_select_indices(rows)
        self.attention_mask, self.positions = self.attention_mask[rows], self.positions[rows]
        if self.fusion is not None:
            self.fusion.select_rows(rows)

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [B] -> next logits [B, V]."""
        return self._step(token_ids, input_ids=token_ids[:, None])

    def step_embeddings(self, embeds: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """As LlamaRunner.step_embeddings: embeds [B, D] -> next logits [B, V] (or hidden [B, D])."""
        return self._step(input_ids, inputs_embeds=embeds[:, None])

    def _step(self, token_ids: torch.Tensor | None, **inputs) -> torch.Tensor:
        ones = self.attention_mask.new_ones(self.attention_mask.shape[0], 1)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        with fusion_call(self.fusion, None if token_ids is None else token_ids[:, None]):
            out = self._run(**inputs, attention_mask=self.attention_mask, position_ids=self.positions[:, None])
        self.positions = self.positions + 1
        return out

    def _run(self, **inputs) -> torch.Tensor:
        """One forward of the model over `inputs` with the cache -> the last position's logits
        [B, V], or its hidden state [B, D] (the decoder alone: no logits computed)."""
        if self.output_hidden:
            return self.model.get_decoder()(**inputs, cache=self.cache, use_cache=True).last_hidden_state[:, -1]
        return self.model(**inputs, cache=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]


def fusion_call(state: FusionState | None, input_ids: torch.Tensor | None, real: torch.Tensor | None = None):
    """The fusion call of a decoder call of input_ids [B, T] over every row of `state` (a
    fusion inside the layers), or nothing for inline fusion (state None)."""
    if state is None:
        return nullcontext()
    if input_ids is None:  # a caller's bug: the ids say which tokens are media
        raise RuntimeError("a fusion inside the decoder needs the input ids of every call")
    return state.call(input_ids, real=real)
