"""Continuous batching: one background thread runs the model; requests join the running
batch between decode steps (prefilled one by one into a free slot of the `SlotCache`)
and leave it when they finish or are cancelled, freeing their slot for the next step.

The HTTP layer submits requests and reads their events; it never touches the model.

Example:
    engine = BatchingEngine(model, max_batch=16).start()
    request = engine.submit({"messages": [...], "images": [...]}, SamplingParams(max_new_tokens=32))
    for kind, value in request.events():   # ("text", piece) ... then ("done", Finished)
        ...

A request's own parameters, prompt or any error while handling its row fail that request
alone (an ("error", message) event); only a failure of the shared decode step fails the
rows that ran in it.

A model that draws (`model.image_codes`, issue 17) is served in the same steps: a chat row
that takes `<begin_of_image>` writes a complete block (engine.images, the rules of
`Engine`) and sends the image as an ("image", pixels) event; `submit_images` queues drawing
requests, each a row forced into a block of exactly K codes, with its unconditional twin
row beside it under classifier-free guidance (two slots, admitted together).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from polymodal.engine.decoder import LLAMA_FAMILY, LlamaDecoder
from polymodal.engine.generate import Engine
from polymodal.engine.images import TEXT, constrain, guided, next_left, unconditional_prompt
from polymodal.engine.sampling import SamplingParams, choice_seed, choose_next
from polymodal.engine.slots import SlotCache
from polymodal.engine.text import TextTracker
from polymodal.errors import UserError, check_context_length

logger = logging.getLogger(__name__)

MAX_ADMITS_PER_STEP = 4  # new prompts prefilled between two decode steps, so running ones keep going


class QueueFull(Exception):
    """More requests are waiting than the engine accepts; the client should retry later."""


@dataclass
class Finished:
    text: str
    finish_reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    images: list[torch.Tensor] = field(default_factory=list)  # drawn: pixels [3, S, S] in [0, 1]


@dataclass
class Request:
    id: int
    input_ids: list[int]
    media: dict[str, torch.Tensor]  # modality -> the prompt's encoder inputs [N, ...] (pixels, log-mel)
    params: SamplingParams
    queue: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    draws: bool = False  # a drawing: the prompt ends in <begin_of_image>, the answer is K codes
    unconditional: dict | None = None  # a guided drawing's twin prompt: {"input_ids", "media"}

    @property
    def slots(self) -> int:
        """Rows of the batch this request runs in: 2 for a guided drawing (its twin), else 1."""
        return 1 if self.unconditional is None else 2

    def cancel(self) -> None:
        """Free this request's slot at the next step (a client went away)."""
        self.cancelled.set()

    def events(self, timeout: float | None = None):
        """("text", piece) for each new piece of the answer, then ("done", Finished) or
        ("error", message). With `params.logprobs`, ("logprobs", [entry, ...]) events come
        before the text of their tokens (entries of held-back text come before "done"). A
        chat answer that draws sends ("image", pixels [3, S, S]) when each image is complete."""
        while True:
            kind, value = self.queue.get(timeout=timeout)
            yield kind, value
            if kind in ("done", "error"):
                return


@dataclass
class _Row:
    request: Request
    tracker: TextTracker
    generator: torch.Generator | None
    last_token: int = 0
    count: int = 0
    sent: int = 0  # characters of the text already sent
    logprobs: list = field(default_factory=list)  # entries not sent yet
    left: int = TEXT  # codes still to write in an image block (engine.images)
    drawn: list[list[int]] = field(default_factory=list)  # each image's codes
    images: list[torch.Tensor] = field(default_factory=list)  # complete images: pixels [3, S, S]
    twin: _Row | None = None  # a guided drawing's unconditional row: it takes this row's codes
    is_twin: bool = False


class BatchingEngine:
    def __init__(self, model, max_batch: int = 16, max_queue: int = 64, max_length: int | None = None):
        if not LlamaDecoder.supports(model.llm.model):  # the slots run the Llama decoder step
            raise UserError(f"serving batches Llama-family LLMs ({', '.join(sorted(LLAMA_FAMILY))}) "
                            f"without a sliding window; this one is {model.llm.model.config.model_type}")
        self.model = model.eval()
        self.engine = Engine(model)  # prompt encoding, stop ids, allowed tokens
        self.max_length = min(max_length or model.llm.max_length, model.llm.max_length)
        self.cache = SlotCache(model.llm.model, max_batch, self.max_length)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: deque[Request] = deque()
        self.rows: list[_Row] = []
        self.lock = threading.Condition()
        self.ids = itertools.count(1)
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="polymodal-engine", daemon=True)
        self.on_finish = None  # callback(request, Finished), e.g. for metrics
        # A model whose image blocks are code tokens (image_output.kind tokens) draws here; a
        # flow model's markers are masked for its chat rows, as Engine masks them.
        self.codes = self.engine.image_codes

    def start(self) -> BatchingEngine:
        _merge_lora_for_good(self.model.llm.model)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop the model thread; requests still waiting or running get an error event."""
        with self.lock:
            self.stopped = True
            self.lock.notify()
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        with self.lock:
            waiting, self.waiting = list(self.waiting), deque()
        for request in waiting:
            request.queue.put(("error", "the server is shutting down"))
        if not self.thread.is_alive():
            self._fail_running("the server is shutting down")

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.rows)

    def encode(self, prompt: dict) -> dict:
        """A prompt -> {"input_ids", "media"}; slow (media, tokenizer): callers on an
        event loop run it in a thread. Errors are the caller's: UserError."""
        return self.engine.encode(prompt)

    def submit(self, prompt: dict, params: SamplingParams) -> Request:
        """Encode a prompt (errors are the caller's: UserError) and queue it."""
        return self.submit_many(prompt, [params])[0]

    def submit_many(self, prompt: dict, params: list[SamplingParams]) -> list[Request]:
        """Queue one request per entry of `params` for the same prompt (OpenAI's `n`), all of
        them or none: QueueFull when they do not all fit, ContextLengthError when a prompt
        plus its `max_new_tokens` is over the context, UserError for a prompt that cannot
        be encoded."""
        encoded = self.encode(prompt)
        for each in params:
            check_context_length(len(encoded["input_ids"]), each.max_new_tokens, self.max_length)
        requests = [Request(next(self.ids), encoded["input_ids"], encoded["media"], each)
                    for each in params]
        self._queue(requests)
        return requests

    def submit_images(self, prompt: dict, params: SamplingParams, n: int = 1) -> list[Request]:
        """Queue `n` drawings of one chat prompt ({"messages": [...]}, not encoded), all or none:
        drawing j is a request seeded `choice_seed(params.seed, j)` whose prompt ends in
        `<begin_of_image>` and whose answer is exactly K codes, sampled over the codebook (at
        temperature / top-k / top-p) from the guided logits u + s (c - u) of its row and its
        unconditional twin's (`engine.images`) when `params.guidance_scale` s != 1. Its "done"
        carries the image (Finished.images: [pixels [3, S, S]]): what `Engine.generate_images`
        draws for the same prompt and params. Slow (encodes): callers on an event loop run it
        in a thread.

        Raises:
            UserError: the model does not draw, guidance on a server of one slot, a bad prompt.
            ContextLengthError: a prompt plus K codes is over the context.
            QueueFull: the `n` drawings do not all fit in the queue.
        """
        codes = self.drawing_codes()
        if params.guidance_scale != 1.0 and self.max_batch < 2:
            raise UserError("classifier-free guidance runs two rows per image; this server batches "
                            "1 (--max-batch): send guidance_scale 1")
        prompts = [prompt] + ([unconditional_prompt(prompt)] if params.guidance_scale != 1.0 else [])
        encoded = []
        for each in prompts:
            sample = self.encode(each)
            check_context_length(len(sample["input_ids"]) + 1, codes.num_codes, self.max_length,
                                 asked_as="the image's codes")
            encoded.append({"input_ids": [*sample["input_ids"], codes.begin_id], "media": sample["media"]})
        requests = []
        for j in range(n):
            seed = None if params.seed is None else choice_seed(params.seed, j)
            each = dataclasses.replace(params, max_new_tokens=codes.num_codes, seed=seed, stop=[])
            requests.append(Request(next(self.ids), encoded[0]["input_ids"], encoded[0]["media"], each,
                                    draws=True, unconditional=encoded[1] if len(encoded) > 1 else None))
        self._queue(requests)
        return requests

    def drawing_codes(self):
        """The model's image codes (image_generation.codes.ImageCodes); UserError when this
        server cannot draw with it."""
        if self.codes is not None:
            return self.codes
        if getattr(self.model, "image_flow", None) is not None:
            raise UserError("the server draws with image-code models (image_output.kind tokens); "
                            "this one is kind flow: draw with `polymodal generate`")
        raise UserError("this model does not draw images (it has no image_output); "
                        "serve a model trained to draw (docs/image-generation.md)")

    def _queue(self, requests: list[Request]) -> None:
        """Queue all of `requests` or none (QueueFull)."""
        with self.lock:
            self._drop_cancelled_waiting()
            if len(self.waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting")
            self.waiting.extend(requests)
            self.lock.notify()

    def _drop_cancelled_waiting(self) -> None:
        """Cancelled requests leave the queue now rather than hold places in it (lock held)."""
        if any(request.cancelled.is_set() for request in self.waiting):
            kept = deque()
            for request in self.waiting:
                if request.cancelled.is_set():
                    self._finish_request(request, Finished("", "cancelled", len(request.input_ids), 0))
                else:
                    kept.append(request)
            self.waiting = kept

    # ------------------------------------------------------------ the model thread

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.lock:
                    while not self.stopped and not self.waiting and not self.rows:
                        self.lock.wait()
                    if self.stopped:
                        return
                try:
                    self._drop_cancelled()
                    self._admit()
                    if self.rows:
                        self._step()
                except Exception as error:  # a failed step fails its requests, not the server
                    _log(error, f"a decoding step of {len(self.rows)} rows")
                    self._fail_running("generation failed")

    def _fail_running(self, message: str) -> None:
        for row in self.rows:
            if not row.is_twin:  # a twin's request is its drawing's, told once
                row.request.queue.put(("error", message))
        self.rows.clear()
        self.cache.active = 0

    def _admit(self) -> None:
        for _ in range(MAX_ADMITS_PER_STEP):
            with self.lock:
                # A guided drawing takes two slots at once: it waits (and the queue behind it,
                # first come first served) until both are free.
                if not self.waiting or len(self.rows) + self.waiting[0].slots > self.max_batch:
                    return
                request = self.waiting.popleft()
            if request.cancelled.is_set():
                self._finish_request(request, Finished("", "cancelled", len(request.input_ids), 0))
                continue
            first = len(self.rows)
            try:  # one bad request must not stop the engine, nor go unanswered
                params = request.params
                row = _Row(request, TextTracker(self.model.llm.tokenizer, params.stop), params.generator(),
                           drawn=[[]] if request.draws else [])
                logits = [self._prefill(request.input_ids, request.media)]
            except Exception as error:
                _log(error, "a prompt's prefill")
                request.queue.put(("error", _one_line(error)))
                continue
            self.rows.append(row)
            if request.unconditional is not None:
                try:
                    logits.append(self._prefill(request.unconditional["input_ids"], request.unconditional["media"]))
                except Exception as error:
                    _log(error, "an unconditional prompt's prefill")
                    self._release(first, None, _one_line(error))
                    continue
                row.twin = _Row(request, row.tracker, None, is_twin=True)
                self.rows.append(row.twin)
            self._advance_rows(first, torch.cat(logits))

    def _prefill(self, input_ids: list[int], media: dict) -> torch.Tensor:
        """One prompt into the next free slot: its next-token logits [1, V]."""
        ids = torch.tensor([input_ids])
        embeds, fusion = self.model.prepare(ids, media)
        return self.cache.admit(embeds, fusion, ids)

    def _step(self) -> None:
        tokens = torch.tensor([row.last_token for row in self.rows])
        logits = self.cache.step(tokens)  # [n, V]
        self._advance_rows(0, logits)

    def _advance_rows(self, first: int, logits: torch.Tensor) -> None:
        """Advance the rows from `first` on (logits [m, V], one per row in the cache's order;
        a guided drawing's row with its twin's), then free those that are done. An error in
        a row ends that row's request alone."""
        rows = self.rows[first:]
        where = {id(row): k for k, row in enumerate(rows)}
        done = []
        for k, row in enumerate(rows):
            if row.is_twin:  # it takes the code its drawing's row samples
                continue
            try:
                twin = None if row.twin is None else logits[where[id(row.twin)]]
                reason = self._advance(row, logits[k], int(self.cache.lengths[first + k]), twin)
            except Exception as error:
                _log(error, "choosing a row's next token")
                done.append((row, None, f"generation failed: {_one_line(error)}"))
                continue
            if reason:
                done.append((row, reason, None))
        for row, reason, error in done:  # after advancing all: freeing a row moves another
            self._release(self._index_of(row), reason, error)

    def _index_of(self, row: _Row) -> int:
        return next(index for index, each in enumerate(self.rows) if each is row)

    def _advance(self, row: _Row, logits: torch.Tensor, length: int,
                 twin_logits: torch.Tensor | None = None) -> str | None:
        """Choose the row's next token from its logits [V] (its cache holds `length` slots;
        a guided drawing's twin gives its logits [V] too); send text; the finish reason if
        it is done."""
        params = row.request.params
        if row.request.draws:
            return self._advance_drawing(row, logits, twin_logits)
        allowed = self.engine.allowed_logits(logits[None])  # [1, V] float
        if self.codes is not None:  # image blocks always complete: Engine's rules
            budget = min(params.max_new_tokens - row.count, self.max_length - length + 1)
            allowed = constrain(allowed, self.codes, [row.left], budget)
        token = int(choose_next(allowed, params, row.generator)[0])
        if self.codes is not None and (row.left != TEXT or token == self.codes.begin_id):
            return self._advance_image(row, token, length)
        stop_ids = set() if params.ignore_eos else self.engine.stop_ids
        reason = None
        if token in stop_ids:
            row.tracker.finish()
            reason = "stop"
        else:
            if params.logprobs:
                row.logprobs.append(logprob_entry(self.model.llm.tokenizer, allowed[0], token,
                                                  params.top_logprobs))
            row.tracker.push(token)
            row.count += 1
            row.last_token = token
            if row.tracker.stopped:
                reason = "stop"
                _drop_stop_string_logprobs(row, self.model.llm.tokenizer)
            elif row.count >= params.max_new_tokens or length >= self.max_length:
                row.tracker.finish()
                reason = "length"
        self._send(row)
        return reason

    def _advance_image(self, row: _Row, token: int, length: int) -> str | None:
        """A chat row's token of an image block: no text; its codes kept with the image, sent
        (the text before it first) as ("image", pixels [3, S, S]) once the block ends."""
        codes = self.codes
        if token == codes.begin_id:
            row.drawn.append([])
        elif row.left > 0:
            row.drawn[-1].append(token - codes.first_code_id)
        row.left = next_left(codes, row.left, token)
        row.count += 1
        row.last_token = token
        if token == codes.end_id:
            row.images.extend(self.engine.decode_images(row.drawn[-1:]))
            self._send(row)
            row.request.queue.put(("image", row.images[-1]))
        if row.count >= row.request.params.max_new_tokens or length >= self.max_length:
            row.tracker.finish()  # not inside a block: `constrain` leaves room for its end
            self._send(row)
            return "length"
        return None

    def _advance_drawing(self, row: _Row, logits: torch.Tensor, twin_logits: torch.Tensor | None) -> str | None:
        """A drawing's next code, sampled over the codebook alone as `Engine._draw` samples
        it (logits [V], guided with its twin's [V]); the twin takes the same code. "stop"
        after the K-th, the image decoded."""
        codes, params = self.codes, row.request.params
        code_logits = logits[None, codes.first_code_id :].float()  # [1, C]
        if twin_logits is not None:
            code_logits = guided(code_logits, twin_logits[None, codes.first_code_id :].float(),
                                 params.guidance_scale)
        code = int(choose_next(code_logits, params, row.generator)[0])
        row.drawn[-1].append(code)
        row.count += 1
        row.last_token = code + codes.first_code_id
        if row.twin is not None:
            row.twin.last_token = row.last_token
        if row.count < codes.num_codes:
            return None
        row.images = self.engine.decode_images(row.drawn)
        return "stop"

    def _send(self, row: _Row, everything: bool = False) -> None:
        text = row.tracker.text[: row.tracker.emitted]
        if row.logprobs and (len(text) > row.sent or everything):
            row.request.queue.put(("logprobs", row.logprobs))
            row.logprobs = []
        if len(text) > row.sent:
            row.request.queue.put(("text", text[row.sent :]))
            row.sent = len(text)

    def _drop_cancelled(self) -> None:
        for row in [row for row in self.rows if row.request.cancelled.is_set() and not row.is_twin]:
            self._release(self._index_of(row), "cancelled")

    def _release(self, index: int, reason: str | None, error: str | None = None) -> None:
        """Free row `index`'s slot (and its twin's); its request gets "done" with `reason`, or
        `error`."""
        row = self.rows[index]
        self._free(index)
        if row.twin is not None:
            self._free(self._index_of(row.twin))
        if error is not None:
            row.request.queue.put(("error", error))
            return
        self._send(row, everything=True)
        self._finish_request(row.request, Finished(row.tracker.text, reason, len(row.request.input_ids), row.count,
                                                   row.images))

    def _free(self, index: int) -> None:
        """Free a slot; the last running row moves into it, as in the cache."""
        moved = self.cache.release(index)
        if moved is not None:
            self.rows[index] = self.rows[moved]
        self.rows.pop()

    def _finish_request(self, request: Request, finished: Finished) -> None:
        request.queue.put(("done", finished))
        if self.on_finish is not None:
            with contextlib.suppress(Exception):  # a metrics callback must not fail generation
                self.on_finish(request, finished)


def logprob_entry(tokenizer, logits: torch.Tensor, token: int, top: int) -> dict:
    """OpenAI's log-probability entry of a chosen token: {token, logprob, bytes, top_logprobs}
    from the model's distribution over the tokens it may emit (logits [V], before temperature
    and top-p, as OpenAI and vLLM report them); `bytes` are the token's own bytes, which for
    a piece of a multi-byte character are not the UTF-8 of its (replacement-character) text."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)

    def described(token_id: int, value: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": max(value, -9999.0), "bytes": token_bytes(tokenizer, token_id, text)}

    entry = described(token, float(logprobs[token]))
    entry["top_logprobs"] = []
    if top:
        values, ids = torch.topk(logprobs, top)
        entry["top_logprobs"] = [described(int(i), float(v)) for v, i in zip(values, ids)]
    return entry


def _drop_stop_string_logprobs(row: _Row, tokenizer) -> None:
    """The text ended at a stop string: the unsent logprob entries of tokens that begin at or
    after the cut go too (OpenAI sends none for the stop sequence's tokens)."""
    ids, cut = row.tracker.token_ids, len(row.tracker.text)
    first = len(ids) - len(row.logprobs)  # the token of the first unsent entry
    kept = [entry for offset, entry in enumerate(row.logprobs)
            if len(tokenizer.decode(ids[: first + offset], skip_special_tokens=True)) < cut]
    row.logprobs[:] = kept


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (the inverse of `bytes_to_unicode`)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {character: byte for byte, character in bytes_to_unicode().items()}


def token_bytes(tokenizer, token_id: int, text: str) -> list[int]:
    """The bytes a token stands for: a byte-fallback piece "<0xE2>" is that byte, a byte-level
    BPE piece ("Ġhello", "â") maps back through GPT-2's alphabet; otherwise the UTF-8 of
    its decoded `text`."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if not isinstance(piece, str) or token_id in tokenizer.all_special_ids:
        return list(text.encode("utf-8"))
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return [int(piece[3:5], 16)]
    decoder = _byte_decoder()
    if "\ufffd" in text and all(character in decoder for character in piece):
        return [decoder[character] for character in piece]
    return list(text.encode("utf-8"))


def _log(error: Exception, where: str) -> None:
    """The server's log gets the traceback of an unexpected failure (its client gets one line:
    a 500 must not hide its cause from whoever runs the server); a user's mistake is not logged."""
    if not isinstance(error, UserError):
        logger.error("%s failed: %s", where, _one_line(error), exc_info=error)


def _one_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0][:200]


def _merge_lora_for_good(model) -> None:
    """A served model never trains: fold LoRA into the base weights once."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and not module.merged:
            module.merge()
