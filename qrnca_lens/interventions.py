"""Boost and suppress neurons on the attributed hook (``hook_pre_linear``, or ``hook_pre`` for a plain MLP).

User-facing context managers, through the one hook door, that leave nothing behind:

    >>> with boost(model, [(14, 103), (20, 7)]):          # doctest: +SKIP
    ...     logits = model(tokens)                          # f_i <- 2 f̄_i at the last position
    >>> with suppress(model, neurons, every_position=True): # doctest: +SKIP
    ...     logits = model(tokens)                          # f_i <- 0 everywhere

and the batched form used by the evaluation, where every row of a batch carries its own neuron set, its own
factor and its own intervention position (``row_factors`` + ``scale_rows``).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .hooks import hooked, set_neurons
from .models import d_mlp, mlp_hook_name, model_device

__all__ = ["intervene", "boost", "suppress", "row_factors", "scale_rows", "BOOST", "SUPPRESS"]

BOOST, SUPPRESS = 2.0, 0.0

Neuron = tuple[int, int]


def _by_layer(neurons: Iterable[Sequence[int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = defaultdict(list)
    for n in neurons:
        out[int(n[0])].append(int(n[1]))
    return dict(out)


@contextlib.contextmanager
def intervene(model: Any, neurons: Iterable[Sequence[int]], factor: float, *,
              every_position: bool = False) -> Iterator[Any]:
    """Multiply the given (layer, neuron) activations by ``factor`` at the last position (or everywhere)."""
    hooks = [
        (mlp_hook_name(model, layer), set_neurons(torch.tensor(idx, device=model_device(model)), factor=factor,
                                                  position=None if every_position else -1))
        for layer, idx in sorted(_by_layer(neurons).items())
    ]
    with hooked(model, fwd=hooks):
        yield model


def boost(model: Any, neurons: Iterable[Sequence[int]], *, every_position: bool = False) -> Any:
    """f_i <- 2 f̄_i (the paper's boost)."""
    return intervene(model, neurons, BOOST, every_position=every_position)


def suppress(model: Any, neurons: Iterable[Sequence[int]], *, every_position: bool = False) -> Any:
    """f_i <- 0 (the paper's suppress)."""
    return intervene(model, neurons, SUPPRESS, every_position=every_position)


def row_factors(
    model: Any, rows: Sequence[tuple[Iterable[Sequence[int]], float] | None]
) -> dict[int, Float[Tensor, "batch d_mlp"]]:
    """Per-layer multiplicative factors for a batch: row b scales its neurons by its factor (None: untouched)."""
    per_layer: dict[int, Tensor] = {}
    width = d_mlp(model)
    for b, row in enumerate(rows):
        if row is None:
            continue
        neurons, factor = row
        for layer, idx in _by_layer(neurons).items():
            if layer not in per_layer:
                per_layer[layer] = torch.ones(len(rows), width, device=model_device(model))
            per_layer[layer][b, idx] = factor
    return per_layer


def scale_rows(
    model: Any, factors: dict[int, Float[Tensor, "batch d_mlp"]], positions: Int[Tensor, "batch"] | None
) -> Any:
    """Context: each row's activations scaled by its factors at its own position (None: every position)."""

    def make(f: Tensor) -> Any:
        def hook(act: Tensor, hook: Any) -> Tensor:
            g = f.to(act.dtype)
            if positions is None:
                return act * g[:, None, :]
            out = act.clone()
            rows = torch.arange(act.shape[0], device=act.device)
            out[rows, positions] = act[rows, positions] * g
            return out

        return hook

    return hooked(model, fwd=[(mlp_hook_name(model, layer), make(f)) for layer, f in sorted(factors.items())])
