"""QR-neuron selection (METHOD section 3): hand-computed examples for every step, and a plain-Python oracle.

The hand examples write out the expected numbers; the comments show the arithmetic. The oracle follows
METHOD section 3 word for word over dicts and lists (no torch ops) and must agree with ``select``.
"""

from __future__ import annotations

import ast
import doctest
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

import qrnca_lens.qrnca.selection as selection
from qrnca_lens.errors import QrncaError
from qrnca_lens.qrnca.selection import (
    Cluster,
    Selection,
    SelectionConfig,
    cluster_counts,
    common_neurons,
    drop_neurons,
    inverse_cluster_attribution,
    naica_scores,
    prompt_clusters,
    query_cluster,
    select,
    top_v,
)

# ---------------------------------------------------------------- example A: 2 prompts x 2 layers x 3 neurons
#
# prompt 0: max 10 -> threshold 2:   (0,0)=10, (0,1)=3, (1,1)=2.5 pass
# prompt 1: max 5  -> threshold 1:   (0,1)=4, (1,0)=5, (1,2)=1.5 pass; (0,0)=1 does NOT (strict >)
# union raw: (0,0)=10, (0,1)=3+4=7, (1,0)=5, (1,1)=2.5, (1,2)=1.5;  Z = 26
# sum: s = [[11, 7, 1], [3, 3, 1.5]], max 11 -> threshold 2.2: (0,0)=11, (0,1)=7, (1,0)=3, (1,1)=3
A = torch.tensor([
    [[10.0, 3.0, 1.0], [-2.0, 2.5, 0.0]],
    [[1.0, 4.0, 0.0], [5.0, 0.5, 1.5]],
])
A_UNION_IDX = [[0, 0], [0, 1], [1, 0], [1, 1], [1, 2]]
A_UNION_RAW = [10.0, 7.0, 5.0, 2.5, 1.5]
A_SUM_IDX = [[0, 0], [0, 1], [1, 0], [1, 1]]
A_SUM_RAW = [11.0, 7.0, 3.0, 3.0]


def _cluster(rows: dict[tuple[int, int], float], shape: tuple[int, int]) -> Cluster:
    keys = sorted(rows)
    return Cluster(torch.tensor(keys, dtype=torch.int64).reshape(-1, 2),
                   torch.tensor([rows[k] for k in keys], dtype=torch.float32), shape)


# ---------------------------------------------------------------- module hygiene


def test_module_imports_no_model_code():
    tree = ast.parse(Path(selection.__file__).read_text())
    allowed = {"torch", "jaxtyping", "numpy"} | set(sys.stdlib_module_names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] in allowed for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # errors and the config base: stdlib only, no model code either
                assert node.module in ("errors", "config")
            else:
                assert node.module.split(".")[0] in allowed


def test_docstring_example_runs():
    assert doctest.testmod(selection, optionflags=doctest.ELLIPSIS).failed == 0


# ---------------------------------------------------------------- SelectionConfig


def test_config_defaults_and_round_trip():
    cfg = SelectionConfig()
    assert (cfg.t, cfg.u, cfg.v, cfg.cluster_mode, cfg.use_ica, cfg.remove_common) == (0.2, 0.3, 20, "union", True, True)
    other = SelectionConfig(t=0.0, u=1.0, v=3, cluster_mode="sum", use_ica=False, remove_common=False)
    for c in (cfg, other):
        assert SelectionConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert other.to_dict() == {"t": 0.0, "u": 1.0, "v": 3, "cluster_mode": "sum", "use_ica": False,
                               "remove_common": False}


@pytest.mark.parametrize("kw, pattern", [
    ({"t": 1.0}, r"^t .*\[0, 1\).*1\.0"),
    ({"t": -0.1}, r"^t .*\[0, 1\).*-0\.1"),
    ({"t": float("nan")}, r"^t .*nan"),
    ({"u": 0.0}, r"^u .*\(0, 1\].*0\.0"),
    ({"u": 1.5}, r"^u .*\(0, 1\].*1\.5"),
    ({"v": 0}, r"^v .*>= 1.*0"),
    ({"cluster_mode": "mean"}, r"cluster_mode.*'union'.*'sum'.*'mean'"),
])
def test_config_rejects_bad_values(kw, pattern):
    with pytest.raises(QrncaError, match=pattern):
        SelectionConfig(**kw)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(QrncaError, match="unknown SelectionConfig keys.*'w'"):
        SelectionConfig.from_dict({"t": 0.2, "w": 1})


# ---------------------------------------------------------------- Cluster


def test_cluster_na_dense_len_and_round_trip():
    c = _cluster({(0, 0): 10.0, (0, 1): 7.0, (1, 0): 5.0, (1, 1): 2.5, (1, 2): 1.5}, (2, 3))
    assert len(c) == 5
    assert c.na().tolist() == pytest.approx([10 / 26, 7 / 26, 5 / 26, 2.5 / 26, 1.5 / 26])
    assert float(c.na().sum()) == pytest.approx(1.0, abs=1e-6)
    assert c.dense().tolist() == [[10.0, 7.0, 0.0], [5.0, 2.5, 1.5]]
    d = json.loads(json.dumps(c.to_dict()))
    assert d == {"indices": A_UNION_IDX, "raw": A_UNION_RAW, "shape": [2, 3]}
    back = Cluster.from_dict(d)
    assert back == c and back.shape == (2, 3)
    assert back.indices.dtype == torch.int64 and back.raw.dtype == torch.float32


def test_cluster_round_trip_is_exact_for_float32():
    raw = torch.tensor([0.1, 1 / 3, 2.718281828], dtype=torch.float32)
    c = Cluster(torch.tensor([[0, 1], [2, 0], [2, 3]]), raw, (3, 4))
    assert torch.equal(Cluster.from_dict(json.loads(json.dumps(c.to_dict()))).raw, raw)


def test_empty_cluster():
    c = Cluster.empty((2, 3))
    assert len(c) == 0 and c.na().shape == (0,) and c.indices.shape == (0, 2)
    assert torch.equal(c.dense(), torch.zeros(2, 3))
    assert Cluster.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_cluster_normalises_dtypes():
    c = Cluster(torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([2.0], dtype=torch.float64), (1, 2))
    assert c.indices.dtype == torch.int64 and c.raw.dtype == torch.float32


@pytest.mark.parametrize("idx, raw, shape, pattern", [
    ([[0, 2], [0, 1]], [1.0, 1.0], (1, 3), "sorted"),
    ([[0, 1], [0, 1]], [1.0, 1.0], (1, 3), "unique"),
    ([[0, 3]], [1.0], (1, 3), "outside"),
    ([[1, 0]], [1.0], (1, 3), "outside"),
    ([[0, 0]], [float("nan")], (1, 3), "NaN"),
])
def test_cluster_validation(idx, raw, shape, pattern):
    with pytest.raises(QrncaError, match=pattern):
        Cluster(torch.tensor(idx), torch.tensor(raw), shape)


def test_cluster_length_mismatch():
    # Under the test suite's jaxtyping hook the shared "n" axis fails first (a TypeError); without it, our check.
    with pytest.raises((QrncaError, TypeError), match="2 indices but 1 raw|'n'"):
        Cluster(torch.tensor([[0, 0], [0, 1]]), torch.tensor([1.0]), (1, 3))


def test_na_rejects_nonpositive_total():
    with pytest.raises(QrncaError, match="<= 0"):
        _cluster({(0, 0): 1.0, (0, 1): -1.0}, (1, 2)).na()


def test_cluster_from_dict_missing_keys():
    with pytest.raises(QrncaError, match="lacks keys.*'shape'"):
        Cluster.from_dict({"indices": [], "raw": []})


# ---------------------------------------------------------------- step 1: clusters


def test_prompt_clusters_by_hand():
    mask = prompt_clusters(A, 0.2)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [
        [[True, True, False], [False, True, False]],
        [[False, True, False], [True, False, True]],  # (0,0) = 1 equals the threshold 0.2 * 5: out
    ]


def test_query_cluster_union_by_hand():
    c = query_cluster(A, t=0.2, mode="union")
    assert c.indices.tolist() == A_UNION_IDX
    assert c.raw.tolist() == A_UNION_RAW
    assert c.shape == (2, 3)


def test_query_cluster_sum_by_hand():
    c = query_cluster(A, t=0.2, mode="sum")
    assert c.indices.tolist() == A_SUM_IDX
    assert c.raw.tolist() == A_SUM_RAW


def test_union_and_sum_differ():
    # Union keeps (1,2) (above 1 in prompt 1) that the sum (1.5 < 2.2) drops, and (0,0) scores 10, not 11:
    # prompt 1's 1.0 at (0,0) is under its own threshold.
    union, summed = query_cluster(A, mode="union"), query_cluster(A, mode="sum")
    assert union != summed
    assert {tuple(r) for r in union.indices.tolist()} - {tuple(r) for r in summed.indices.tolist()} == {(1, 2)}
    assert (float(union.raw[0]), float(summed.raw[0])) == (10.0, 11.0)


def test_nonpositive_prompt_contributes_nothing():
    negative = torch.tensor([[[-1.0, -0.5, -3.0], [-2.0, -0.1, -4.0]]])
    zero = torch.zeros(1, 2, 3)
    with_neg = torch.cat([A, negative, zero])
    mask = prompt_clusters(with_neg, 0.2)
    assert not mask[2].any() and not mask[3].any()
    assert query_cluster(with_neg, mode="union") == query_cluster(A, mode="union")
    # t = 0 makes the threshold 0 * max = 0: still nothing from a prompt whose max is <= 0.
    assert not prompt_clusters(negative, 0.0).any()
    for mode in ("union", "sum"):
        empty = query_cluster(torch.cat([negative, zero]), mode=mode)
        assert len(empty) == 0 and empty.shape == (2, 3) and empty.na().shape == (0,)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("mode", ["union", "sum"])
def test_nonfinite_scores_raise(bad, mode):
    scores = A.clone()
    scores[1, 0, 2] = bad
    with pytest.raises(QrncaError, match="NaN.*float32"):
        query_cluster(scores, mode=mode)
    with pytest.raises(QrncaError, match="NaN"):
        prompt_clusters(scores, 0.2)


def test_zero_prompts_raise():
    with pytest.raises(QrncaError, match="no prompts"):
        query_cluster(torch.zeros(0, 2, 3))


def test_query_cluster_rejects_bad_settings():
    with pytest.raises(QrncaError, match="cluster_mode"):
        query_cluster(A, mode="paper")
    with pytest.raises(QrncaError, match=r"^t "):
        query_cluster(A, t=1.0)


# ---------------------------------------------------------------- steps 3-4: counts, ica, common


def test_cluster_counts_by_hand():
    counts = cluster_counts([query_cluster(A, mode="union"), query_cluster(A, mode="sum")])
    assert counts.dtype == torch.int64
    assert counts.tolist() == [[2, 2, 0], [2, 2, 1]]


def test_cluster_counts_errors():
    with pytest.raises(QrncaError, match="no clusters"):
        cluster_counts([])
    with pytest.raises(QrncaError, match="different models"):
        cluster_counts([Cluster.empty((2, 3)), Cluster.empty((2, 4))])


def test_ica_of_four_clusters_by_hand():
    clusters = [_cluster({(0, 0): 1.0, (0, 1): 1.0}, (1, 4)), _cluster({(0, 0): 1.0, (0, 2): 1.0}, (1, 4)),
                _cluster({(0, 0): 1.0}, (1, 4)), _cluster({(0, 0): 2.0, (0, 1): 1.0}, (1, 4))]
    counts = cluster_counts(clusters)
    assert counts.tolist() == [[4, 2, 1, 0]]
    ica = inverse_cluster_attribution(counts, 4)
    assert ica.tolist()[0] == pytest.approx([math.log(4 / 5), math.log(4 / 3), math.log(4 / 2), math.log(4 / 1)])


def test_ica_errors():
    with pytest.raises(QrncaError, match="n_clusters"):
        inverse_cluster_attribution(torch.zeros(1, 2, dtype=torch.int64), 0)
    with pytest.raises(QrncaError, match="different collection"):
        inverse_cluster_attribution(torch.tensor([[3, 0]]), 2)


def test_common_neurons_strict_boundary():
    counts = torch.tensor([[3, 4, 0], [10, 2, 3]])
    # u * N = 0.3 * 10 = 3: a count of exactly 3 is NOT common, 4 and 10 are.
    assert common_neurons(counts, 10, 0.3).tolist() == [[0, 1], [1, 0]]
    # 0.57 * 100 is 56.99999999999999 in floats; the boundary is still the decimal 57.
    assert common_neurons(torch.tensor([[57, 58]]), 100, 0.57).tolist() == [[0, 1]]
    # u = 1: no count can exceed N.
    none = common_neurons(torch.tensor([[10, 9]]), 10, 1.0)
    assert none.shape == (0, 2) and none.dtype == torch.int64
    with pytest.raises(QrncaError, match=r"^u "):
        common_neurons(counts, 10, 0.0)


# ---------------------------------------------------------------- step 5: naica, top v, drop


def test_naica_scores_by_hand():
    c = query_cluster(A)  # raw 10, 7, 5, 2.5, 1.5; Z = 26
    ica = torch.tensor([[1.0, 0.5, 0.0], [2.0, -1.0, 0.25]])
    got = naica_scores(c, ica)
    assert got.tolist() == pytest.approx([10 / 26, 3.5 / 26, 10 / 26, -2.5 / 26, 0.375 / 26])
    assert naica_scores(c, None).tolist() == pytest.approx([10 / 26, 7 / 26, 5 / 26, 2.5 / 26, 1.5 / 26])
    with pytest.raises(QrncaError, match="shape"):
        naica_scores(c, torch.zeros(3, 3))


def test_top_v_filter_order_and_ties():
    c = query_cluster(A)  # (0,0), (0,1), (1,0), (1,1), (1,2)
    scores = naica_scores(c, torch.tensor([[1.0, 0.5, 0.0], [2.0, -1.0, 0.25]]))
    # (0,0) and (1,0) tie exactly at 10/26 (2 * float32(5/26) == float32(10/26)); (1,1) < 0 is dropped.
    assert float(scores[0]) == float(scores[2])
    idx, val = top_v(c, scores, 10)
    assert idx.tolist() == [[0, 0], [1, 0], [0, 1], [1, 2]]
    assert val.tolist() == pytest.approx([10 / 26, 10 / 26, 3.5 / 26, 0.375 / 26])
    idx2, val2 = top_v(c, scores, 2)
    assert idx2.tolist() == [[0, 0], [1, 0]] and val2.shape == (2,)


def test_top_v_zero_is_not_positive_and_ties_are_deterministic():
    c = _cluster({(0, 0): 1.0, (0, 2): 1.0, (1, 0): 1.0, (1, 1): 1.0, (1, 2): 1.0}, (2, 3))
    scores = torch.tensor([0.5, 0.5, -0.1, 0.5, 0.0])
    runs = [top_v(c, scores, 2) for _ in range(3)]
    for idx, val in runs:
        assert idx.tolist() == [[0, 0], [0, 2]] and val.tolist() == [0.5, 0.5]
    idx, val = top_v(c, scores, 20)
    assert idx.tolist() == [[0, 0], [0, 2], [1, 1]]  # 0.0 and -0.1 are not > 0
    empty_idx, empty_val = top_v(c, torch.tensor([0.0, -1.0, 0.0, -2.0, 0.0]), 5)
    assert empty_idx.shape == (0, 2) and empty_val.shape == (0,)
    with pytest.raises(QrncaError, match="5 neurons"):
        top_v(c, torch.ones(4), 2)


def test_drop_neurons_by_hand():
    idx = torch.tensor([[0, 2], [1, 0], [0, 0]])
    val = torch.tensor([0.3, 0.2, 0.1])
    i, v = drop_neurons(idx, val, torch.tensor([[0, 0], [2, 5]]))
    assert i.tolist() == [[0, 2], [1, 0]] and v.tolist() == pytest.approx([0.3, 0.2])
    i, v = drop_neurons(idx, val, torch.zeros(0, 2, dtype=torch.int64))
    assert torch.equal(i, idx) and torch.equal(v, val)
    i, v = drop_neurons(idx, val, idx)
    assert i.shape == (0, 2) and v.shape == (0,)


# ---------------------------------------------------------------- select on a hand collection
#
# shape (1, 6), N = 4, u = 0.3 -> common if count > 1.2
#   a: (0,0)=3 (0,1)=1   -> na .75 .25
#   b: (0,0)=1 (0,2)=1   -> na .5 .5
#   c: (0,1)=2 (0,3)=6   -> na .25 .75
#   d: (0,4)=5           -> na 1
# counts [2, 2, 1, 1, 1, 0] -> common (0,0), (0,1); ica: count 2 -> ln(4/3), count 1 -> ln(4/2)
L43, L2 = math.log(4 / 3), math.log(2)


@pytest.fixture
def hand_collection():
    s = (1, 6)
    return {"a": _cluster({(0, 0): 3.0, (0, 1): 1.0}, s), "b": _cluster({(0, 0): 1.0, (0, 2): 1.0}, s),
            "c": _cluster({(0, 1): 2.0, (0, 3): 6.0}, s), "d": _cluster({(0, 4): 5.0}, s)}


def _approx_lists(got, expected):
    assert set(got) == set(expected)
    for q in expected:
        assert [r[:2] for r in got[q]] == [r[:2] for r in expected[q]], q
        assert [r[2] for r in got[q]] == pytest.approx([r[2] for r in expected[q]], abs=1e-6), q


def test_select_removes_commons_and_can_empty_a_query(hand_collection):
    sel = select(hand_collection)
    assert isinstance(sel, Selection) and sel.n_clusters == 4 and sel.config == SelectionConfig()
    assert sel.counts.tolist() == [[2, 2, 1, 1, 1, 0]]
    assert sel.common.tolist() == [[0, 0], [0, 1]]
    # a's top v is (0,0), (0,1): both common, so a ends with no QR neuron.
    _approx_lists(sel.qr_lists(), {"a": [], "b": [[0, 2, 0.5 * L2]], "c": [[0, 3, 0.75 * L2]], "d": [[0, 4, L2]]})
    assert sel.qr["a"][0].shape == (0, 2) and sel.qr["a"][1].shape == (0,)
    assert sel.mean_qr_count() == 0.75
    lists = sel.qr_lists()
    assert lists["a"] == [] and json.loads(json.dumps(lists)) == lists
    assert all(type(a) is int and type(b) is int and type(x) is float for rows in lists.values() for a, b, x in rows)


def test_select_keeping_commons(hand_collection):
    sel = select(hand_collection, SelectionConfig(remove_common=False))
    assert sel.common.tolist() == [[0, 0], [0, 1]]  # still reported: a property of the collection
    _approx_lists(sel.qr_lists(), {
        "a": [[0, 0, 0.75 * L43], [0, 1, 0.25 * L43]],
        "b": [[0, 2, 0.5 * L2], [0, 0, 0.5 * L43]],
        "c": [[0, 3, 0.75 * L2], [0, 1, 0.25 * L43]],
        "d": [[0, 4, L2]],
    })
    assert sel.mean_qr_count() == 7 / 4


def test_select_without_ica(hand_collection):
    sel = select(hand_collection, SelectionConfig(use_ica=False))
    _approx_lists(sel.qr_lists(), {"a": [], "b": [[0, 2, 0.5]], "c": [[0, 3, 0.75]], "d": [[0, 4, 1.0]]})


def test_select_takes_top_v_before_dropping_commons(hand_collection):
    # v = 1. With ICA, b's best is (0,2) (rarer). Without ICA b ties .5/.5, (0,0) wins the tie, and is then
    # removed as common: b ends empty; dropping commons first would have given (0,2).
    with_ica = select(hand_collection, SelectionConfig(v=1)).qr_lists()
    no_ica = select(hand_collection, SelectionConfig(v=1, use_ica=False)).qr_lists()
    _approx_lists(with_ica, {"a": [], "b": [[0, 2, 0.5 * L2]], "c": [[0, 3, 0.75 * L2]], "d": [[0, 4, L2]]})
    _approx_lists(no_ica, {"a": [], "b": [], "c": [[0, 3, 0.75]], "d": [[0, 4, 1.0]]})
    keep = select(hand_collection, SelectionConfig(v=1, use_ica=False, remove_common=False)).qr_lists()
    _approx_lists(keep, {"a": [[0, 0, 0.75]], "b": [[0, 0, 0.5]], "c": [[0, 3, 0.75]], "d": [[0, 4, 1.0]]})


def test_select_drops_nonpositive_ica():
    # N = 3: x holds all of (0,0),(0,1),(0,2); y (0,0),(0,1); z (0,0). counts [3, 2, 1]:
    # ica = ln(3/4) < 0, ln(3/3) = 0, ln(3/2) > 0. Only positive naica survives, commons or not.
    s = (1, 3)
    coll = {"x": _cluster({(0, 0): 1.0, (0, 1): 1.0, (0, 2): 2.0}, s), "y": _cluster({(0, 0): 1.0, (0, 1): 1.0}, s),
            "z": _cluster({(0, 0): 1.0}, s)}
    sel = select(coll, SelectionConfig(u=1.0, remove_common=False))
    assert sel.common.shape == (0, 2)
    _approx_lists(sel.qr_lists(), {"x": [[0, 2, 0.5 * math.log(1.5)]], "y": [], "z": []})


def test_select_is_deterministic_and_order_free(hand_collection):
    first = select(hand_collection).qr_lists()
    again = select(dict(reversed(list(hand_collection.items())))).qr_lists()
    assert first == again and list(again) == ["d", "c", "b", "a"]


def test_select_counts_an_empty_cluster_towards_n(hand_collection):
    sel = select({**hand_collection, "e": Cluster.empty((1, 6))})
    assert sel.n_clusters == 5 and sel.qr_lists()["e"] == []


def test_select_errors(hand_collection):
    with pytest.raises(QrncaError, match="empty"):
        select({})
    with pytest.raises(QrncaError, match="different models"):
        select({**hand_collection, "e": Cluster.empty((2, 6))})


# ---------------------------------------------------------------- the plain-Python oracle


def _oracle(scores: dict[str, list], t: float, u: float, v: int, mode: str, use_ica: bool, remove_common: bool):
    """METHOD section 3 literally, over lists and dicts. Returns ({query: [((l, i), naica), ...]}, common)."""
    raws: dict[str, dict[tuple[int, int], float]] = {}
    for q, prompts in scores.items():
        raw: dict[tuple[int, int], float] = {}
        if mode == "union":
            for p in prompts:
                m = max(x for row in p for x in row)
                if m <= 0:
                    continue
                for l, row in enumerate(p):
                    for i, x in enumerate(row):
                        if x > t * m:
                            raw[(l, i)] = raw.get((l, i), 0.0) + x
        else:
            s: dict[tuple[int, int], float] = {}
            for p in prompts:
                for l, row in enumerate(p):
                    for i, x in enumerate(row):
                        s[(l, i)] = s.get((l, i), 0.0) + x
            m = max(s.values())
            if m > 0:
                raw = {n: x for n, x in s.items() if x > t * m}
        raws[q] = raw
    n_clusters = len(raws)
    count: dict[tuple[int, int], int] = {}
    for raw in raws.values():
        for n in raw:
            count[n] = count.get(n, 0) + 1
    common = {n for n, c in count.items() if c > u * n_clusters}
    out = {}
    for q, raw in raws.items():
        z = sum(raw.values())
        naica = {}
        for n, r in raw.items():
            val = r / z * (math.log(n_clusters / (count[n] + 1)) if use_ica else 1.0)
            if val > 0:
                naica[n] = val
        top = sorted(naica.items(), key=lambda kv: (-kv[1], kv[0]))[:v]
        out[q] = [(n, x) for n, x in top if not (remove_common and n in common)]
    return out, common


def _random_collection(seed: int) -> dict[str, torch.Tensor]:
    """6 queries x 3 prompts on a 3 x 10 model: heavy-tailed scores, a few neurons hot in most queries,
    one query with an all-negative prompt and one with only negative prompts."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    out = {}
    for k in range(6):
        s = torch.randn(3, 3, 10, generator=g) * torch.exp(1.2 * torch.randn(3, 3, 10, generator=g))
        for layer, neuron in rng.sample([(0, 1), (1, 4), (2, 7), (2, 2)], k=rng.randint(1, 3)):
            s[:, layer, neuron] += 2.0 + 3.0 * rng.random()
        out[f"q{k}"] = s
    out["q1"][rng.randrange(3)] = -out["q1"][0].abs() - 0.01
    out["q4"] = -out["q4"].abs()
    return out


@pytest.mark.parametrize("mode", ["union", "sum"])
@pytest.mark.parametrize("use_ica, remove_common", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("v", [3, 20])
def test_select_matches_the_oracle(mode, use_ica, remove_common, v):
    scores = _random_collection(seed=7)
    cfg = SelectionConfig(cluster_mode=mode, v=v, use_ica=use_ica, remove_common=remove_common)
    clusters = {q: query_cluster(s, cfg.t, cfg.cluster_mode) for q, s in scores.items()}
    sel = select(clusters, cfg)
    expected, common = _oracle({q: s.tolist() for q, s in scores.items()}, cfg.t, cfg.u, cfg.v, mode, use_ica,
                               remove_common)
    assert {tuple(r) for r in sel.common.tolist()} == common
    got = sel.qr_lists()
    assert list(got) == list(expected)
    for q in expected:
        assert [tuple(r[:2]) for r in got[q]] == [n for n, _ in expected[q]], q
        assert [r[2] for r in got[q]] == pytest.approx([x for _, x in expected[q]], abs=1e-6), q
    # The collection is not trivial: commons exist, some queries keep neurons, one has none at all.
    assert common and any(got.values()) and len(clusters["q4"]) == 0
    if remove_common:
        assert not any(tuple(r[:2]) in common for rows in got.values() for r in rows)
