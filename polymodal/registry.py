"""Named registries: each component kind registers itself with a decorator.

Example:
    @register_encoder("vit", config=VitEncoderConfig)
    class VitEncoder(nn.Module): ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from polymodal.errors import UserError


@dataclass(frozen=True)
class Entry:
    name: str
    builder: Callable[..., Any]
    config: type | None  # the dataclass holding this kind's options
    summary: str


class Registry:
    """A name -> builder table; an unknown name is an error that lists the names that exist."""

    def __init__(self, part: str):
        self.part = part
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, config: type | None = None):
        def decorate(builder):
            if name in self._entries:
                raise ValueError(f"{self.part} {name!r} is registered twice")
            doc = (builder.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(name, builder, config, doc[0] if doc else "")
            return builder

        return decorate

    def get(self, name: str) -> Entry:
        _load_builtin_components()
        if name not in self._entries:
            raise UserError(f"unknown {self.part} {name!r}; known: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        _load_builtin_components()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[name] for name in self.names()]


ENCODERS = Registry("encoder")
CONNECTORS = Registry("connector")
FUSIONS = Registry("fusion")

register_encoder = ENCODERS.register
register_connector = CONNECTORS.register
register_fusion = FUSIONS.register


def _load_builtin_components() -> None:
    # Importing the packages runs their @register_* decorators; done lazily so that
    # importing the registry alone stays cheap and free of import cycles.
    import polymodal.connectors
    import polymodal.encoders
    import polymodal.fusion  # noqa: F401
