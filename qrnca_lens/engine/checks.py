"""The row engine's self-checks: rows must reproduce a plain forward, and starting above layer 0 must be exact."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import FastPathError
from ..models import model_device, model_dtype
from ..protocols import HookedModel
from ..readout import logprobs_at
from .prefix import Prefix, Row

__all__ = ["skipping_is_exact", "check_against_plain", "plain_logprobs", "check_tolerance", "CHECK_TOL"]


_SKIP_OK: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()
# Float error of a cached row against a plain forward is ~1e-5 nats in float32; a broken cache contract
# (an empty or shifted prefix) moves log-probabilities by far more than these bounds.
CHECK_TOL = {torch.float32: 1e-3, torch.float64: 1e-6}
CHECK_TOL_LOW = 5e-2  # float16 / bfloat16


def check_tolerance(dtype: torch.dtype) -> float:
    return CHECK_TOL.get(dtype, CHECK_TOL_LOW)


def _max_live_diff(a: Tensor, b: Tensor) -> float:
    """Largest |a - b| on the tokens ``b`` gives at least 1e-6 probability (the far tail's float error says
    nothing about the cache)."""
    live = b > -13.8
    return float(((a - b).abs() * live).max())


def skipping_is_exact(prefix: Prefix) -> bool:
    """Does starting a row at a layer above 0 reproduce the row started at 0, on this model? (Once per model.)"""
    model = prefix.model
    if prefix.backend == "full" or prefix.L < 2:
        return False
    if model in _SKIP_OK:
        return _SKIP_OK[model]
    row = Row(0, (prefix.prompts[0][-1],))
    try:
        with torch.no_grad():
            base, _, _ = prefix.clean_pass([row])
            top = prefix.forward([row], start=prefix.L - 1)
        ok = bool(torch.isfinite(base).all()) and _max_live_diff(top, base) <= check_tolerance(model_dtype(model))
    except Exception:  # an architecture whose blocks cannot be skipped this way: rows start at layer 0
        ok = False
    _SKIP_OK[model] = ok
    return ok


def plain_logprobs(model: HookedModel, prompt: Sequence[int], row_tokens: Sequence[int]) -> Float[Tensor, "tokens vocab"]:
    """An ordinary forward of prompt[:-1] + row tokens (no cache, no intervention): log-probs at the row."""
    seq = list(prompt[:-1]) + list(row_tokens)
    P = len(prompt) - 1
    with torch.no_grad():
        return logprobs_at(model, torch.tensor([seq], device=model_device(model)), [range(P, len(seq))])[0]


def check_against_plain(prefix: Prefix, b: int, row_lp: Tensor, row_tokens: Sequence[int], what: str) -> None:
    """A clean row must reproduce the plain forward of its prompt: else the cache contract changed.

    The reference is the prefix pass's own logits when it ran the row's tokens (``Prefix.plain``), else an
    ordinary forward of the prompt and row."""
    from ..versions import versions_line

    known = prefix.plain[b] if prefix.plain is not None else None
    if known is not None and known.shape[0] == len(row_tokens):
        plain = known.to(row_lp.device)
    else:
        plain = plain_logprobs(prefix.model, prefix.prompts[b], row_tokens).to(row_lp.device)
    if not torch.isfinite(plain).all():
        return  # the model itself overflows; the callers' finiteness checks name that and its fix
    diff = _max_live_diff(row_lp, plain)
    tol = check_tolerance(model_dtype(prefix.model))
    if not diff <= tol:
        raise FastPathError(
            f"the prefix-cached rows do not reproduce a plain forward: {what} differs from the clean "
            f"prompt's log-probabilities by {diff:.3g} nats (tolerance {tol:g}). The prefix-cache contract of the "
            f"installed libraries has changed ({versions_line()}). Use the reference paths "
            "(IGConfig(method='reference'); engine=False for scoring) and report the versions; nothing was returned"
        )
