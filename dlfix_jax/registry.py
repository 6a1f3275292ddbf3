"""One registry type for every pluggable component (fixers, models, datasets).

After big_vision's ``pp/registry.py``: a name maps to one entry; registering
a name twice raises; an unknown name raises a ``KeyError`` that lists the
registered ones; :meth:`Registry.temporary` registers entries for the span of
a ``with`` block (tests), restoring the registry afterwards.

Registries are filled at import time and then only read (no run-time global
state changes, except through :meth:`temporary`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry mapping of one ``kind`` of component.

    Attributes:
      kind: what the entries are ("fixer", "model", ...), used in messages.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Registers ``entry`` under ``name``; a second registration raises."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, "
                             f"got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        def deco(entry: T) -> T:
            self.add(name, entry)
            return entry
        return deco

    def get(self, name: str) -> T:
        """The entry of ``name``; ``KeyError`` listing the registered names."""
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: "
                           f"{', '.join(self.names()) or '(none)'}")
        return self._entries[name]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @contextlib.contextmanager
    def temporary(self, **entries: T) -> Iterator[None]:
        """Registers ``entries`` inside a ``with`` block only.

        Raises:
          ValueError: a name is already registered.
        """
        added = []
        try:
            for name, entry in entries.items():
                self.add(name, entry)
                added.append(name)
            yield
        finally:
            for name in added:
                self._entries.pop(name, None)
