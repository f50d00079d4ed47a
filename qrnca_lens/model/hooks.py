"""The one door through which hooks enter a model, and the hook functions that go through it.

``hooked(model, fwd=[...], bwd=[...])`` is a context manager in the style of TL's ``model.hooks()``. It
checks every hook name before adding anything (a typo fails with the list of what exists), and on exit,
exceptions included, it resets each hook point it was given to the hooks that point had on entry: nothing
qrnca-lens adds outlives the call. That reset also drops any hook the caller added to one of those points
inside the block; hooks on other points are not touched.

Example:
    >>> store = {}
    >>> with hooked(model, fwd=[("blocks.0.mlp.hook_post", capture(store))]):  # doctest: +SKIP
    ...     model(tokens)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ModelError
from ..protocols import HookedModel
from .positions import LAST, Position, row_positions

__all__ = ["hooked", "capture", "set_neurons", "active_hook_count", "hooked_points", "refuse_caller_hooks"]

HookFn = Callable[..., Any]
HookSpec = Sequence[tuple[str, HookFn]]


def _hook_point(model: HookedModel, name: str) -> Any:
    hooks = model.hook_dict
    if name not in hooks:
        near = sorted(n for n in hooks if n.split(".")[-1] == name.split(".")[-1])[:3]
        hint = f"; hooks with that suffix: {near}" if near else ""
        raise ModelError(f"the model has no hook {name!r}{hint}")
    return hooks[name]


def active_hook_count(model: HookedModel) -> int:
    """How many torch hooks (the ones that actually fire) sit on the model's hook points right now."""
    seen: set[int] = set()
    total = 0
    for point in model.hook_dict.values():
        if id(point) in seen:
            continue
        seen.add(id(point))
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            total += len(getattr(point, attr, {}))
    return total


def hooked_points(model: HookedModel) -> list[str]:
    """The names of the model's hook points that carry a hook right now (forward or backward, TL's or torch's).

    Outside any qrnca-lens call these are the caller's own hooks (``model.add_hook``, ``with model.hooks(...)``).
    An aliased point (a bridge names some points twice) is listed once, its names joined by " = ".

    Example:
        >>> with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", fn)]):   # doctest: +SKIP
        ...     hooked_points(model)
        ['blocks.1.hook_in = blocks.1.hook_resid_pre']
    """
    aliases: dict[int, list[str]] = {}
    for name, point in model.hook_dict.items():
        aliases.setdefault(id(point), []).append(name)
    seen: set[int] = set()
    names = []
    for point in model.hook_dict.values():
        if id(point) in seen:
            continue
        seen.add(id(point))
        if any(len(getattr(point, attr, None) or ()) for attr in
               ("fwd_hooks", "bwd_hooks", "_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                "_backward_pre_hooks")):
            names.append(" = ".join(aliases[id(point)]))
    return names


def refuse_caller_hooks(model: HookedModel, way_out: str) -> None:
    """A fast path lays tokens out at other positions than a plain forward; a caller's hook would see that layout.

    Raises ``FastPathError`` naming the hooked points (``way_out``: the caller's exact alternative)."""
    from ..errors import FastPathError

    names = hooked_points(model)
    if names:
        shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
        raise FastPathError(
            f"the model carries hooks of yours on {shown}: the fast path runs tokens at other positions than a "
            f"plain forward, so a hook that depends on positions would be applied wrongly; remove them "
            f"(model.reset_hooks()) or use {way_out}"
        )


def _snapshot(point: Any) -> tuple[list, list, dict, dict]:
    return (
        list(point.fwd_hooks),
        list(point.bwd_hooks),
        dict(getattr(point, "_forward_hooks", {})),
        dict(getattr(point, "_backward_hooks", {})),
    )


def _restore(point: Any, snap: tuple[list, list, dict, dict]) -> None:
    fwd, bwd, torch_fwd, torch_bwd = snap
    keep = {id(h) for h in fwd} | {id(h) for h in bwd}
    for handle in list(point.fwd_hooks) + list(point.bwd_hooks):
        if id(handle) not in keep:
            with contextlib.suppress(Exception):
                handle.hook.remove()
    point.fwd_hooks[:] = fwd
    point.bwd_hooks[:] = bwd
    # A torch-level handle can survive a TL handle list being cleared: drop whatever was not there before.
    for attr, before in (("_forward_hooks", torch_fwd), ("_backward_hooks", torch_bwd)):
        live = getattr(point, attr, None)
        if live is None:
            continue
        for key in [k for k in live if k not in before]:
            del live[key]


@contextlib.contextmanager
def hooked(model: HookedModel, fwd: HookSpec = (), bwd: HookSpec = ()) -> Iterator[Any]:
    """Attach forward/backward hooks for the duration of the block, then reset the points they went on.

    On exit (exceptions included) every hook point named in ``fwd``/``bwd`` gets back exactly the hooks it
    had on entry. So a hook the caller adds inside the block to one of those points (``model.add_hook``)
    is removed too, even a permanent one; a hook added inside the block to any other point stays, and is
    the caller's to remove. Hook names are TL names (``blocks.3.mlp.hook_pre_linear``). Works on a TL 4.x
    ``TransformerBridge`` and a TL 3.x ``HookedTransformer``.

    Args:
        model: the TL model.
        fwd: ``(hook name, hook function)`` pairs run on the forward pass.
        bwd: the same for the backward pass.

    Returns:
        A context manager yielding ``model``.

    Example:
        >>> with hooked(model, fwd=[("blocks.0.mlp.hook_post", capture(store))]):   # doctest: +SKIP
        ...     model(tokens)
    """
    points = {name: _hook_point(model, name) for name, _ in list(fwd) + list(bwd)}
    snaps = {id(p): (p, _snapshot(p)) for p in points.values()}
    try:
        with model.hooks(fwd_hooks=list(fwd), bwd_hooks=list(bwd)):
            yield model
    finally:
        for point, snap in snaps.values():
            _restore(point, snap)
        _release_captures(model)


def _release_captures(model: HookedModel) -> None:
    """TL 4.3's attention bridges keep the last residual they saw (``_captured_pre_ln_residual``); after a
    forward that stopped early or ran under autograd it would hold that pass's graph on the model."""
    for module in model.modules():
        if getattr(module, "_captured_pre_ln_residual", None) is not None:
            module._captured_pre_ln_residual = None


# ---------------------------------------------------------------- hook functions


def capture(store: dict[str, Tensor], key: str | None = None, *, position: int | None = None,
            detach: bool = True) -> HookFn:
    """A hook that records its activation in ``store[key]`` (optionally one position only).

    Pass ``key`` (usually the hook name you attach it to): a bridge reports some hooks under a canonical
    alias (``blocks.0.mlp.in.hook_out`` for ``blocks.0.mlp.hook_pre_linear``), which is the fallback key.

    Args:
        store: the dict the activation is written into.
        key: the key to write under (default: the name the hook point reports).
        position: keep only this sequence position (``act[:, position]``); None keeps all.
        detach: store a detached copy (False keeps the live tensor, for gradients).

    Returns:
        The hook function (for ``hooked(model, fwd=[(name, hook)])``); it returns the activation unchanged.

    Example:
        >>> store = {}
        >>> fn = capture(store, "blocks.0.mlp.hook_post", position=-1)
        >>> _ = fn(torch.arange(6.0).reshape(1, 3, 2), hook=None)   # as a hook point calls it: [batch, seq, d]
        >>> store["blocks.0.mlp.hook_post"].tolist()
        [[4.0, 5.0]]
    """

    def hook(act: Tensor, hook: Any) -> Tensor:
        value = act if position is None else act[:, position]
        store[key or hook.name] = value.detach().clone() if detach else value
        return act

    return hook


def set_neurons(
    neurons: Tensor,
    *,
    factor: float | Tensor,
    position: Position = LAST,
) -> HookFn:
    """A hook that multiplies the given neuron indices by ``factor`` (2 = boost, 0 = suppress).

    ``position``: ``"last"`` (default) the last position of a single-row batch, refusing a batch (its short
    rows may end in padding); an int, that position in every row; one int per row (list or tensor [batch]);
    None, every position. A tensor ``factor`` of shape (batch,) or (batch, n_neurons) gives each row its own
    factor.

    Args:
        neurons: ``[n]`` neuron indices within the hooked layer.
        factor: the multiplier: a float, or a tensor of shape (batch,) or (batch, n).
        position: where to act (see above).

    Returns:
        The hook function; it returns a scaled copy of the activation.

    Example:
        >>> fn = set_neurons(torch.tensor([1]), factor=0.0)      # suppress neuron 1 at the last position
        >>> fn(torch.ones(1, 2, 3), hook=None).tolist()
        [[[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]]]
        >>> with hooked(model, fwd=[("blocks.3.mlp.hook_post", fn)]):   # doctest: +SKIP
        ...     logits = model(tokens)
    """
    idx = neurons.long()

    def hook(act: Tensor, hook: Any) -> Tensor:
        out = act.clone()
        f = factor if not isinstance(factor, Tensor) else factor.to(act.dtype).to(act.device)
        if isinstance(f, Tensor) and f.ndim == 1:
            f = f[:, None]
        if position is None:
            g = f[:, None] if isinstance(f, Tensor) else f
            out[..., idx] = act[..., idx] * g
        else:
            pos = row_positions(position, act.shape[0], act.shape[1], act.device)
            rows = torch.arange(act.shape[0], device=act.device)[:, None]
            cols = idx.to(act.device)[None, :]
            out[rows, pos[:, None], cols] = act[rows, pos[:, None], cols] * f
        return out

    return hook
