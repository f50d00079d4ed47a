"""Benchmarks: IG fast vs reference (``ig``), the lens (``lens``), the scale simulation (``simulate``).

It imports ``evaluation/`` and everything below it.

Names of the former module ``bench.py`` still resolve here for one release, with a
``DeprecationWarning`` naming their new home (``qrnca_lens.bench.ig``)."""

from typing import Any


def __getattr__(name: str) -> Any:
    from .._legacy import forwarded

    return forwarded(__name__, 'bench.ig', name)
