"""Named registries: every string a recipe or a command uses to pick a kind resolves here.

Each package registers its own kinds with a decorator; this module stores entries and
imports nothing concrete. The first lookup runs `discover()`, which imports the built-in
packages by name (the list below) once, so their decorators fill the tables; an unknown
name is an error that lists the names that exist.

Example:
    @register_encoder("vit", config=VitEncoderConfig)
    class VitEncoder(Encoder): ...

    ENCODERS.get("vit").builder(config, loader)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from polymodal.errors import UserError

# The packages whose modules register the built-in kinds. Imported by name, on first use,
# so that the registry (a low layer) never imports the parts (higher layers) it names.
BUILTIN_PACKAGES = (
    "polymodal.encoders",
    "polymodal.connectors",
    "polymodal.fusion",
    "polymodal.data",
    "polymodal.model",
    "polymodal.contrastive",
    "polymodal.objectives",
    "polymodal.engine",
    "polymodal.eval",
    "polymodal.interop",
)


@dataclass(frozen=True)
class Entry:
    name: str
    builder: Callable[..., Any]  # the class or function that makes this kind
    config: type | None  # the dataclass holding this kind's options
    summary: str  # the first line of the builder's docstring


class Registry:
    """A name -> builder table; an unknown name is an error that lists the names that exist."""

    def __init__(self, part: str):
        self.part = part
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, config: type | None = None):
        """Decorator: `builder` becomes the kind `name`, with options in dataclass `config`.
        Raises ValueError when the name is taken (two packages claiming one kind)."""

        def decorate(builder):
            if name in self._entries and self._entries[name].builder is not builder:
                raise ValueError(f"{self.part} {name!r} is registered twice")
            doc = (builder.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(name, builder, config, doc[0] if doc else "")
            return builder

        return decorate

    def get(self, name: str) -> Entry:
        """The entry for `name`; UserError listing the known names otherwise."""
        discover()
        if name not in self._entries:
            raise UserError(f"unknown {self.part} {name!r}; known: {', '.join(self.names())}")
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        discover()
        return name in self._entries

    def names(self) -> list[str]:
        discover()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[name] for name in self.names()]


ENCODERS = Registry("encoder")
CONNECTORS = Registry("connector")
FUSIONS = Registry("fusion")
MODEL_KINDS = Registry("model kind")
OBJECTIVES = Registry("objective")
DATASET_FORMATS = Registry("dataset format")
EVAL_TASKS = Registry("task")
RUNNERS = Registry("runner")
# config.json model_type of a stock checkpoint polymodal imports -> its config reader
STOCK_MODELS = Registry("stock checkpoint type")

register_encoder = ENCODERS.register
register_connector = CONNECTORS.register
register_fusion = FUSIONS.register
register_model_kind = MODEL_KINDS.register
register_objective = OBJECTIVES.register
register_dataset_format = DATASET_FORMATS.register
register_task = EVAL_TASKS.register
register_runner = RUNNERS.register
register_stock_model = STOCK_MODELS.register

_discovered = False


def discover() -> None:
    """Import the built-in packages once, so that their decorators register every kind.

    Parsing a config, building a model and listing kinds all start here; the import is by
    name (`importlib`), which keeps this module free of imports of concrete parts.
    """
    global _discovered
    if _discovered:
        return
    _discovered = True  # set first: a package being imported may look names up
    for package in BUILTIN_PACKAGES:
        try:
            importlib.import_module(package)
        except ModuleNotFoundError as error:
            if error.name != package:  # a package that exists but fails inside: a real error
                raise
