"""The public API: everything in __all__ resolves, and importing the package stays light."""

from __future__ import annotations

import subprocess
import sys


def test_every_export_resolves():
    import qrnca_lens as ql

    missing = [n for n in ql.__all__ if n != "__version__" and getattr(ql, n, None) is None]
    assert missing == []


def test_import_is_lazy():
    code = "import sys, qrnca_lens; print(any(m in sys.modules for m in ('torch', 'pandas', 'matplotlib', 'circuitsvis')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_functions_named_like_their_module_stay_functions():
    """ql.locate is the function even after its submodule was imported (by an export, or directly)."""
    code = """
import importlib, pkgutil, types
import qrnca_lens as ql
ql.LocateConfig                                    # loads qrnca_lens.locate first, through another name
for m in pkgutil.walk_packages(ql.__path__, "qrnca_lens."):
    importlib.import_module(m.name)
modules = sorted(n for n in ql.__all__ if isinstance(getattr(ql, n), types.ModuleType))
print(modules, callable(ql.locate), ql.locate is importlib.import_module("qrnca_lens.locate").locate)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[-2] == "[] True True"
