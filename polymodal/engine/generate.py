"""The one generation path: chat, eval and serve all call Engine.

Batched with left padding, a KV cache, greedy or sampled, stop strings and EOS,
and a streaming iterator of text pieces.

Example:
    engine = Engine(model)
    [answer] = engine.generate([{"messages": [{"role": "user", "content": "Hi"}]}])
    for piece in engine.stream({"messages": ...}, SamplingParams(max_new_tokens=64)):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from polymodal.engine.images import TEXT, constrain, guided, next_left, unconditional_prompt
from polymodal.engine.runners import make_runner
from polymodal.engine.sampling import SamplingParams, choice_seed, choose_next
from polymodal.engine.text import TextTracker
from polymodal.errors import UserError, check_context_length
from polymodal.llm import merged_lora
from polymodal.processing import collate
from polymodal.processing.branches import common_prefix_length


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    images: list[torch.Tensor] = field(default_factory=list)  # drawn: pixels [3, S, S] in [0, 1]


@dataclass
class _Row:
    tracker: TextTracker
    prompt_tokens: int
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    left: int = TEXT  # codes still to write in an image block (engine.images)
    drawn: list[list[int]] = field(default_factory=list)  # each image's codes


class Engine:
    """Generates answers for a MultimodalLM. `use_cache=False` recomputes every step (for tests).

    Named as nanochat's `Engine` (and not Generator, which torch.Generator, the random
    number generator sampling takes, already is)."""

    def __init__(self, model, use_cache: bool = True):
        if getattr(model, "llm", None) is None:  # e.g. a dual encoder: it embeds, it has no LLM
            raise UserError(f"this model cannot generate text (a {type(model).__name__} has no "
                            f"LLM); use it with embed, index, search, or eval --task zeroshot, "
                            f"retrieval or audio-image")
        self.model = model.eval()
        self.use_cache = use_cache
        self.stop_ids = model.llm.stop_token_ids()
        # Never emit the image placeholder or the padding rows added when resizing embeddings.
        self.vocab_limit = len(model.llm.tokenizer)
        self.image_token_id = model.llm.image_token_id
        self.placeholder_ids = list(model.placeholder_ids.values())  # every modality's, never emitted
        self.image_codes = getattr(model, "image_codes", None)  # a model that draws: its code tokens
        self._merged = False  # inside lora_merged()

    def encode(self, prompt: dict) -> dict:
        """{"messages": [...], "images": [...], "media": {modality: [...]}} -> ids and each
        modality's encoder inputs (`Processor.encode`); already-encoded prompts pass."""
        if "input_ids" in prompt:
            return prompt
        return self.model.processor.encode(prompt["messages"], prompt.get("images", ()), media=prompt.get("media"))

    def generate(self, prompts: list[dict], params: SamplingParams | None = None) -> list[Completion]:
        """Answer a batch of prompts together."""
        params = params or SamplingParams()
        rows: list[_Row] = []
        for rows in self.steps(prompts, params):  # noqa: B007 - run to the end, keep the last
            pass
        return [Completion(row.tracker.text, row.token_ids, row.finish_reason or "length",
                           row.prompt_tokens, self.decode_images(row.drawn)) for row in rows]

    def stream(self, prompt: dict, params: SamplingParams | None = None) -> Iterator[str]:
        """Text pieces of one answer as they are generated."""
        emitted = 0
        for [row] in self.steps([prompt], params or SamplingParams()):
            text = row.tracker.text[: row.tracker.emitted]
            if len(text) > emitted:
                yield text[emitted:]
                emitted = len(text)

    @contextmanager
    def lora_merged(self):
        """Keep LoRA folded into the base weights across many generate calls (eval, serving)
        instead of folding and restoring it for each call."""
        if self._merged:
            yield
            return
        with merged_lora(self.model.llm.model):
            self._merged = True
            try:
                yield
            finally:
                self._merged = False

    @torch.inference_mode()
    def steps(self, prompts: list[dict], params: SamplingParams) -> Iterator[list[_Row]]:
        """Run generation, yielding every row's state after each new token.

        Raises:
            ContextLengthError: the longest prompt plus `max_new_tokens` is over the context.
        """
        samples = [self.encode(prompt) for prompt in prompts]
        longest = max(len(sample["input_ids"]) for sample in samples)
        check_context_length(longest, params.max_new_tokens, self.model.llm.max_length)
        tokenizer = self.model.llm.tokenizer
        rows = [_Row(TextTracker(tokenizer, params.stop), len(s["input_ids"])) for s in samples]
        shared = shared_prefixes(prompts, samples, self.image_token_id) if self.use_cache else None
        with self.lora_merged():
            yield from self._decode(rows, samples, shared, params)

    def _decode(self, rows: list[_Row], samples: list[dict], shared: SharedPrefixes | None,
                params: SamplingParams) -> Iterator[list[_Row]]:
        runner = make_runner(self.model.llm.model)
        if shared is not None:
            logits = self._prefill_shared(runner, shared, params.max_new_tokens)
        else:
            batch = collate(samples, self.model.pad_id, left_pad=True)
            ids, mask = batch.input_ids, batch.attention_mask  # [B, T], T = the longest prompt
            embeds, fusion = self.model.prepare(ids, batch.media)
            logits = runner.prefill(embeds, mask, ids.shape[1] + params.max_new_tokens, fusion, ids)
        generator = params.generator()
        live = list(range(len(rows)))  # the rows still generating, in the runner's batch order
        for made in range(params.max_new_tokens):
            allowed = self.allowed_logits(logits)
            if self.image_codes is not None:
                allowed = constrain(allowed, self.image_codes, [rows[i].left for i in live],
                                    params.max_new_tokens - made)
            next_ids = choose_next(allowed, params, generator)  # [len(live)]
            self._advance([rows[i] for i in live], next_ids.tolist(), set() if params.ignore_eos else self.stop_ids)
            yield rows
            if all(row.finish_reason for row in rows):
                return
            if self.use_cache:
                # Finished rows leave the batch, a step costing in proportion to its rows; in
                # eighths, as copying the cache costs about as much as a step.
                going = [k for k, i in enumerate(live) if not rows[i].finish_reason]
                if len(live) - len(going) >= max(1, len(live) // 8):
                    runner.keep_rows(torch.tensor(going))
                    next_ids, live = next_ids[going], [live[k] for k in going]
                logits = runner.step(next_ids)
            else:  # recompute the whole sequence: the reference the cache must match
                ids = torch.cat([ids, next_ids[:, None]], dim=1)
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                embeds, fusion = self.model.prepare(ids, batch.media)
                logits = make_runner(self.model.llm.model).prefill(embeds, mask, ids.shape[1], fusion, ids)
        for row in rows:
            if not row.finish_reason:
                row.finish_reason = "length"
                row.tracker.finish()
        yield rows

    def _advance_image(self, row: _Row, token: int) -> None:
        """A token of an image block: kept with the row's ids, its codes with the image, no text."""
        codes = self.image_codes
        row.token_ids.append(token)
        if token == codes.begin_id:
            row.drawn.append([])
        elif row.left > 0:
            row.drawn[-1].append(token - codes.first_code_id)
        row.left = next_left(codes, row.left, token)

    @torch.inference_mode()
    def generate_images(self, prompts: list[dict], params: SamplingParams | None = None, n: int = 1) -> torch.Tensor:
        """Draw `n` images for each prompt: pixels [len(prompts) * n, 3, S, S] in [0, 1], prompt
        by prompt (prompt 0's n images first).

        Each row's answer is forced to begin an image block and holds exactly K codes
        (engine.images); with `params.guidance_scale` s != 1 each row runs beside its
        unconditional twin (`unconditional_prompt`) and samples from u + s (c - u). Image j of
        a prompt samples with seed `choice_seed(params.seed, j)`, so a batch draws what each
        prompt drawn alone would. Temperature, top-k and top-p apply to the guided logits.
        A model of kind flow (MAR) draws K continuous latents instead (`_draw_flow`): the
        temperature scales its start noise, top-k and top-p do not apply.

        Raises:
            UserError: the model does not draw (no image tokens), or a prompt is too long.
        """
        flow = getattr(self.model, "image_flow", None)
        codes = self.image_codes if flow is None else flow.layout  # the block's ids
        if codes is None:
            raise UserError("this model does not draw images (it has no image_output); "
                            "train one with an image tokenizer (docs/image-generation.md)")
        params = params or SamplingParams()
        samples = [self.encode(prompt) for prompt in prompts for _ in range(n)]
        guidance = params.guidance_scale != 1.0
        if guidance:
            samples += [self.encode(unconditional_prompt(prompt)) for prompt in prompts for _ in range(n)]
        samples = [{**sample, "input_ids": [*sample["input_ids"], codes.begin_id]} for sample in samples]
        longest = max(len(sample["input_ids"]) for sample in samples)
        check_context_length(longest, codes.num_codes + 1, self.model.llm.max_length)
        generators = [None if params.seed is None else torch.Generator().manual_seed(choice_seed(params.seed, j))
                      for _ in prompts for j in range(n)]
        with self.lora_merged():
            if flow is not None:
                latents = self._draw_flow(samples, params, generators, guidance)  # [P * n, K, d]
                return self.model.image_tokenizer.decode_latents(latents).float().clamp(0, 1)
            drawn = self._draw(samples, params, generators, guidance)  # [P * n, K]
        return self.model.image_tokenizer.decode(drawn).float().clamp(0, 1)

    def generate_images_in_batches(self, prompts: list[dict], params: SamplingParams, n: int,
                                   batch_size: int, progress=None) -> torch.Tensor:
        """What `generate_images(prompts, params, n)` draws (pixels [len(prompts) * n, 3, S, S]
        in [0, 1] on the CPU, the same images for a seeded `params`), at most `batch_size`
        images per engine call, so that the KV cache of a large `n` stays bounded. Image j of a
        prompt split across calls keeps seed `choice_seed(params.seed, j)`. `progress(count)`
        hears of each call's images.

        Raises:
            UserError: as generate_images; ValueError: no prompts, n < 1 or batch_size < 1.
        """
        if not prompts or n < 1 or batch_size < 1:
            raise ValueError(f"need prompts, n >= 1 and batch_size >= 1; got {len(prompts)} prompts, "
                             f"n {n}, batch_size {batch_size}")
        # calls: (prompts of the call, images per prompt, seed offset of its first image)
        if n <= batch_size:
            per_call = batch_size // n
            calls = [(prompts[start : start + per_call], n, 0) for start in range(0, len(prompts), per_call)]
        else:
            calls = [([prompt], min(batch_size, n - first), first) for prompt in prompts
                     for first in range(0, n, batch_size)]
        drawn = []
        with self.lora_merged():
            for group, count, first in calls:
                shifted = params if params.seed is None else replace(params, seed=choice_seed(params.seed, first))
                drawn.append(self.generate_images(group, shifted, count).float().cpu())
                if progress is not None:
                    progress(len(group) * count)
        return torch.cat(drawn)

    def _draw(self, samples: list[dict], params: SamplingParams, generators: list, guidance: bool) -> torch.Tensor:
        """The K codes [B, K] of each conditional row (the first B of `samples`; with guidance
        the next B are their twins)."""
        codes = self.image_codes
        runner = make_runner(self.model.llm.model)
        batch = collate(samples, self.model.pad_id, left_pad=True)
        embeds, fusion = self.model.prepare(batch.input_ids, batch.media)
        logits = runner.prefill(embeds, batch.attention_mask, batch.input_ids.shape[1] + codes.num_codes,
                                fusion, batch.input_ids)
        rows = len(generators)
        drawn = []
        for _ in range(codes.num_codes):
            code_logits = logits[:, codes.first_code_id :].float()  # [B or 2B, C]
            code_logits = guided(code_logits[:rows], code_logits[rows:], params.guidance_scale) \
                if guidance else code_logits
            chosen = torch.cat([choose_next(code_logits[i : i + 1], params, generators[i]) for i in range(rows)])
            drawn.append(chosen)
            token_ids = codes.to_token_ids(chosen)
            logits = runner.step(torch.cat([token_ids, token_ids]) if guidance else token_ids)
        return torch.stack(drawn, dim=1)

    def _draw_flow(self, samples: list[dict], params: SamplingParams, generators: list,
                   guidance: bool) -> torch.Tensor:
        """Kind flow: the K latents [B, K, d] of each conditional row (the first B of `samples`;
        with guidance the next B are their twins). Each step the flow head samples a latent
        from the last position's hidden state (MAR; guided by the twin's: v_u + s (v_c - v_u)),
        and the latent's projection is the next input of both rows."""
        flow = self.model.image_flow
        runner = make_runner(self.model.llm.model)
        runner.output_hidden = True
        batch = collate(samples, self.model.pad_id, left_pad=True)
        embeds, fusion = self.model.prepare(batch.input_ids, batch.media)
        hidden = runner.prefill(embeds, batch.attention_mask, batch.input_ids.shape[1] + flow.layout.num_codes,
                                fusion, batch.input_ids)  # [B or 2B, D]
        rows = len(generators)
        generator = generators if params.seed is not None else None
        drawn = []
        for index in range(flow.layout.num_codes):
            twins = (hidden[rows:], params.guidance_scale) if guidance else None
            latent = flow.head.sample(hidden[:rows], flow.sampling_steps, generator, params.temperature, twins)
            drawn.append(latent)  # [B, d]
            if index + 1 < flow.layout.num_codes:  # the last latent's position predicts nothing
                inputs = flow.latent_embeddings(torch.cat([latent, latent]) if guidance else latent)
                ids = torch.full((len(inputs),), flow.latent_id)
                hidden = runner.step_embeddings(inputs.to(embeds.dtype), ids)
        return torch.stack(drawn, dim=1)

    @torch.inference_mode()
    def first_token_logits(self, prompts: list[dict]) -> torch.Tensor:
        """Logits [B, V] of each prompt's first answer token: scores for fixed answers."""
        samples = [self.encode(prompt) for prompt in prompts]
        shared = shared_prefixes(prompts, samples, self.image_token_id)
        with self.lora_merged():
            runner = make_runner(self.model.llm.model)
            if shared is not None:
                return self._prefill_shared(runner, shared, 1).float()
            batch = collate(samples, self.model.pad_id, left_pad=True)
            embeds, fusion = self.model.prepare(batch.input_ids, batch.media)
            return runner.prefill(embeds, batch.attention_mask, embeds.shape[1] + 1, fusion,
                                  batch.input_ids).float()

    def _prefill_shared(self, runner, shared: SharedPrefixes, max_new_tokens: int) -> torch.Tensor:
        """Each distinct prefix (its images encoded once) runs once; then every row's own text."""
        prefixes = collate(shared.prefixes, self.model.pad_id, left_pad=True)
        suffixes = collate([{"input_ids": ids} for ids in shared.suffixes], self.model.pad_id, left_pad=True)
        prefix_embeds, fusion = self.model.prepare(prefixes.input_ids, prefixes.media)  # [G, P, D]
        suffix_embeds = self.model.llm.embed(suffixes.input_ids)  # [B, S, D]
        slots = prefix_embeds.shape[1] + suffix_embeds.shape[1] + max_new_tokens
        return runner.prefill_shared(prefix_embeds, prefixes.attention_mask, torch.tensor(shared.owner),
                                     suffix_embeds, suffixes.attention_mask, slots, fusion,
                                     prefixes.input_ids, suffixes.input_ids)

    def allowed_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> float logits [B, V] with -inf at the tokens never emitted: the media
        placeholders and the padding rows added when resizing the embeddings. (A model that
        draws scores its image tokens past those rows: `engine.images.constrain` rules them.)"""
        logits = logits.float()
        end = None if self.image_codes is None else self.image_codes.text_vocab
        logits[:, self.vocab_limit : end] = float("-inf")
        logits[:, self.placeholder_ids] = float("-inf")
        return logits

    def decode_images(self, drawn: list[list[int]]) -> list[torch.Tensor]:
        """Each image's K codes -> pixels [3, S, S] in [0, 1], by the model's image tokenizer."""
        if not drawn:
            return []
        with torch.inference_mode():
            return list(self.model.image_tokenizer.decode(torch.tensor(drawn)).float().clamp(0, 1))

    def _advance(self, rows: list[_Row], next_ids: list[int], stop_ids: set[int]) -> None:
        for row, token in zip(rows, next_ids):
            if row.finish_reason:
                continue
            if self.image_codes is not None and (row.left != TEXT or token == self.image_codes.begin_id):
                self._advance_image(row, token)
                continue
            if token in stop_ids:
                row.finish_reason = "stop"
                row.tracker.finish()
                continue
            row.token_ids.append(token)
            row.tracker.push(token)
            if row.tracker.stopped:
                row.finish_reason = "stop"


@dataclass
class SharedPrefixes:
    """Prompts split after their last image: the distinct prefixes and each row's own text."""

    prefixes: list[dict]  # {input_ids, pixel_values}, one per distinct (text, images) prefix
    owner: list[int]  # [B] index of each row's prefix
    suffixes: list[list[int]]  # [B] the ids after the prefix


def media_key(image) -> str | int:
    """Which image this is, for sharing: a path by its value, any other object (pixels,
    PIL image) by its identity."""
    return image if isinstance(image, str) else id(image)


def shared_prefixes(prompts: list[dict], samples: list[dict], image_token_id: int) -> SharedPrefixes | None:
    """Group prompts whose text up to their last image is the same and whose images are
    the same objects (or paths); None when no two prompts share one. Text-only prompts
    share the ids they all begin with (a system prompt and the template's headers)."""
    if any(set(sample.get("media") or {}) - {"image"} for sample in samples):
        return None  # other media (a spoken question) come after the image: each row runs whole
    if not any(image_token_id in sample["input_ids"] for sample in samples):
        return common_text_prefix([sample["input_ids"] for sample in samples])
    groups: dict[tuple, int] = {}
    prefixes, owner, suffixes = [], [], []
    for prompt, sample in zip(prompts, samples):
        ids = sample["input_ids"]
        if image_token_id not in ids:
            return None
        cut = len(ids) - ids[::-1].index(image_token_id)  # just after the last image token
        if cut == len(ids):
            return None  # nothing after the image: no row of its own to run
        images = prompt.get("images", [sample.get("pixel_values")])
        key = (tuple(ids[:cut]), tuple(media_key(i) for i in images))
        if key not in groups:
            groups[key] = len(prefixes)
            prefixes.append({"input_ids": ids[:cut], "pixel_values": sample["pixel_values"]})
        owner.append(groups[key])
        suffixes.append(ids[cut:])
    return SharedPrefixes(prefixes, owner, suffixes) if len(prefixes) < len(prompts) else None


def common_text_prefix(ids: list[list[int]]) -> SharedPrefixes | None:
    """Text-only prompts as one shared prefix (the ids all of them begin with, leaving each
    at least one of its own) and their own rest; None for one prompt or nothing shared.
    The replay questions of the easy-VQA recipe share 12 of their ~27 tokens."""
    if len(ids) < 2:
        return None
    cut = min(common_prefix_length(ids), min(map(len, ids)) - 1)
    if cut < 1:
        return None
    return SharedPrefixes([{"input_ids": ids[0][:cut], "pixel_values": None}], [0] * len(ids),
                          [row[cut:] for row in ids])
