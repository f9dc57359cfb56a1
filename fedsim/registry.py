"""One registry per plug-in family: a name -> class dict filled by a decorator.

Each plug-in family (channels, codecs, projectors, aggregators, executors, round policies,
models) owns one :class:`Registry`. Names are lowercase, unique, and the only place where the
strings of a scenario are turned into behaviour: no other module branches on them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from fedsim.errors import FedsimError

T = TypeVar("T")

_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")


class Registry(Generic[T]):
    """A named family of plug-ins, filled with ``@REGISTRY.register("name")``."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        if not _NAME.match(name):
            raise ValueError(f"{self.family} name must be lowercase [a-z0-9_-], got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.family} {name!r} is already registered")

        def decorate(obj: T) -> T:
            self._entries[name] = obj
            if isinstance(obj, type):
                obj.name = name  # type: ignore[attr-defined]
            return obj

        return decorate

    def _unknown(self, name: str) -> str:
        return f"unknown {self.family} {name!r}; known: {', '.join(sorted(self._entries))}"

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise FedsimError(self._unknown(name)) from None

    def require(self, name: str) -> str:
        """``name`` if registered, else ValueError (what a pydantic validator raises)."""
        if name not in self._entries:
            raise ValueError(self._unknown(name))
        return name

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
