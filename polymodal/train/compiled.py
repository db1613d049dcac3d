"""`compile: true` on a stage: the LLM's decoder layers run through torch.compile while it
trains (TorchInductor fuses each layer's norms, rotary, SiLU and residual adds into a few
generated kernels, forward and backward).

Why the layers and not the whole model: the 30 layers of a Llama share one compiled graph
(the modules' code is the same, their weights are inputs), so the first step compiles once
(~40 s on 2 CPU cores for SmolLM2-135M) and nothing around the layers (media splicing,
shared-prefix branches, the loss at answer tokens) has to be traceable. A batch of another
length compiles again once, after which dynamic shapes are used (torch's automatic dynamic).
Measured against the eager layers and transformers' LLaVA: benchmarks/RESULTS.md.

The layers go back to eager when the stage ends (`uncompile`): generation and evaluation
call them under inference mode, where a compiled graph would only recompile.
"""

from __future__ import annotations

from torch import nn


def compile_layers(model: nn.Module) -> int:
    """torch.compile each of `model.decoder_layers()` (the model's own list: the loop does not
    probe models) in place (`nn.Module.compile`: parameters and
    state-dict keys unchanged). Returns how many."""
    layers = model.decoder_layers()
    for layer in layers:
        layer.compile()
    return len(layers)


def uncompile(model: nn.Module) -> None:
    """Undo `compile_layers`: the layers' calls run their eager forward again."""
    for layer in model.decoder_layers():
        layer._compiled_call_impl = None  # what nn.Module.compile sets; None is eager
