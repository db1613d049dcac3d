"""Continuous batching: one background thread runs the model; requests join the running
batch between decode steps (prefilled one by one into a free slot of the `SlotCache`)
and leave it when they finish or are cancelled, freeing their slot for the next step.

The HTTP layer submits requests and reads their events; it never touches the model.

Example:
    engine = BatchingEngine(model, max_batch=16).start()
    request = engine.submit({"messages": [...], "images": [...]}, SamplingParams(max_new_tokens=32))
    for kind, value in request.events():   # ("text", piece) ... then ("done", Finished)
        ...
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from polymodal.engine.generate import Generator
from polymodal.engine.runners import LLAMA_FAMILY
from polymodal.engine.sampling import SamplingParams, choose_next
from polymodal.engine.slots import SlotCache
from polymodal.engine.text import TextTracker
from polymodal.errors import UserError

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
    pixels: torch.Tensor | None
    params: SamplingParams
    queue: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Free this request's slot at the next step (a client went away)."""
        self.cancelled.set()

    def events(self, timeout: float | None = None):
        """("text", piece) for each new piece of the answer, then ("done", Finished)."""
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


class BatchingEngine:
    def __init__(self, model, max_batch: int = 16, max_queue: int = 64, max_length: int | None = None):
        if model.llm.model.config.model_type not in LLAMA_FAMILY:
            raise UserError(f"serving batches Llama-family LLMs ({', '.join(sorted(LLAMA_FAMILY))}); "
                            f"this one is {model.llm.model.config.model_type}")
        self.model = model.eval()
        self.generator = Generator(model)  # prompt encoding, stop ids, allowed tokens
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
        with self.lock:
            self.stopped = True
            self.lock.notify()
        self.thread.join(timeout=10)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.rows)

    def submit(self, prompt: dict, params: SamplingParams) -> Request:
        """Encode a prompt (errors are the caller's: UserError) and queue it."""
        encoded = self.generator.encode(prompt)
        total = len(encoded["input_ids"]) + params.max_new_tokens
        if total > self.max_length:
            raise UserError(f"prompt ({len(encoded['input_ids'])} tokens) plus max_tokens "
                            f"({params.max_new_tokens}) exceeds the context of {self.max_length} tokens")
        request = Request(next(self.ids), encoded["input_ids"], encoded["pixel_values"], params)
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting")
            self.waiting.append(request)
            self.lock.notify()
        return request

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
            try:
                ids = torch.tensor([request.input_ids])
                logits = self.cache.admit(self.model.embed(ids, request.pixels))  # [1, V]
            except Exception as error:  # one bad request must not stop the engine
                request.queue.put(("error", str(error)))
                continue
            params = request.params
            row = _Row(request, TextTracker(self.model.llm.tokenizer, params.stop), params.generator())
            self.rows.append(row)
            self._advance(len(self.rows) - 1, logits[0])

    def _step(self) -> None:
        tokens = torch.tensor([row.last_token for row in self.rows])
        logits = self.cache.step(tokens)  # [n, V]
        for index in reversed(range(len(self.rows))):  # reversed: finishing moves later rows
            self._advance(index, logits[index])

    def _advance(self, index: int, logits: torch.Tensor) -> None:
        """Choose row `index`'s next token from its logits [V]; send text; finish if done."""
        row = self.rows[index]
        params = row.request.params
        token = int(choose_next(self.generator._allowed(logits[None]), params, row.generator)[0])
        stop_ids = set() if params.ignore_eos else self.generator.stop_ids
        reason = None
        if token in stop_ids:
            row.tracker.finish()
            reason = "stop"
        else:
            row.tracker.push(token)
            row.count += 1
            row.last_token = token
            if row.tracker.stopped:
                reason = "stop"
            elif row.count >= params.max_new_tokens or int(self.cache.lengths[index]) >= self.max_length:
                row.tracker.finish()
                reason = "length"
        self._send(row)
        if reason:
            self._release(index, reason)

    def _send(self, row: _Row) -> None:
        text = row.tracker.text[: row.tracker.emitted]
        if len(text) > row.sent:
            row.request.queue.put(("text", text[row.sent :]))
            row.sent = len(text)

    def _drop_cancelled(self) -> None:
        for index in reversed(range(len(self.rows))):
            if self.rows[index].request.cancelled.is_set():
                self._release(index, "cancelled")

    def _release(self, index: int, reason: str) -> None:
        row = self.rows[index]
        moved = self.cache.release(index)
        if moved is not None:
            self.rows[index] = self.rows[moved]
        self.rows.pop()
        self._finish_request(row.request, Finished(row.tracker.text, reason, len(row.request.input_ids), row.count))

    def _finish_request(self, request: Request, finished: Finished) -> None:
        request.queue.put(("done", finished))
        if self.on_finish is not None:
            self.on_finish(request, finished)


def _merge_lora_for_good(model) -> None:
    """A served model never trains: fold LoRA into the base weights once."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and not module.merged:
            module.merge()
