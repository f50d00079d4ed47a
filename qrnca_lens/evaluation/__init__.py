"""Judging neurons: ``judge`` (``evaluate``: PCR, editing, free form, neuron prediction), ``metrics``, ``ground_truth``, ``symbol_binding`` and the verdict (``result``: ``EvaluationResult``).

It imports ``locators/`` and everything below it, never ``render/``, ``bench/`` or ``cli/``.

Names of the former module ``evaluation.py`` still resolve here for one release, with a
``DeprecationWarning`` naming their new home (``qrnca_lens.evaluation.judge``)."""

from typing import Any


def __getattr__(name: str) -> Any:
    from .._legacy import forwarded

    return forwarded(__name__, 'evaluation.judge', name)
