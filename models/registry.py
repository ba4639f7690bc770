"""Named registries (backbones, merge methods): one place for the rules every registry keeps."""
from __future__ import annotations

from typing import Generic, TypeVar

Entry = TypeVar("Entry")


class Registry(dict, Generic[Entry]):
    """name -> entry (anything with a `.name`). Registering a name twice is an error, and so is looking up an
    unknown name, with the known ones listed."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, entry: Entry) -> Entry:
        if entry.name in self:
            raise ValueError(f"{self.kind} {entry.name!r} registered twice")
        self[entry.name] = entry
        return entry

    def lookup(self, name: str) -> Entry:
        try:
            return self[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of {sorted(self)}") from None
