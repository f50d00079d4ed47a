"""Pure metrics of the evaluation (METHOD section 4): no model, just numbers. Each has a hand-checked test.

- ``relative_change``: (p_after - p_before) / p_before in percent.
- ``pcr``: probability change ratio = mean |related change| / mean |unrelated change| over queries, where a
  query's change is the mean over its prompts.
- ``bootstrap_ci``: a percentile interval of a statistic of paired per-query values, resampling queries.
- ``editing_rates``: boost success = share of wrongly answered prompts made right; suppress success = share of
  rightly answered prompts made wrong.

Example:
    >>> pcr([10.0, -20.0], [1.0, 2.0])
    10.0
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np

from .errors import QrncaError

__all__ = [
    "relative_change", "relative_change_log", "pcr", "bootstrap_ci", "BootstrapCI", "editing_rates", "mean_or_none",
]


def relative_change(before: Sequence[float], after: Sequence[float]) -> np.ndarray:
    """Percent change of each probability: 100 * (after - before) / before."""
    b = np.asarray(before, dtype=np.float64)
    a = np.asarray(after, dtype=np.float64)
    if b.shape != a.shape:
        raise QrncaError(f"before and after differ in shape: {b.shape} vs {a.shape}")
    if np.any(b <= 0) or not np.all(np.isfinite(b)) or not np.all(np.isfinite(a)):
        raise QrncaError("probabilities must be finite and the 'before' ones positive to take a relative change")
    return 100.0 * (a - b) / b


def relative_change_log(before_logp: Sequence[float], after_logp: Sequence[float]) -> np.ndarray:
    """The same percent change from log-probabilities: 100 * (exp(after - before) - 1), exact for tiny p."""
    b = np.asarray(before_logp, dtype=np.float64)
    a = np.asarray(after_logp, dtype=np.float64)
    if b.shape != a.shape:
        raise QrncaError(f"before and after differ in shape: {b.shape} vs {a.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise QrncaError("log-probabilities must be finite (a target with probability 0 has no relative change)")
    return 100.0 * np.expm1(a - b)


def _ratio(related: np.ndarray, unrelated: np.ndarray) -> float:
    den = float(np.mean(np.abs(unrelated)))
    num = float(np.mean(np.abs(related)))
    if den == 0.0:
        return float("inf") if num > 0 else float("nan")
    return num / den


def pcr(related: Sequence[float], unrelated: Sequence[float]) -> float:
    """mean |related| / mean |unrelated| over queries (each value: one query's mean change, in percent)."""
    r, u = np.asarray(related, dtype=np.float64), np.asarray(unrelated, dtype=np.float64)
    if r.size == 0 or u.size == 0:
        raise QrncaError("PCR needs at least one related and one unrelated change")
    return _ratio(r, u)


class BootstrapCI(tuple):
    """``(lo, hi)`` that also says how many of its ``n_boot`` resamples were left out (``dropped``).

    A resample whose statistic is not finite (PCR with every unrelated change 0: infinite) cannot be ranked,
    so it is dropped; that narrows the interval towards the finite values, so the count travels with it.
    """

    dropped: int
    n_boot: int

    def __new__(cls, lo: float, hi: float, *, dropped: int = 0, n_boot: int = 0) -> "BootstrapCI":
        self = super().__new__(cls, (lo, hi))
        self.dropped, self.n_boot = dropped, n_boot
        return self

    def __repr__(self) -> str:
        note = f", {self.dropped} of {self.n_boot} resamples non-finite and dropped" if self.dropped else ""
        return f"BootstrapCI({self[0]!r}, {self[1]!r}{note})"


def bootstrap_ci(
    related: Sequence[float],
    unrelated: Sequence[float],
    *,
    stat: Callable[[np.ndarray, np.ndarray], float] = _ratio,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> BootstrapCI:
    """Percentile interval of ``stat`` under resampling of queries (pairs kept together), seeded locally.

    Resamples with a non-finite statistic are dropped, counted in the result's ``dropped`` and warned about.
    """
    r, u = np.asarray(related, dtype=np.float64), np.asarray(unrelated, dtype=np.float64)
    if r.shape != u.shape or r.size == 0:
        raise QrncaError("bootstrap needs paired, non-empty related/unrelated values (one pair per query)")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, r.size, size=(n_boot, r.size))
    vals = np.array([stat(r[i], u[i]) for i in idx])
    finite = vals[np.isfinite(vals)]
    dropped = int(vals.size - finite.size)
    if dropped:
        warnings.warn(f"bootstrap interval: {dropped} of {n_boot} resamples gave a non-finite statistic (e.g. every "
                      "unrelated change 0) and were left out; the interval covers the finite ones only",
                      RuntimeWarning, stacklevel=2)
    if finite.size == 0:
        return BootstrapCI(float("nan"), float("nan"), dropped=dropped, n_boot=n_boot)
    lo, hi = np.quantile(finite, [(1 - level) / 2, 1 - (1 - level) / 2])
    return BootstrapCI(float(lo), float(hi), dropped=dropped, n_boot=n_boot)


def editing_rates(
    before: Sequence[bool], after_boost: Sequence[bool], after_suppress: Sequence[bool]
) -> dict[str, float | int | None]:
    """Boost: wrong -> right among prompts answered wrongly; suppress: right -> wrong among those answered right."""
    b = np.asarray(before, dtype=bool)
    ab = np.asarray(after_boost, dtype=bool)
    asup = np.asarray(after_suppress, dtype=bool)
    if not (b.shape == ab.shape == asup.shape):
        raise QrncaError("editing needs one before/after-boost/after-suppress prediction per prompt")
    wrong, right = ~b, b
    return {
        "boost": float(np.mean(ab[wrong])) if wrong.any() else None,
        "suppress": float(np.mean(~asup[right])) if right.any() else None,
        "n_wrong": int(wrong.sum()),
        "n_right": int(right.sum()),
    }


def mean_or_none(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if len(xs) else None
