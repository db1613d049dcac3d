"""llama.cpp's decode speed, driven by benchmarks/generate.py from the llama.cpp venv
(benchmarks/llamacpp_env.sh); never imports polymodal or torch.

Two uses:

    python benchmarks/llamacpp_decode.py --quantize IN.gguf OUT.gguf   # a Q8_0 copy (llama_model_quantize)
    python benchmarks/llamacpp_decode.py --threads 2 NAME=FILE.gguf ...  # a timing server

The timing server loads each model, prints one JSON line `{"ready": {NAME: n_ctx}}`, then
answers each request line `{"model": NAME, "batch": B, "prompt": T, "new": N}` with
`{"seconds": s}`: the wall time of one prefill of B sequences of T tokens (one llama_decode,
the logits of each sequence's last token) and N - 1 greedy decode steps of B tokens, as
polymodal's Engine.generate does for N new tokens. The caches are cleared between requests.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time

import llama_cpp as llama
import numpy as np

CONTEXT_PER_SEQUENCE = 256  # prompt + new tokens of one sequence, at most


def quantize(source: str, target: str) -> None:
    """`source` (any GGUF type) requantized to Q8_0 (every 2-D tensor; 1-D ones stay F32)."""
    params = llama.llama_model_quantize_default_params()
    params.ftype = llama.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    params.nthread = 1
    if llama.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize failed for {source}")


class Model:
    """One GGUF with a context of 8 sequences, `threads` threads for prefill and decode."""

    def __init__(self, path: str, threads: int, sequences: int = 8):
        model_params = llama.llama_model_default_params()
        self.model = llama.llama_model_load_from_file(path.encode(), model_params)
        if not self.model:
            raise SystemExit(f"llama.cpp cannot load {path}")
        params = llama.llama_context_default_params()
        params.n_ctx = params.n_batch = CONTEXT_PER_SEQUENCE * sequences
        params.n_seq_max = sequences
        params.n_threads = params.n_threads_batch = threads
        self.context = llama.llama_init_from_model(self.model, params)
        self.vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(self.model))
        self.batch = llama.llama_batch_init(CONTEXT_PER_SEQUENCE * sequences, 0, 1)

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) rows."""
        batch = self.batch
        for index, (token, position, sequence, logits) in enumerate(rows):
            batch.token[index], batch.pos[index] = token, position
            batch.n_seq_id[index], batch.seq_id[index][0] = 1, sequence
            batch.logits[index] = logits
        batch.n_tokens = len(rows)
        if llama.llama_decode(self.context, batch) != 0:
            raise SystemExit("llama_decode failed")

    def _greedy(self, indices: list[int]) -> list[int]:
        return [int(np.ctypeslib.as_array(llama.llama_get_logits_ith(self.context, index),
                                          shape=(self.vocab,)).argmax()) for index in indices]

    def generate(self, batch: int, prompt: int, new: int) -> float:
        """Seconds for `new` tokens of `batch` sequences after a `prompt`-token prefill."""
        llama.llama_memory_clear(llama.llama_get_memory(self.context), True)
        tokens = np.random.default_rng(0).integers(100, min(self.vocab, 30000), prompt).tolist()
        start = time.perf_counter()
        self._decode([(token, position, sequence, position == prompt - 1)
                      for sequence in range(batch) for position, token in enumerate(tokens)])
        next_ids = self._greedy([sequence * prompt + prompt - 1 for sequence in range(batch)])
        for step in range(new - 1):
            self._decode([(token, prompt + step, sequence, True) for sequence, token in enumerate(next_ids)])
            next_ids = self._greedy(list(range(batch)))
        return time.perf_counter() - start


def serve(models: dict[str, Model]) -> None:
    print(json.dumps({"ready": dict.fromkeys(models, CONTEXT_PER_SEQUENCE)}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        seconds = models[request["model"]].generate(request["batch"], request["prompt"], request["new"])
        print(json.dumps({"seconds": seconds}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantize", nargs=2, metavar=("IN", "OUT"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("models", nargs="*", metavar="NAME=FILE")
    args = parser.parse_args()
    llama.llama_backend_init()
    if args.quantize:
        quantize(*args.quantize)
        return
    serve({name: Model(path, args.threads) for name, path in (item.split("=", 1) for item in args.models)})
    assert "torch" not in sys.modules and "polymodal" not in sys.modules


if __name__ == "__main__":
    main()
