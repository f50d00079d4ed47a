"""Pure metrics of the evaluation (METHOD section 4): no model, just numbers. Each has a hand-checked test.

- ``relative_change``: (p_after - p_before) / p_before in percent.
- ``pcr``: probability change ratio = mean |related change| / mean |unrelated change| over queries, where a
  query's change is the mean over its prompts.
- ``bootstrap_ci``: a percentile interval of a statistic of paired per-query values, resampling queries.
- ``editing_rates``: boost success = share of wrongly answered prompts made right; suppress success = share of
  rightly answered prompts made wrong.
- Agreement of a ranking with a ground truth (``ground_truth``): ``precision_at_k``, ``recall_at_k``,
  ``spearman`` (on ``rankdata``, ties averaged) and ``false_negative_rate`` (the AtP* warning: truly important
  items a score calls near zero).

Example:
    >>> pcr([10.0, -20.0], [1.0, 2.0])
    10.0
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import QrncaError

__all__ = [
    "relative_change", "relative_change_log", "pcr", "bootstrap_ci", "BootstrapCI", "editing_rates", "mean_or_none",
    "precision_at_k", "recall_at_k", "rankdata", "spearman", "false_negative_rate", "NEAR_ZERO",
]

NEAR_ZERO = 0.01  # a score below this share of the largest |score| counts as "scored near zero"


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


# ---------------------------------------------------------------- agreement with a ground truth


def _hits(ranked: Sequence[Any], relevant: Collection[Any], k: int) -> tuple[int, int]:
    if k < 1:
        raise QrncaError(f"k must be at least 1, got {k}")
    top = list(dict.fromkeys(ranked))[:k]  # a repeated entry is one item, counted once
    want = set(relevant)
    return sum(x in want for x in top), len(top)


def precision_at_k(ranked: Sequence[Any], relevant: Collection[Any], k: int) -> float | None:
    """Share of the first ``k`` distinct items of ``ranked`` that are ``relevant``.

    The denominator is what ``ranked`` offers, ``min(k, len)``: a ranking cut shorter than ``k`` (a method
    given QRNCA's count) is judged on the items it named, not charged for ones it never named.

    Args:
        ranked: items, best first (hashable: ``(layer, neuron)`` pairs).
        relevant: the true top items.
        k: how many of ``ranked`` count.

    Returns:
        The share, or None when ``ranked`` is empty.

    Example:
        >>> precision_at_k(["a", "b", "c"], {"a", "c", "d"}, 2)
        0.5
    """
    hits, n = _hits(ranked, relevant, k)
    return hits / n if n else None


def recall_at_k(ranked: Sequence[Any], relevant: Collection[Any], k: int) -> float | None:
    """Share of the ``relevant`` items found among the first ``k`` distinct items of ``ranked``.

    Example:
        >>> recall_at_k(["a", "b", "c"], {"a", "c", "d", "e"}, 3)
        0.5
    """
    hits, _ = _hits(ranked, relevant, k)
    n = len(set(relevant))
    return hits / n if n else None


def rankdata(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-based ranks, ascending, tied values sharing the mean of their ranks (scipy's ``"average"``).

    Example:
        >>> rankdata([10.0, 20.0, 10.0, 5.0]).tolist()
        [2.5, 4.0, 2.5, 1.0]
    """
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise QrncaError(f"rankdata takes one flat sequence, got shape {a.shape}")
    order = np.argsort(a, kind="stable")
    ranks = np.empty(a.size, dtype=np.float64)
    s = a[order]
    i = 0
    while i < a.size:  # each run of equal values gets the mean of the positions it spans
        j = i
        while j + 1 < a.size and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's correlation of the average ranks (``rankdata``).

    Returns nan when it is undefined: fewer than two values, or either side constant (all tied).

    Example:
        >>> spearman([1.0, 2.0, 3.0], [10.0, 30.0, 20.0])
        0.5
    """
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise QrncaError(f"spearman needs two flat sequences of one length, got shapes {a.shape} and {b.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise QrncaError("spearman needs finite values; give unranked items a finite score (e.g. 0)")
    if a.size < 2:
        return float("nan")
    ra, rb = rankdata(a) - (a.size + 1) / 2, rankdata(b) - (a.size + 1) / 2
    den = float(np.sqrt(np.sum(ra * ra) * np.sum(rb * rb)))
    return float(np.sum(ra * rb) / den) if den > 0 else float("nan")


def false_negative_rate(scores: Mapping[Any, float], relevant: Collection[Any], *, rel: float = NEAR_ZERO) -> float | None:
    """Share of the ``relevant`` (truly important) items a locator scored near zero: the AtP* warning.

    Near zero: absent from ``scores`` (not ranked at all), or ``|score| < rel * max |score|`` with the max over
    every score given; when every score is 0 (a locator without scores, e.g. random), all count as near zero.

    Args:
        scores: item -> the locator's score, for every item it ranked.
        relevant: the truly important items.
        rel: the near-zero threshold, relative to the largest |score|.

    Returns:
        The share, or None when ``relevant`` is empty.

    Example:
        >>> false_negative_rate({"a": 1.0, "b": 0.001, "c": 0.5}, ["a", "b", "d"])
        0.6666666666666666
    """
    want = list(dict.fromkeys(relevant))
    if not want:
        return None
    top = max((abs(float(v)) for v in scores.values()), default=0.0)

    def near_zero(item: Any) -> bool:
        if item not in scores or top == 0.0:
            return True
        return abs(float(scores[item])) < rel * top

    return sum(near_zero(x) for x in want) / len(want)
