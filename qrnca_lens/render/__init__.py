"""Rendering a run: matplotlib figures (``figures``), circuitsvis views saved offline (``views``) and the one-file
HTML report (``report``). Each submodule takes the outputs of ``qrnca_lens.render.analysis``; heavy libraries load
inside the functions that need them.

Example:
    >>> from qrnca_lens.render import write_report
    >>> write_report("runs/facts", model)    # doctest: +SKIP
    PosixPath('runs/facts/report.html')
"""

from __future__ import annotations

from typing import Any

__all__ = ["write_report"]


def write_report(*args: Any, **kwargs: Any) -> Any:
    """See ``qrnca_lens.render.report.write_report``."""
    from .report import write_report as impl

    return impl(*args, **kwargs)
