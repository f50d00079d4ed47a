"""Pure metrics against hand-computed values."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from qrnca_lens.errors import QrncaError
from qrnca_lens.evaluation.metrics import bootstrap_ci, editing_rates, pcr, relative_change, relative_change_log


def test_relative_change_by_hand():
    assert relative_change([0.5, 0.2], [1.0, 0.1]).tolist() == [100.0, -50.0]
    got = relative_change_log([math.log(0.5), math.log(0.2)], [math.log(1.0), math.log(0.1)])
    assert np.allclose(got, [100.0, -50.0])
    # log space keeps tiny probabilities exact where exp would underflow
    assert np.allclose(relative_change_log([-2000.0], [-2000.0 + math.log(2)]), [100.0])
    with pytest.raises(QrncaError, match="positive"):
        relative_change([0.0], [0.1])


def test_pcr_by_hand():
    # mean |related| = (10 + 20) / 2 = 15; mean |unrelated| = (1 + 2) / 2 = 1.5
    assert pcr([10.0, -20.0], [1.0, -2.0]) == pytest.approx(10.0)
    assert pcr([0.0], [0.0]) != pcr([0.0], [0.0])  # nan: no change anywhere
    assert pcr([1.0], [0.0]) == float("inf")
    with pytest.raises(QrncaError):
        pcr([], [1.0])


def test_bootstrap_is_seeded_and_brackets_a_constant_ratio():
    rel, unr = [4.0, 8.0, 6.0, 2.0], [2.0, 4.0, 3.0, 1.0]  # every pair has ratio 2, so every resample does
    assert bootstrap_ci(rel, unr, n_boot=200) == pytest.approx((2.0, 2.0))
    a = bootstrap_ci([1.0, 5.0, 2.0, 9.0], [1.0, 1.0, 2.0, 3.0], n_boot=300, seed=3)
    b = bootstrap_ci([1.0, 5.0, 2.0, 9.0], [1.0, 1.0, 2.0, 3.0], n_boot=300, seed=3)
    assert a == b and a[0] <= pcr([1.0, 5.0, 2.0, 9.0], [1.0, 1.0, 2.0, 3.0]) <= a[1]


def test_bootstrap_reports_the_resamples_it_drops():
    """A resample drawing only query 0 (unrelated change 0) has an infinite PCR: counted, warned, not hidden."""
    rel, unr = [5.0, 3.0], [0.0, 2.0]
    draws = np.random.default_rng(7).integers(0, 2, size=(400, 2))  # the queries each resample draws
    only_first = int((draws == 0).all(axis=1).sum())
    assert 0 < only_first < 400
    with pytest.warns(RuntimeWarning, match=f"{only_first} of 400 resamples gave a non-finite statistic"):
        ci = bootstrap_ci(rel, unr, n_boot=400, seed=7)
    assert ci.dropped == only_first and ci.n_boot == 400
    lo, hi = ci  # still a (lo, hi) pair for every caller
    assert np.isfinite(lo) and np.isfinite(hi) and f"{only_first} of 400" in repr(ci)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing dropped, nothing said
        assert bootstrap_ci([4.0, 8.0], [2.0, 4.0], n_boot=50).dropped == 0


def test_editing_rates_by_hand():
    before = [True, False, False, True]
    boost = [True, True, False, True]      # wrong ones (1, 2) -> [True, False]: 1 of 2 fixed
    suppress = [False, False, False, True]  # right ones (0, 3) -> [False, True]: 1 of 2 broken
    r = editing_rates(before, boost, suppress)
    assert r == {"boost": 0.5, "suppress": 0.5, "n_wrong": 2, "n_right": 2}
    assert editing_rates([True], [True], [True])["boost"] is None
