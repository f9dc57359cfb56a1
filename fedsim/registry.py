"""One registry per plug-in family: each entry's options (a config class) and its implementation.

Each plug-in family (channels, codecs, projectors, aggregators, executors, round policies,
models, ...) owns one :class:`Registry`. Names are lowercase, unique, and the only place where
the strings of a scenario are turned into behaviour: no other module branches on them.

An entry has two halves, declared apart:

- its **options**: a frozen pydantic config class (``@CODECS.options("qsgd")``), light to
  import, which the scenario validates its section with (``fedsim.plugins`` declares them);
- its **implementation** (``@CODECS.register("qsgd")``), in the family's ``home`` module, which
  may import torch or transformers: :meth:`Registry.get` imports ``home`` on first use, so a
  scenario is validated, and a network-only run plays, without loading them.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Generic, TypeVar, Union

from pydantic import BaseModel, BeforeValidator, Field, TypeAdapter

from fedsim.errors import FedsimError

T = TypeVar("T")
C = TypeVar("C", bound=type[BaseModel])

_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")


class Registry(Generic[T]):
    """A named family of plug-ins: ``options`` (config classes) and ``register`` (classes).

    ``key`` is the field of a scenario section that names the entry (``name``; ``codec`` for
    compression, ``kind`` for attacks); ``home`` the module that registers implementations.
    """

    def __init__(self, family: str, *, home: str | None = None, key: str = "name") -> None:
        self.family, self.home, self.key = family, home, key
        self._entries: dict[str, T] = {}
        self._configs: dict[str, type[BaseModel]] = {}
        self._declared: set[str] = set()

    def _check(self, name: str, table: dict[str, Any]) -> None:
        if not _NAME.match(name):
            raise ValueError(f"{self.family} name must be lowercase [a-z0-9_-], got {name!r}")
        if name in table:
            raise ValueError(f"{self.family} {name!r} is already registered")

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``obj`` implements entry ``name``."""
        self._check(name, self._entries)

        def decorate(obj: T) -> T:
            self._entries[name] = obj
            if isinstance(obj, type):
                obj.name = name  # type: ignore[attr-defined]
            return obj

        return decorate

    def options(self, name: str) -> Callable[[C], C]:
        """Decorator: config class ``cls`` holds entry ``name``'s options; its ``key`` field
        must be ``Literal[name]`` with ``name`` as default (the union's discriminator)."""
        self._check(name, self._configs)

        def decorate(cls: C) -> C:
            field = cls.model_fields.get(self.key)
            if field is None or field.default != name:
                raise ValueError(f"{cls.__name__}.{self.key} must default to {name!r}")
            self._configs[name] = cls
            return cls

        return decorate

    def declare(self, *names: str) -> None:
        """Entries that have no options, named here so that :meth:`names` needs no import of
        ``home`` (the model names: transformers takes ~10 s to import)."""
        for name in names:
            self._check(name, self._declared)
            self._declared.add(name)

    # --- lookup --------------------------------------------------------------------------------

    def _load(self) -> None:
        if self.home is not None:
            importlib.import_module(self.home)

    def _unknown(self, name: object) -> str:
        return f"unknown {self.family} {name!r}; known: {', '.join(self.names())}"

    def get(self, name: str) -> T:
        """The implementation of ``name`` (its home module imported on first use)."""
        if name not in self._entries:
            self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise FedsimError(self._unknown(name)) from None

    def config(self, name: str) -> type[BaseModel]:
        try:
            return self._configs[name]
        except KeyError:
            raise FedsimError(self._unknown(name)) from None

    def configs(self) -> list[type[BaseModel]]:
        return [self._configs[n] for n in sorted(self._configs)]

    def union(self, default: str | None = None) -> Any:
        """The scenario type of a section naming one entry: the discriminated union of the
        declared config classes on ``key``. With ``default``, a section that leaves ``key``
        out names that entry (``compression: {}`` is ``codec: none``)."""
        members = tuple(self.configs())
        tp: Any = members[0] if len(members) == 1 else Annotated[
            Union[members], Field(discriminator=self.key)]  # noqa: UP007
        if default is None:
            return tp

        def fill(v: Any) -> Any:
            return {self.key: default, **v} if isinstance(v, dict) and self.key not in v else v

        return Annotated[tp, BeforeValidator(fill)]

    def parse(self, doc: dict[str, Any]) -> Any:
        """The config of the entry ``doc[key]`` names, validated (``{"name": "median"}``)."""
        return TypeAdapter(self.union()).validate_python(doc)

    def taking(self, option: str) -> list[str]:
        """The entries whose config has an option named ``option``."""
        return [n for n, c in sorted(self._configs.items()) if option in c.model_fields]

    def require(self, name: str) -> str:
        """``name`` if registered, else ValueError (what a pydantic validator raises)."""
        if name not in self:
            raise ValueError(self._unknown(name))
        return name

    def names(self) -> list[str]:
        """Every entry: those declared (options or names), else the implementations."""
        if self._configs or self._declared:
            return sorted(set(self._configs) | self._declared)
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())
