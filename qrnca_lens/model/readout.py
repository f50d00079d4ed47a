"""Reading logits off the final residual: the model's own final norm and unembedding, at chosen positions.

A forward stopped at the final residual (``StopForward`` from a hook on ``final_residual_hook``) and then
``head`` on a few positions gives the full forward's logits there at a fraction of the memory: no
full-vocabulary vector for every position of every row.

Example:
    >>> lp = logprobs_at(model, ids, [range(9, 11)])[0]   # [2, vocab], float32   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..protocols import HookedModel
from .access import W_U, final_norm, model_dtype, n_layers, unembed
from .hooks import hooked

__all__ = ["StopForward", "final_residual_hook", "final_residual", "head", "head32", "logprobs_at"]


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
    cap = _soft_cap(model)
    if cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


# A half-precision unembedding is upcast this many elements at a time: the float32 copy of an 8B model's
# 128k x 4096 W_U (2 GB) never exists at once, in the forward or in the backward.
_UPCAST_ELEMENTS = 2**24


class _UpcastMatmul(torch.autograd.Function):
    """x @ W in float32 for a half-precision constant W, upcast column block by column block (no grad for W)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, W: Tensor) -> Tensor:
        ctx.save_for_backward(W)
        step = max(1, _UPCAST_ELEMENTS // max(1, W.shape[0]))
        return torch.cat([x @ W[:, i : i + step].float() for i in range(0, W.shape[1], step)], dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (W,) = ctx.saved_tensors
        step = max(1, _UPCAST_ELEMENTS // max(1, W.shape[0]))
        gx = None
        for i in range(0, W.shape[1], step):
            part = grad[..., i : i + step] @ W[:, i : i + step].float().T
            gx = part if gx is None else gx + part
        assert gx is not None
        return gx, None


def head32(model: HookedModel, resid: Tensor) -> Float[Tensor, "... vocab"]:
    """Float32 logits from final residuals, whatever the model's dtype (differentiable in ``resid``).

    A float32 model runs its own final norm and unembedding (``head``). A bfloat16 / float16 model has the
    residual upcast first: the norm runs on float32 input (transformers' norms and the bridge's then return
    float32; TL 3.x's ``RMSNorm`` rounds its output back to the model dtype), and the unembedding multiplies in
    float32 with W_U upcast block by block. A bf16 logit near |31| has steps of 0.125, and an fp16 gradient of
    a probability of 1e-9 flushes to zero: neither happens here.

    Example:
        >>> logits = head32(model, resid)          # [..., vocab], float32         # doctest: +SKIP
    """
    if model_dtype(model) in (torch.float32, torch.float64):
        return head(model, resid).float()
    norm = final_norm(model)
    x = resid.float()
    x = norm(x).float() if norm is not None else x
    logits = _UpcastMatmul.apply(x, W_U(model).detach())
    try:
        bias = cast(Any, model).b_U
    except (AttributeError, RuntimeError, TypeError):
        bias = None
    if isinstance(bias, Tensor):
        logits = logits + bias.detach().float()
    cap = _soft_cap(model)
    if cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


def _soft_cap(model: HookedModel) -> float:
    """The final logit soft-cap; 0 or below (TL's -1) means none."""
    hf_cfg = getattr(getattr(model, "original_model", None), "config", None)
    cap = getattr(hf_cfg, "final_logit_softcapping", None) if hf_cfg is not None else None
    return float(cap or getattr(getattr(model, "cfg", None), "output_logits_soft_cap", 0.0) or 0.0)


def final_residual(model: HookedModel, ids: Int[Tensor, "batch seq"], fwd: Sequence[tuple[str, Any]] = ()) -> Tensor:
    """The residual stream entering the final norm, every position (the forward stops there; ``fwd``: more
    hooks for the pass). Differentiable when gradients are on."""
    store: dict[str, Tensor] = {}

    def stop(act: Tensor, hook: Any) -> Tensor:
        store["resid"] = act
        raise StopForward

    with hooked(model, fwd=[*fwd, (final_residual_hook(model), stop)]):
        try:
            model(ids)
        except StopForward:
            pass
    return store["resid"]


def logprobs_at(model: HookedModel, ids: Int[Tensor, "batch seq"], positions: Sequence[Sequence[int]]) -> list[Tensor]:
    """Float32 log-probabilities [len(positions[b]), vocab] of each row at its listed positions only (``head32``).

    The forward stops at the final residual; the final norm and unembedding then run on those positions,
    which equals the full forward's logits there (tested) at a fraction of the memory.
    """
    resid = final_residual(model, ids)
    out = []
    for b, pos in enumerate(positions):
        idx = torch.tensor(list(pos), dtype=torch.long, device=resid.device)
        out.append(torch.log_softmax(head32(model, resid[b : b + 1, idx])[0], dim=-1))
    return out
