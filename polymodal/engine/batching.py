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
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from polymodal.engine.decoder import LLAMA_FAMILY, LlamaDecoder
from polymodal.engine.generate import Engine
from polymodal.engine.sampling import SamplingParams, choose_next
from polymodal.engine.slots import SlotCache
from polymodal.engine.text import TextTracker
from polymodal.errors import UserError, check_context_length

MAX_ADMITS_PER_STEP = 4  # new prompts prefilled between two decode steps, so running ones keep going


class QueueFull(Exception):
    """More requests are waiting than the engine accepts; the client should retry later."""


@dataclass
class Finished:
    text: str
    finish_reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Request:
    id: int
    input_ids: list[int]
    media: dict[str, torch.Tensor]  # modality -> the prompt's encoder inputs [N, ...] (pixels, log-mel)
    params: SamplingParams
    queue: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Free this request's slot at the next step (a client went away)."""
        self.cancelled.set()

    def events(self, timeout: float | None = None):
        """("text", piece) for each new piece of the answer, then ("done", Finished) or
        ("error", message). With `params.logprobs`, ("logprobs", [entry, ...]) events come
        before the text of their tokens (entries of held-back text come before "done")."""
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
        with self.lock:
            self._drop_cancelled_waiting()
            if len(self.waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting")
            self.waiting.extend(requests)
            self.lock.notify()
        return requests

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
                except Exception:  # a failed step fails its requests, not the server
                    self._fail_running("generation failed")

    def _fail_running(self, message: str) -> None:
        for row in self.rows:
            row.request.queue.put(("error", message))
        self.rows.clear()
        self.cache.active = 0

    def _admit(self) -> None:
        for _ in range(MAX_ADMITS_PER_STEP):
            with self.lock:
                if not self.waiting or len(self.rows) >= self.max_batch:
                    return
                request = self.waiting.popleft()
            if request.cancelled.is_set():
                self._finish_request(request, Finished("", "cancelled", len(request.input_ids), 0))
                continue
            try:  # one bad request must not stop the engine, nor go unanswered
                params = request.params
                row = _Row(request, TextTracker(self.model.llm.tokenizer, params.stop), params.generator())
                ids = torch.tensor([request.input_ids])
                embeds, fusion = self.model.prepare(ids, request.media)
                logits = self.cache.admit(embeds, fusion, ids)  # [1, V]
            except Exception as error:
                request.queue.put(("error", _one_line(error)))
                continue
            self.rows.append(row)
            self._advance_or_fail(len(self.rows) - 1, logits[0])

    def _step(self) -> None:
        tokens = torch.tensor([row.last_token for row in self.rows])
        logits = self.cache.step(tokens)  # [n, V]
        for index in reversed(range(len(self.rows))):  # reversed: finishing moves later rows
            self._advance_or_fail(index, logits[index])

    def _advance_or_fail(self, index: int, logits: torch.Tensor) -> None:
        """Advance row `index`; an error in it ends that row's request alone."""
        try:
            reason = self._advance(self.rows[index], logits, int(self.cache.lengths[index]))
        except Exception as error:
            self._release(index, None, f"generation failed: {_one_line(error)}")
            return
        if reason:
            self._release(index, reason)

    def _advance(self, row: _Row, logits: torch.Tensor, length: int) -> str | None:
        """Choose the row's next token from its logits [V] (its cache holds `length` slots);
        send text; the finish reason if it is done."""
        params = row.request.params
        allowed = self.engine.allowed_logits(logits[None])  # [1, V] float
        token = int(choose_next(allowed, params, row.generator)[0])
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

    def _send(self, row: _Row, everything: bool = False) -> None:
        text = row.tracker.text[: row.tracker.emitted]
        if row.logprobs and (len(text) > row.sent or everything):
            row.request.queue.put(("logprobs", row.logprobs))
            row.logprobs = []
        if len(text) > row.sent:
            row.request.queue.put(("text", text[row.sent :]))
            row.sent = len(text)

    def _drop_cancelled(self) -> None:
        for index in reversed(range(len(self.rows))):
            if self.rows[index].request.cancelled.is_set():
                self._release(index, "cancelled")

    def _release(self, index: int, reason: str | None, error: str | None = None) -> None:
        """Free row `index`'s slot; its request gets "done" with `reason`, or `error`."""
        row = self.rows[index]
        moved = self.cache.release(index)
        if moved is not None:
            self.rows[index] = self.rows[moved]
        self.rows.pop()
        if error is not None:
            row.request.queue.put(("error", error))
            return
        self._send(row, everything=True)
        self._finish_request(row.request, Finished(row.tracker.text, reason, len(row.request.input_ids), row.count))

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


def _one_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0][:200]


def _merge_lora_for_good(model) -> None:
    """A served model never trains: fold LoRA into the base weights once."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and not module.merged:
            module.merge()
