"""Locators: the one ``Locator`` protocol, its registry and the built-in baselines (``registry``), first-order neuron scores (``first_order``).

It imports ``qrnca/``, ``lens/``, ``engine/``, ``model/``, ``data/`` and the root modules.

Names of the former module ``locators.py`` still resolve here for one release, with a
``DeprecationWarning`` naming their new home (``qrnca_lens.locators.registry``)."""

from typing import Any


def __getattr__(name: str) -> Any:
    from .._legacy import forwarded

    return forwarded(__name__, 'locators.registry', name)
