"""Old import paths, kept for one release: ``qrnca_lens.locate``, ``qrnca_lens.models``, ... before the folders.

Each old module path resolves to the module that holds its code now, with a ``DeprecationWarning`` naming the
new path (TransformerLens's pattern for moved modules). A module that was split in two (``models``: loading and
access; ``hooks``: the door, surgery, positions) becomes a view that looks a name up in each part. The former
modules ``data``, ``locators``, ``evaluation`` and ``bench`` are packages now: their old names are forwarded by the
package's ``__getattr__`` through ``forwarded``.

Example:
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     from qrnca_lens.locate import LocateConfig
    >>> LocateConfig.__module__, "qrnca_lens.qrnca.locate" in str(w[0].message)
    ('qrnca_lens.qrnca.locate', True)
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

__all__ = ["MOVED", "forwarded", "install"]

# old module (relative to qrnca_lens) -> its new module(s), the first the main one
MOVED: dict[str, tuple[str, ...]] = {
    "proxies": ("data.prompts",), "grouping": ("data.grouping",),
    "models": ("model.loading", "model.access"), "hooks": ("model.hooks", "model.surgery", "model.positions"),
    "readout": ("model.readout",), "interventions": ("model.interventions",), "plan": ("engine.plan",),
    "attribution": ("qrnca.ig",), "selection": ("qrnca.selection",), "locate": ("qrnca.locate",),
    "store": ("qrnca.store",), "executors": ("qrnca.executors",), "first_order": ("locators.first_order",),
    "comparison": ("evaluation.result",), "metrics": ("evaluation.metrics",),
    "ground_truth": ("evaluation.ground_truth",), "symbol_binding": ("evaluation.symbol_binding",),
    "scoring": ("engine.scoring",), "analysis": ("render.analysis",), "competence": ("render.competence",),
    "simulate": ("bench.simulate",), "lens.bench": ("bench.lens",),
}
_ROOT = __name__.rpartition(".")[0]


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; the old path goes in the next release", DeprecationWarning, stacklevel=3)


class _SplitView(types.ModuleType):
    """An old module whose names now live in several modules: each lookup asks them in order."""

    def __init__(self, name: str, parts: list[types.ModuleType]) -> None:
        super().__init__(name)
        self.__dict__["_parts"] = parts

    def __getattr__(self, name: str) -> Any:
        for part in self.__dict__["_parts"]:
            if hasattr(part, name):
                return getattr(part, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:  # monkeypatching an old path patches the part that has it
        for part in self.__dict__["_parts"]:
            if hasattr(part, name):
                setattr(part, name, value)
                return
        super().__setattr__(name, value)


class _Loader(importlib.abc.Loader):
    def __init__(self, old: str) -> None:
        self.old = old

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        news = [f"{_ROOT}.{n}" for n in MOVED[self.old]]
        _warn(spec.name, " and ".join(news))
        parts = [importlib.import_module(n) for n in news]
        return parts[0] if len(parts) == 1 else _SplitView(spec.name, parts)

    def exec_module(self, module: types.ModuleType) -> None:
        pass


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        prefix = _ROOT + "."
        if not fullname.startswith(prefix) or fullname[len(prefix):] not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Loader(fullname[len(prefix):]))


def install() -> None:
    """Put the old-path finder on ``sys.meta_path`` once (the package's ``__init__`` calls it)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())  # before an editable install's finder, which may know the old files


def forwarded(package: str, module: str, name: str) -> Any:
    """``getattr(qrnca_lens.<module>, name)`` with a warning: a name of the former module ``package``."""
    target = importlib.import_module(f"{_ROOT}.{module}")
    if name.startswith("__") or not hasattr(target, name):
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    _warn(f"{package}.{name}", f"{_ROOT}.{module}.{name}")
    return getattr(target, name)
