"""Command-line options generated from ``Config`` dataclasses: one source for defaults, choices and help.

An ``Option`` mirrors one field of a config dataclass. Its type, default, choices (from a ``Literal``) and
help (the field's ``metadata={"help": ...}``) come from the dataclass, so the command line cannot drift from
the library. How a field's type becomes an option:

- ``bool``: a flag. Default False: the flag sets True (``--chat``); default True: the flag sets False
  (``--no-ica``, its help says so).
- ``bool | None``: ``auto`` / ``yes`` / ``no`` (None / True / False), e.g. ``--bos``.
- ``Literal[...]``: its values as choices.
- ``tuple[str, ...]``: one comma-separated value.
- ``int``, ``float``, ``str`` (or ``X | None``): that type.

Example:
    >>> import argparse
    >>> from qrnca_lens.qrnca.selection import SelectionConfig
    >>> opts = options(SelectionConfig, ["v", "use_ica"], use_ica="--no-ica")
    >>> p = argparse.ArgumentParser()
    >>> add_options(p, opts)
    >>> build(SelectionConfig, p.parse_args(["--v", "5", "--no-ica"]), opts)
    SelectionConfig(t=0.2, u=0.3, v=5, cluster_mode='union', use_ica=False, remove_common=True)
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from ..config import Config, type_hints

__all__ = ["Option", "options", "add_options", "values", "build", "comma_list"]

C = TypeVar("C", bound=Config)
TRISTATE = {"auto": None, "yes": True, "no": False}


def comma_list(text: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``: the form of a ``tuple[str, ...]`` option."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _without_none(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        real = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(real) == 1:
            return real[0], True
    return tp, False


@dataclasses.dataclass(frozen=True)
class Option:
    """The command-line option ``flag`` for field ``name`` of the config dataclass ``cls``."""

    cls: type[Config]
    name: str
    flag: str

    @property
    def dest(self) -> str:
        """The attribute on the parsed namespace (argparse's, from the flag: ``--no-ica`` -> ``no_ica``)."""
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def field(self) -> dataclasses.Field:
        return next(f for f in dataclasses.fields(self.cls) if f.name == self.name)  # type: ignore[arg-type]

    @property
    def default(self) -> Any:
        """The dataclass's default of the field."""
        f = self.field
        return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[operator]

    @property
    def hint(self) -> Any:
        return type_hints(self.cls)[self.name]

    @property
    def is_flag(self) -> bool:
        return self.hint is bool

    def parse(self, raw: Any) -> Any:
        """The field's value for the parsed ``raw`` (an unset flag gives the field's default)."""
        if self.is_flag:
            return (not self.default) if raw else self.default
        if _without_none(self.hint) == (bool, True):
            return TRISTATE[raw] if isinstance(raw, str) else raw
        return raw

    def argparse_kwargs(self, with_default: bool = True) -> dict[str, Any]:
        """``add_argument`` keywords; ``with_default=False`` leaves value options at None (meaning: unset)."""
        text = self.cls.field_help(self.name)
        if self.is_flag and self.default:  # the flag turns the field off: say so, the field's help says what it does
            text = f"sets {self.name} to False ({text})"
        kw: dict[str, Any] = {"help": text.replace("%", "%%")}  # argparse formats help with %
        if self.is_flag:
            return {**kw, "action": "store_true"}
        tp, _ = _without_none(self.hint)
        default = self.default
        if tp is bool:
            kw["choices"] = list(TRISTATE)
            default = next(k for k, v in TRISTATE.items() if v is default)
        elif typing.get_origin(tp) is typing.Literal:
            kw["choices"] = list(typing.get_args(tp))
        elif typing.get_origin(tp) is tuple:
            kw["type"] = comma_list
        elif tp in (int, float, str):
            kw["type"] = tp
        else:
            raise TypeError(f"{self.cls.__name__}.{self.name}: no command-line form for {tp!r}")
        kw["default"] = default if with_default else None
        return kw


def options(cls: type[Config], names: Sequence[str], **flags: str) -> tuple[Option, ...]:
    """Options for fields ``names`` of ``cls``; ``flags`` renames some (default ``--field-name``).

    Args:
        cls: a ``Config`` dataclass.
        names: its fields, in the order the options are shown.
        **flags: field name -> flag, for options whose name is not the field's (``kind="--proxy"``).

    Returns:
        One ``Option`` per name.

    Example:
        >>> from qrnca_lens.data.prompts import ProxyConfig
        >>> [o.flag for o in options(ProxyConfig, ["kind", "seed"], kind="--proxy")]
        ['--proxy', '--seed']
    """
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]  # every Config is a dataclass
    unknown = sorted((set(names) - fields) | (set(flags) - set(names)))
    if unknown:
        raise ValueError(f"{cls.__name__}: {unknown} are not fields listed for the command line")
    return tuple(Option(cls, n, flags.get(n, "--" + n.replace("_", "-"))) for n in names)


def add_options(parser: Any, opts: Sequence[Option], *, defaults: bool = True) -> None:
    """Add ``opts`` to ``parser`` (or an argument group); ``defaults=False``: value options default to None.

    Example:
        >>> from qrnca_lens.qrnca.selection import SelectionConfig
        >>> p = argparse.ArgumentParser()
        >>> add_options(p, options(SelectionConfig, ["t"]), defaults=False)
        >>> p.parse_args([]).t is None
        True
    """
    for o in opts:
        action = parser.add_argument(o.flag, **o.argparse_kwargs(defaults))
        action.config_option = o  # lets a test find every generated option


def values(args: argparse.Namespace, opts: Sequence[Option]) -> dict[str, Any]:
    """Field -> value for every option given a value (or a default); unset flags and None are left out."""
    out = {}
    for o in opts:
        raw = getattr(args, o.dest)
        if raw is None or (o.is_flag and not raw):
            continue
        out[o.name] = o.parse(raw)
    return out


def build(cls: type[C], args: argparse.Namespace, opts: Sequence[Option], base: C | None = None) -> C:
    """``base`` (default ``cls()``) with the fields the options set; the config validates itself.

    Example: see the module docstring.
    """
    return dataclasses.replace(base if base is not None else cls(), **values(args, opts))  # type: ignore[type-var]
