"""Queries, the prompts built from them (proxies) and their groupings; the built-in data sets in ``builtin/``.

It imports ``model/`` (a tokenizer, the default BOS) and the root modules.

Names of the former module ``data.py`` still resolve here for one release, with a
``DeprecationWarning`` naming their new home (``qrnca_lens.data.queries``)."""

from typing import Any


def __getattr__(name: str) -> Any:
    from .._legacy import forwarded

    return forwarded(__name__, 'data.queries', name)
