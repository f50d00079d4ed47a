"""Reading logits off the final residual: the model's own final norm and unembedding, at chosen positions.

A forward stopped at the final residual (``StopForward`` from a hook on ``final_residual_hook``) and then
``head`` on a few positions gives the full forward's logits there at a fraction of the memory: no
full-vocabulary vector for every position of every row.

Example:
    >>> lp = logprobs_at(model, ids, [range(9, 11)])[0]   # [2, vocab], float32   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from .hooks import hooked
from .models import final_norm, n_layers, unembed
from .protocols import HookedModel

__all__ = ["StopForward", "final_residual_hook", "head", "logprobs_at"]


class StopForward(Exception):
    """Raised from a hook to end a forward early: at the final residual (no vocabulary logits computed), or
    once a prefix pass has filled its cache."""


def final_residual_hook(model: HookedModel) -> str:
    """The hook that sees the residual stream entering the final norm (the unembedding for norm-free models)."""
    if "ln_final.hook_in" in model.hook_dict:  # TL 4.x bridge
        return "ln_final.hook_in"
    return f"blocks.{n_layers(model) - 1}.hook_resid_post"  # HookedTransformer: ln_final has no hook_in


def head(model: HookedModel, resid: Tensor) -> Tensor:
    """Logits from final residuals: the model's own final norm and unembedding (and logit soft-cap, if any)."""
    norm = final_norm(model)
    x = norm(resid) if norm is not None else resid
    logits = unembed(model)(x)
    hf_cfg = getattr(getattr(model, "original_model", None), "config", None)
    cap = getattr(hf_cfg, "final_logit_softcapping", None) if hf_cfg is not None else None
    cap = cap or getattr(getattr(model, "cfg", None), "output_logits_soft_cap", 0.0)
    if cap and cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


def logprobs_at(model: HookedModel, ids: Int[Tensor, "batch seq"], positions: Sequence[Sequence[int]]) -> list[Tensor]:
    """Float32 log-probabilities [len(positions[b]), vocab] of each row at its listed positions only.

    The forward stops at the final residual; the final norm and unembedding then run on those positions,
    which equals the full forward's logits there (tested) at a fraction of the memory.
    """
    store: dict[str, Tensor] = {}

    def stop(act: Tensor, hook: Any) -> Tensor:
        store["resid"] = act
        raise StopForward

    with hooked(model, fwd=[(final_residual_hook(model), stop)]):
        try:
            model(ids)
        except StopForward:
            pass
    resid = store["resid"]
    out = []
    for b, pos in enumerate(positions):
        idx = torch.tensor(list(pos), dtype=torch.long, device=resid.device)
        out.append(torch.log_softmax(head(model, resid[b : b + 1, idx]).float()[0], dim=-1))
    return out
