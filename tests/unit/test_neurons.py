"""NeuronSet: the one shape of a neuron set between modules (pure, no model)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from qrnca_lens.errors import QrncaError
from qrnca_lens.neurons import NeuronSet

TRIPLES = [(14, 103, 0.5), (20, 7, 0.25), (14, 9, 0.125), (3, 0, 0.0625)]


def test_conversions_round_trip():
    ns = NeuronSet(TRIPLES)
    assert list(ns) == TRIPLES and len(ns) == 4
    assert NeuronSet.from_list(json.loads(json.dumps(ns.to_list()))) == ns
    assert ns.to_list() == [list(t) for t in TRIPLES]
    t = ns.to_tensor()
    assert t.dtype == torch.long and t.tolist() == [[14, 103], [20, 7], [14, 9], [3, 0]]
    assert NeuronSet.from_tensor(t, ns.scores) == ns
    assert NeuronSet(t).pairs() == ns.pairs() and NeuronSet(t).scores == (1.0,) * 4
    assert NeuronSet(ns) == ns  # a NeuronSet passes through the constructor as it is
    assert pickle.loads(pickle.dumps(ns)) == ns  # executors ship items to other processes
    with pytest.raises(AttributeError, match="immutable"):
        ns._layers = (0,)
    empty = NeuronSet()
    assert len(empty) == 0 and not empty and empty.to_tensor().shape == (0, 2) and empty.to_list() == []


def test_pairs_take_the_default_score_and_mix_with_triples():
    ns = NeuronSet([(0, 3), [2, 1, 0.5]])
    assert list(ns) == [(0, 3, 1.0), (2, 1, 0.5)]
    assert ns.pairs() == [(0, 3), (2, 1)]


def test_slicing_keeps_the_ranking():
    ns = NeuronSet(TRIPLES)
    top = ns[:2]
    assert isinstance(top, NeuronSet) and list(top) == TRIPLES[:2]
    assert list(ns[1:]) == TRIPLES[1:] and list(ns[::-1]) == TRIPLES[::-1]
    assert ns[0] == (14, 103, 0.5) and ns[-1] == (3, 0, 0.0625)
    assert ns[:100] == ns and len(ns[:0]) == 0


def test_by_layer_groups_in_rank_order():
    assert NeuronSet(TRIPLES).by_layer() == {14: [103, 9], 20: [7], 3: [0]}
    assert list(NeuronSet(TRIPLES).by_layer()) == [14, 20, 3]  # layers in order of first appearance


def test_equality_hash_contains_and_repr():
    ns = NeuronSet(TRIPLES)
    assert ns == NeuronSet([tuple(t) for t in TRIPLES]) and ns == TRIPLES and ns == tuple(TRIPLES)
    assert ns != NeuronSet(TRIPLES[::-1])  # the ranking is part of the set
    assert ns != NeuronSet([(14, 103, 0.6), *TRIPLES[1:]]) and ns != TRIPLES[:3] and ns != "x"
    assert hash(ns) == hash(NeuronSet(TRIPLES)) == hash(tuple(TRIPLES))
    assert {ns: 1}[NeuronSet(TRIPLES)] == 1
    assert (20, 7) in ns and [20, 7] in ns and (20, 7, 0.25) in ns
    assert (20, 8) not in ns and (20, 7, 0.3) not in ns and 20 not in ns
    assert repr(ns) == "NeuronSet([(14, 103, 0.5), (20, 7, 0.25), (14, 9, 0.125), ... 1 more])"


def test_to_dataframe():
    pytest.importorskip("pandas")
    df = NeuronSet(TRIPLES).to_dataframe()
    assert list(df.columns) == ["rank", "layer", "neuron", "score"]
    assert df["layer"].tolist() == [14, 20, 14, 3] and df["rank"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("bad, match", [
    ([(0, -1)], r"\(0, -1\): the neuron index -1 is negative"),
    ([(2, 1), (-3, 4, 0.5)], r"entry 1 .*the layer -3 is negative"),
    ([(1.5, 2)], r"the layer 1.5 is not an integer index"),
    ([(1,)], r"expected \(layer, neuron\) or \(layer, neuron, score\), got 1 values"),
    ([(1, 2, 3, 4)], r"got 4 values"),
    ([(1, 2, "high")], r"the score 'high' is not a number"),
    ([5], r"entry 0 5: expected \(layer, neuron\)"),
    ("L1.N2", r"got a str"),
    (torch.tensor([1, 2]), r"shape \[n, 2\].*got \[2\]"),
    (torch.zeros(2, 3, dtype=torch.long), r"shape \[n, 2\].*got \[2, 3\]"),
    (torch.zeros(2, 2), r"integer indices, got dtype torch.float32"),
    (torch.tensor([[0, -2]]), r"the neuron index -2 is negative"),
])
def test_bad_input_names_the_problem(bad, match):
    with pytest.raises(QrncaError, match=match):
        NeuronSet(bad)


def test_from_tensor_needs_one_score_per_row():
    with pytest.raises(QrncaError, match="1 scores for 2 neurons"):
        NeuronSet.from_tensor(torch.tensor([[0, 1], [1, 2]]), [0.5])


def test_integral_floats_and_numpy_ints_are_indices():
    np = pytest.importorskip("numpy")
    assert NeuronSet([(3.0, np.int64(5), np.float32(0.5))]) == [(3, 5, 0.5)]


def test_notebook_display_is_a_compact_table_with_the_count():
    import re

    many = NeuronSet([(i % 3, i, 1.0 / (i + 1)) for i in range(25)])
    html = many._repr_html_()
    assert html.startswith("<div><b>NeuronSet</b>: 25 neurons in 3 layers<table>")
    rows = re.findall(r"<tr><td>(\d+)</td><td>(\d+)</td><td>(\d+)</td><td>([^<]+)</td></tr>", html)
    assert [tuple(int(x) for x in r[:3]) for r in rows] == [(i, i % 3, i) for i in range(10)]  # the first 10
    assert rows[1][3] == "0.5" and "… 15 more" in html
    assert "more" not in NeuronSet(TRIPLES)._repr_html_() and "4 neurons in 3 layers" in NeuronSet(TRIPLES)._repr_html_()
    assert NeuronSet([(0, 1)])._repr_html_().startswith("<div><b>NeuronSet</b>: 1 neuron in 1 layer<table>")
    assert NeuronSet()._repr_html_() == "<div><b>NeuronSet</b>: 0 neurons in 0 layers</div>"
