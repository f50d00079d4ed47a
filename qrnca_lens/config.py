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
import sys
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from .errors import QrncaError

__all__ = ["Config", "VERSION_KEY", "type_hints"]

VERSION_KEY = "qrnca_lens_version"
C = TypeVar("C", bound="Config")


def type_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of ``cls`` and its bases (``from __future__`` strings evaluated).

    ``typing.get_type_hints`` answers {} for a class marked ``__no_type_check__``, as ``Config`` is.

    Example:
        >>> type_hints(Config)
        {}
    """
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        module_ns = dict(vars(sys.modules[klass.__module__]))
        for name, ann in klass.__dict__.get("__annotations__", {}).items():
            # What typing.get_type_hints does with a string annotation: evaluate it where the class lives.
            hints[name] = eval(ann, module_ns, dict(vars(klass))) if isinstance(ann, str) else ann
    return hints


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

    # The test suite's jaxtyping/beartype import hook type-checks dataclass ``__init__`` arguments; it would
    # reject a bad ``Literal`` value with a generic TypeError before ``validate()`` runs, so the tests would
    # not see the message users get. ``validate()`` is the one check, in tests and in use.
    __no_type_check__ = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``QrncaError`` naming the bad field and the fix; the base accepts everything."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields: nested configs as dicts, tuples as lists."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def _repr_html_(self) -> str:
        """Notebook display: the class name and one row per field (long values cut; subclasses show more)."""
        import html

        def cell(v: Any) -> str:
            text = repr(v)
            return html.escape(text if len(text) <= 120 else text[:117] + "...")

        rows = "".join(f"<tr><td>{f.name}</td><td><code>{cell(getattr(self, f.name))}</code></td></tr>"
                       for f in dataclasses.fields(self))  # type: ignore[arg-type]
        return f"<b>{type(self).__name__}</b><table>{rows}</table>"

    def to_record(self) -> dict[str, Any]:
        """``to_dict()`` plus the library version, for what is written to disk."""
        from .versions import PACKAGE_VERSION

        return {**self.to_dict(), VERSION_KEY: PACKAGE_VERSION}

    @classmethod
    def checked_keys(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        """``d`` without the version key, after refusing a non-mapping or keys that are not init fields.

        For subclasses whose ``from_dict`` rebuilds fields the base cannot (tensors, ...).

        Example:
            >>> Config.checked_keys({"qrnca_lens_version": "0.1.0"})
            {}
        """
        if not isinstance(d, Mapping):
            raise QrncaError(f"{cls.__name__}.from_dict needs a mapping, got {type(d).__name__}")
        names: list[str] = [f.name for f in dataclasses.fields(cls) if f.init] if dataclasses.is_dataclass(cls) else []
        unknown = sorted(set(d) - set(names) - {VERSION_KEY})
        if unknown:
            raise QrncaError(f"unknown {cls.__name__} keys {unknown}; expected a subset of {names}")
        return {k: v for k, v in d.items() if k != VERSION_KEY}

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any]) -> C:
        """The inverse of ``to_dict`` (see the module docstring); unknown keys raise ``QrncaError``."""
        hints = type_hints(cls)
        return cls(**{k: _rebuild(hints.get(k, Any), v) for k, v in cls.checked_keys(d).items()})

    @classmethod
    def field_help(cls, name: str) -> str:
        """The ``help`` metadata of field ``name`` ("" if none); the command line shows it."""
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name == name:
                return str(f.metadata.get("help", ""))
        raise QrncaError(f"{cls.__name__} has no field {name!r}")
