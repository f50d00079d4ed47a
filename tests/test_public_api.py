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
