"""The row engine's self-checks: rows must reproduce a plain forward, and starting above layer 0 must be exact."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import FastPathError
from ..model.access import model_device, model_dtype
from ..model.readout import logprobs_at
from ..protocols import HookedModel
from .prefix import Prefix, Row

__all__ = ["skipping_is_exact", "check_against_plain", "CleanRowCheck", "plain_logprobs", "check_tolerance",
           "gap_to_plain", "off_rows", "fast_path_broken", "CHECK_TOL", "NOISE_K", "LIVE_LOGPROB", "ENGINE_WAY_OUT"]


_SKIP_OK: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()
# Float error of a cached row against a plain forward is ~1e-5 nats in float32; a broken cache contract
# (an empty or shifted prefix) moves log-probabilities by far more than these bounds.
CHECK_TOL = {torch.float32: 1e-3, torch.float64: 1e-6}
CHECK_TOL_LOW = 5e-2  # float16 / bfloat16, for a caller that has no log-probability spread to scale by
# Half precision: tolerance = NOISE_K * eps(dtype) * spread, where spread is the largest (max - min) of the
# plain forward's float32 log-probabilities over the vocabulary at the checked positions. A rounding flip in a
# bf16/fp16 forward moves live log-probabilities by up to 0.72 eps * spread (SmolLM2, measured: a packed row
# against the plain forward); an emptied prefix cache moves them by 49-59 eps * spread.
NOISE_K = 2.0
# log(1e-6) ~ -13.8: the self-checks compare only the tokens the plain forward gives p > 1e-6 (and the target,
# whatever its probability). The far tail carries no probability any result reads, and its float error would
# set the tolerance by noise rather than by the cache; a broken cache moves the live tokens anyway. (-13.8, not
# math.log(1e-6) = -13.816: the set of compared tokens stays what it was.)
LIVE_LOGPROB = -13.8


def check_tolerance(dtype: torch.dtype, spread: float | None = None) -> float:
    """The largest |Δ log p| a clean row may show against a plain forward, in nats.

    float32: 1e-3, float64: 1e-6 (rows equal the plain forward to ~1e-5). bfloat16 / float16:
    ``max(1e-3, NOISE_K * finfo(dtype).eps * spread)`` with ``NOISE_K = 2`` and ``spread`` the largest
    log-probability range over the vocabulary of the plain forward (0.70 nats on SmolLM2 in bf16, 0.088 in
    fp16); without a spread, 0.05.

    Example:
        >>> check_tolerance(torch.float32), round(check_tolerance(torch.bfloat16, 45.0), 3)
        (0.001, 0.703)
    """
    if dtype in CHECK_TOL:
        return CHECK_TOL[dtype]
    if spread is None:
        return CHECK_TOL_LOW
    return max(CHECK_TOL[torch.float32], NOISE_K * torch.finfo(dtype).eps * float(spread))


def gap_to_plain(row_lp: Float[Tensor, "tokens vocab"], plain: Float[Tensor, "tokens vocab"],
                 targets: Sequence[int] | None = None) -> Float[Tensor, " 2"]:
    """(largest |row - plain| on the live tokens and the targets, the plain forward's spread), on the device;
    the gap is 0 where the plain forward is not finite.

    Live tokens: those the plain forward gives at least 1e-6 probability; ``targets`` (one token per
    position) are compared whatever their probability. No host sync: callers batch the verdicts."""
    plain = plain.to(row_lp.device)
    keep = plain > LIVE_LOGPROB
    if targets is not None:
        idx = torch.tensor(list(targets), device=plain.device)[:, None]
        keep = keep.scatter(-1, idx, True)
    diff = torch.where(keep, (row_lp - plain).abs(), torch.zeros((), device=plain.device)).amax()
    ok = torch.isfinite(plain)
    finite = torch.where(ok, plain, torch.zeros((), device=plain.device))
    spread = (finite.amax(-1) - finite.amin(-1)).amax()
    # A plain forward that overflows itself says nothing about the cache: the finiteness checks name it.
    diff = torch.where(ok.all(), diff, torch.zeros((), device=plain.device))
    return torch.stack([diff, spread])


def off_rows(gaps: Float[Tensor, "n 2"], dtype: torch.dtype) -> list[tuple[int, float, float]]:
    """The (index, gap, tolerance) of every checked row whose gap exceeds its tolerance (one host sync)."""
    host = gaps.detach().float().cpu().tolist()
    out = []
    for i, (diff, spread) in enumerate(host):
        tol = check_tolerance(dtype, spread)
        if not diff <= tol:
            out.append((i, diff, tol))
    return out


def fast_path_broken(what: str, diff: float, tol: float, dtype: torch.dtype, way_out: str) -> FastPathError:
    """The error of a failed self-check: it names both causes the check can have seen and the way out."""
    from ..versions import versions_line

    return FastPathError(
        f"the fast path does not reproduce a plain forward: {what} differs from the clean prompt's "
        f"log-probabilities by {diff:.3g} nats (tolerance {tol:.3g} in {str(dtype).replace('torch.', '')}). "
        "Either a hook of yours acts inside the model where the hook points do not show it (a torch hook on a "
        "module, a patched forward), or the prefix-cache contract of the installed libraries has changed "
        f"({versions_line()}). Use {way_out}; if the model carries no hook of yours, report the versions. "
        "Nothing was returned"
    )


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
        diff, spread = gap_to_plain(top, base).tolist()
        ok = bool(torch.isfinite(base).all()) and diff <= check_tolerance(model_dtype(model), spread)
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


ENGINE_WAY_OUT = "the reference paths (IGConfig(method='reference'); engine=False for scoring)"


class CleanRowCheck:
    """The fast path's self-check: clean rows must reproduce the plain forward of their prompt, else the cache
    contract changed. The one check of ``run_rows`` and of IG's fast path.

    ``add`` records a clean row's gap on the device (``gap_to_plain``; no host sync), ``verify`` raises
    ``fast_path_broken`` for the first row off its tolerance (``check_tolerance``), one host sync for all. The
    reference is the prefix pass's own logits when it ran the row's tokens (``Prefix.plain``), else an ordinary
    forward of the prompt and row (``plain_logprobs``, once per prompt and tokens).

    Example:
        >>> check = CleanRowCheck(prefix)                                   # doctest: +SKIP
        >>> check.add(0, row_lp, row_tokens, "the clean row of prompt 0")   # doctest: +SKIP
        >>> check.verify()                                                  # doctest: +SKIP
    """

    def __init__(self, prefix: Prefix, way_out: str = ENGINE_WAY_OUT) -> None:
        self.prefix, self.way_out = prefix, way_out
        self._gaps: list[Tensor] = []
        self._whats: list[str] = []
        self._plain: dict[tuple[int, tuple[int, ...]], Tensor] = {}

    def reference(self, b: int, row_tokens: Sequence[int]) -> Float[Tensor, "tokens vocab"]:
        """The plain forward's log-probabilities at the clean row ``row_tokens`` of prompt ``b``."""
        key = (b, tuple(row_tokens))
        if key not in self._plain:
            known = self.prefix.plain[b] if self.prefix.plain is not None else None
            if known is not None and known.shape[0] == len(row_tokens):
                self._plain[key] = known
            else:
                self._plain[key] = plain_logprobs(self.prefix.model, self.prefix.prompts[b], row_tokens)
        return self._plain[key]

    def add(self, b: int, row_lp: Float[Tensor, "tokens vocab"], row_tokens: Sequence[int], what: str,
            targets: Sequence[int] | None = None) -> None:
        """Record clean row ``row_lp`` of prompt ``b`` (``targets``: compared whatever their probability);
        ``what`` names it in the error."""
        self._gaps.append(gap_to_plain(row_lp.detach(), self.reference(b, row_tokens), targets))
        self._whats.append(what)

    def verify(self) -> None:
        """Raise ``FastPathError`` naming the first recorded row whose gap exceeds its tolerance."""
        if not self._gaps:
            return
        dtype = model_dtype(self.prefix.model)
        for i, diff, tol in off_rows(torch.stack(self._gaps), dtype)[:1]:
            raise fast_path_broken(self._whats[i], diff, tol, dtype, self.way_out)


def check_against_plain(prefix: Prefix, b: int, row_lp: Tensor, row_tokens: Sequence[int], what: str) -> None:
    """One clean row's ``CleanRowCheck``: it must reproduce the plain forward of its prompt.

    Example:
        >>> check_against_plain(prefix, 0, row_lp, row_tokens, "the clean row of prompt 0")   # doctest: +SKIP
    """
    check = CleanRowCheck(prefix)
    check.add(b, row_lp, row_tokens, what)
    check.verify()
