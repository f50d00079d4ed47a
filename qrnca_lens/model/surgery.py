"""Model surgery during qrnca-lens's own passes: the prefix cache's keyword, skipping the blocks below a layer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..protocols import HookedModel

__all__ = ["prefix_cache_kwarg", "skip_blocks"]


def _cache_keyword(hf_model: Any) -> str:
    """The keyword under which a transformers model takes a prefix cache.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns and goes in 5.40); the
    decorator that maps the old name keeps the signature, so the new name is visible there.
    """
    import inspect

    try:
        params = inspect.signature(hf_model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


@contextlib.contextmanager
def prefix_cache_kwarg(model: HookedModel) -> Iterator[str]:
    """Yield the keyword that hands a prefix cache to a bridged transformers model, and make it reach TL.

    On transformers >= 5.24 the model takes ``cache=`` and passes ``cache=`` on to each attention module,
    but TL 4.3's attention bridge reads only ``past_key_values`` (and ``layer_past``): the cache stays
    empty and every row attends to itself alone. For the duration of the block, each attention bridge gets
    the cache under the name it reads as well. On older transformers nothing is attached. The fast paths
    check their α = 1 rows against a plain forward, so a future change of this contract fails loudly.
    """
    hf = getattr(model, "original_model", None)
    keyword = _cache_keyword(hf) if hf is not None else "past_key_values"
    handles = []
    if keyword == "cache":

        def forward_as_past_key_values(module: Any, args: Any, kwargs: dict[str, Any]) -> Any:
            if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
                return args, {**kwargs, "past_key_values": kwargs["cache"]}
            return None

        for module in model.modules():
            if callable(getattr(module, "_update_kv_cache", None)):
                handles.append(module.register_forward_pre_hook(forward_as_past_key_values, with_kwargs=True))
    try:
        yield keyword
    finally:
        for handle in handles:
            handle.remove()


def _identity_block(*args: Any, **kwargs: Any) -> Any:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def skip_blocks(model: HookedModel, below: int) -> Iterator[None]:
    """For the duration of the block, the bridge's blocks ``0..below-1`` return their input unchanged.

    The row engine feeds the clean residual entering block ``below`` as ``inputs_embeds``; the blocks under
    it would recompute what is already known (TL's bridge ``start_at_layer`` still runs them). Their hooks do
    not fire. The instance attribute shadows the class's ``forward`` and is removed on exit, errors included.
    """
    blocks = list(getattr(model, "blocks", []))[: max(0, below)]
    for block in blocks:
        object.__setattr__(block, "forward", _identity_block)
    try:
        yield
    finally:
        for block in blocks:
            if "forward" in vars(block):
                object.__delattr__(block, "forward")
