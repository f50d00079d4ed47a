"""Boost and suppress neurons on the attributed hook (``hook_pre_linear``, or ``hook_pre`` for a plain MLP).

User-facing context managers, through the one hook door, that leave nothing behind:

    >>> with boost(model, [(14, 103), (20, 7)]):          # doctest: +SKIP
    ...     logits = model(tokens)                          # f_i <- 2 f̄_i at the last position (one row)
    >>> with boost(model, neurons, tokens=batch):           # doctest: +SKIP
    ...     logits = model(batch)                           # at each row's last non-pad token
    >>> with suppress(model, neurons, every_position=True): # doctest: +SKIP
    ...     logits = model(tokens)                          # f_i <- 0 everywhere

and the batched form used by the evaluation, where every row of a batch carries its own neuron set, its own
factor and its own intervention position (``row_factors`` + ``scale_rows``). Neurons are a ``NeuronSet``,
``(layer, neuron[, score])`` entries or a ``[n, 2]`` tensor; ``check_neurons`` converts and checks them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import ModelError, QrncaError
from ..neurons import NeuronSet, NeuronsLike
from ..protocols import HookedModel, Positioned
from .access import d_mlp, mlp_hook_name, model_device
from .hooks import hooked, set_neurons
from .positions import LAST, Position, last_real_positions, positions_from_mask

__all__ = [
    "intervene", "boost", "suppress", "row_factors", "scale_rows", "check_neurons", "resolve_positions", "BOOST",
    "SUPPRESS", "Intervention",
]

BOOST, SUPPRESS = 2.0, 0.0

Where = int | Sequence[int] | Tensor | Positioned | Sequence[Positioned] | None
# One scored row's intervention: (its neurons, the factor they are multiplied by), or None for a clean row.
Intervention = tuple[NeuronsLike, float] | None


def check_neurons(model: HookedModel, neurons: NeuronsLike) -> dict[int, list[int]]:
    """The neurons grouped by layer, or a clear error naming the valid range (before any forward pass).

    This is where the public intervention functions turn what they were given into a ``NeuronSet``.

    Args:
        model: the TL model the neurons belong to.
        neurons: a ``NeuronSet``, ``(layer, neuron[, score])`` entries, or a ``[n, 2]`` tensor.

    Returns:
        ``{layer: [neuron, ...]}`` (``NeuronSet.by_layer``).

    Example:
        >>> check_neurons(model, [(14, 103), (20, 7), (14, 9)])   # doctest: +SKIP
        {14: [103, 9], 20: [7]}
    """
    n_layers, width = int(model.cfg.n_layers), d_mlp(model)
    try:
        by_layer = NeuronSet(neurons).by_layer()
    except QrncaError as e:  # e.g. a negative index: name this model's valid range as well
        raise ModelError(f"{e}; valid layers are 0..{n_layers - 1}, valid neurons are 0..{width - 1}") from None
    for layer, idx in by_layer.items():
        if not 0 <= layer < n_layers:
            raise ModelError(f"neuron ({layer}, {idx[0]}): layer {layer} is out of range, "
                             f"valid layers are 0..{n_layers - 1}")
        bad = [i for i in idx if not 0 <= i < width]
        if bad:
            raise ModelError(f"neuron ({layer}, {bad[0]}): index {bad[0]} is out of range, "
                             f"valid neurons are 0..{width - 1}")
    return by_layer


def resolve_positions(
    model: HookedModel,
    positions: Where = None,
    *,
    tokens: Int[Tensor, "batch seq"] | None = None,
    attention_mask: Int[Tensor, "batch seq"] | None = None,
) -> Position:
    """Where each row is intervened on: the last *real* token of each row unless told otherwise.

    ``positions``: an int (every row), one int per row, a ``Prompt`` (its target position) or one per row.
    Otherwise the last real token of each row, from ``attention_mask`` (last 1) or ``tokens`` (last token
    that is not a trailing pad: TL's ``to_tokens`` pads right with the tokenizer's pad token). With none of
    them, a single-row batch acts at -1 and a batch of several rows is refused at the forward pass.
    """
    given = [n for n, v in (("positions", positions), ("tokens", tokens), ("attention_mask", attention_mask))
             if v is not None]
    if len(given) > 1:
        raise ModelError(f"pass only one of positions=, tokens=, attention_mask= (got {', '.join(given)})")
    if isinstance(positions, Positioned):
        return [positions.target_position]
    if isinstance(positions, Sequence) and positions and all(isinstance(p, Positioned) for p in positions):
        return [p.target_position for p in positions if isinstance(p, Positioned)]
    if positions is not None:
        return positions  # type: ignore[return-value]  # ints, one int per row, or a tensor: all Positions
    if attention_mask is not None:
        return positions_from_mask(torch.as_tensor(attention_mask))
    if tokens is not None:
        pad_id = getattr(getattr(model, "tokenizer", None), "pad_token_id", None)
        return last_real_positions(torch.as_tensor(tokens), pad_id)
    return LAST


@contextlib.contextmanager
def intervene(model: HookedModel, neurons: NeuronsLike, factor: float, *, every_position: bool = False,
              positions: Where = None,
              tokens: Int[Tensor, "batch seq"] | None = None,
              attention_mask: Int[Tensor, "batch seq"] | None = None) -> Iterator[Any]:
    """Multiply the given neurons' activations by ``factor`` at each row's last real token (or everywhere).

    Rows of a batch may be right-padded, so a batch needs ``positions=`` (ints or ``Prompt``s, one per row),
    ``tokens=`` (the batch itself; trailing pad tokens are skipped) or ``attention_mask=``; a single row acts
    at its last position. See ``resolve_positions``.

    Args:
        model: the TL model.
        neurons: a ``NeuronSet``, ``(layer, neuron[, score])`` entries or a ``[n, 2]`` tensor; checked against
            the model's range before anything is hooked.
        factor: the multiplier (``BOOST`` = 2, ``SUPPRESS`` = 0).
        every_position: act at every position instead.
        positions: one position per row (ints, or ``Prompt``s: their target position).
        tokens: the ``[batch, seq]`` batch, to find each row's last non-pad token.
        attention_mask: the ``[batch, seq]`` mask, to find each row's last real token.

    Returns:
        A context manager yielding ``model``; the hooks leave with the block.

    Example:
        >>> with intervene(model, [(14, 103), (20, 7)], 3.0):   # doctest: +SKIP
        ...     logits = model(tokens)
    """
    by_layer = check_neurons(model, neurons)
    if every_position:
        if positions is not None or tokens is not None or attention_mask is not None:
            raise ModelError("every_position=True acts everywhere: drop positions= / tokens= / attention_mask=")
        where: Position = None
    else:
        where = resolve_positions(model, positions, tokens=tokens, attention_mask=attention_mask)
    hooks = [
        (mlp_hook_name(model, layer), set_neurons(torch.tensor(idx, device=model_device(model)), factor=factor,
                                                  position=where))
        for layer, idx in sorted(by_layer.items())
    ]
    with hooked(model, fwd=hooks):
        yield model


def boost(model: HookedModel, neurons: NeuronsLike, *, every_position: bool = False, positions: Where = None,
          tokens: Tensor | None = None, attention_mask: Tensor | None = None) -> Any:
    """f_i <- 2 f̄_i (the paper's boost): ``intervene`` with ``BOOST``, same arguments.

    Args:
        model: the TL model.
        neurons: a ``NeuronSet``, ``(layer, neuron[, score])`` entries or a ``[n, 2]`` tensor.
        every_position, positions, tokens, attention_mask: where to act, as in ``intervene``.

    Returns:
        A context manager yielding ``model``; the hooks leave with the block.

    Example:
        >>> with boost(model, run.qr_neurons("capital-01")):   # doctest: +SKIP
        ...     logits = model(tokens)
    """
    return intervene(model, neurons, BOOST, every_position=every_position, positions=positions, tokens=tokens,
                     attention_mask=attention_mask)


def suppress(model: HookedModel, neurons: NeuronsLike, *, every_position: bool = False, positions: Where = None,
             tokens: Tensor | None = None, attention_mask: Tensor | None = None) -> Any:
    """f_i <- 0 (the paper's suppress): ``intervene`` with ``SUPPRESS``, same arguments.

    Args:
        model: the TL model.
        neurons: a ``NeuronSet``, ``(layer, neuron[, score])`` entries or a ``[n, 2]`` tensor.
        every_position, positions, tokens, attention_mask: where to act, as in ``intervene``.

    Returns:
        A context manager yielding ``model``; the hooks leave with the block.

    Example:
        >>> with suppress(model, [(14, 103)], every_position=True):   # doctest: +SKIP
        ...     logits = model(tokens)
    """
    return intervene(model, neurons, SUPPRESS, every_position=every_position, positions=positions, tokens=tokens,
                     attention_mask=attention_mask)


def row_factors(
    model: HookedModel, rows: Sequence[Intervention]
) -> dict[int, Float[Tensor, "batch d_mlp"]]:
    """Per-layer multiplicative factors for a batch: row b scales its neurons by its factor (None: untouched).

    Args:
        model: the TL model.
        rows: one ``(neurons, factor)`` or None per batch row (neurons as ``check_neurons`` takes them).

    Returns:
        ``{layer: [batch, d_mlp] factors}`` for ``scale_rows``.

    Example:
        >>> f = row_factors(model, [None, ([(0, 1)], 0.0)])   # doctest: +SKIP
    """
    per_layer: dict[int, Tensor] = {}
    width = d_mlp(model)
    for b, row in enumerate(rows):
        if row is None:
            continue
        neurons, factor = row
        for layer, idx in check_neurons(model, neurons).items():
            if layer not in per_layer:
                per_layer[layer] = torch.ones(len(rows), width, device=model_device(model))
            per_layer[layer][b, idx] = factor
    return per_layer


def scale_rows(
    model: HookedModel, factors: dict[int, Float[Tensor, "batch d_mlp"]], positions: Int[Tensor, " batch"] | None
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
