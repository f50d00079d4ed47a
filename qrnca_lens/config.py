"""One base for every config and result dataclass: validation, ``to_dict`` / ``from_dict``, help text.

A subclass is a (usually frozen) dataclass that inherits ``Config``. It gets:

- ``validate()``: called after ``__init__``; override it to raise ``QrncaError`` naming the bad field and a
  fix (the base checks nothing).
- ``to_dict()``: JSON-ready fields (nested configs as dicts, tuples as lists); ``to_record()`` adds the
  library version under ``"qrnca_lens_version"``, for results written to disk.
- ``from_dict(d)``: the inverse. Unknown keys are refused with the valid ones named (a typo in a saved
  config must not pass silently); ``"qrnca_lens_version"`` is accepted and ignored. Nested configs are
  rebuilt from the field's type (``Config`` subclasses, and tuples of them).
- ``field_help(name)``: the ``help`` metadata of a field (``field(default=..., metadata={"help": ...})``),
  which the command line shows: one source for defaults and help text.

Example:
    >>> from dataclasses import dataclass, field
    >>> @dataclass(frozen=True)
    ... class Steps(Config):
    ...     m: int = field(default=16, metadata={"help": "IG steps"})
    ...     def validate(self) -> None:
    ...         if self.m < 1:
    ...             raise QrncaError(f"m must be >= 1, got {self.m}")
    >>> Steps.from_dict(Steps(m=8).to_dict())
    Steps(m=8)
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from .errors import QrncaError

__all__ = ["Config", "VERSION_KEY"]

VERSION_KEY = "qrnca_lens_version"
C = TypeVar("C", bound="Config")


def _plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        to_dict = getattr(value, "to_dict", None)
        return to_dict() if callable(to_dict) else {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _rebuild(tp: Any, value: Any) -> Any:
    """``value`` (from JSON) as an instance of the annotated type ``tp`` where that type is a dataclass, a
    tuple of dataclasses, or a tuple; anything else passes through."""
    if value is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        real = [a for a in args if a is not type(None)]
        return _rebuild(real[0], value) if len(real) == 1 else value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(value, dict):
        from_dict = getattr(tp, "from_dict", None)
        return from_dict(value) if callable(from_dict) else tp(**value)
    if origin is tuple and isinstance(value, (list, tuple)):
        inner = args[0] if args else Any
        return tuple(_rebuild(inner, v) for v in value)
    return value


class Config:
    """Base of every config and result dataclass (see the module docstring)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``QrncaError`` naming the bad field and the fix; the base accepts everything."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def to_record(self) -> dict[str, Any]:
        from . import __version__

        return {**self.to_dict(), VERSION_KEY: __version__}

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any]) -> C:  # not typing.Mapping: deprecated (PEP 585)
        if not isinstance(d, typing.Mapping):
            raise QrncaError(f"{cls.__name__}.from_dict needs a mapping, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(names) - {VERSION_KEY})
        if unknown:
            raise QrncaError(f"unknown {cls.__name__} keys {unknown}; expected a subset of {names}")
        hints = typing.get_type_hints(cls)
        kwargs = {k: _rebuild(hints.get(k, Any), v) for k, v in d.items() if k != VERSION_KEY}
        return cls(**kwargs)

    @classmethod
    def field_help(cls, name: str) -> str:
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name == name:
                return str(f.metadata.get("help", ""))
        raise QrncaError(f"{cls.__name__} has no field {name!r}")
