"""The certified top k (qrnca_lens/lens/exact.py): the first-order bound and exact rescoring."""

from __future__ import annotations

import pytest
import torch

from qrnca_lens.errors import QrncaError
from qrnca_lens.lens import LensConfig, lens_cache, neuron_scores, score_neurons, top_neurons
from qrnca_lens.lens import exact as lens_mod
from test_lens import _prompts, facts, rich  # noqa: F401  (fixtures)


def test_first_order_term_bounds_every_exact_score(rich, tiny_tokenizer, facts):
    prompts = _prompts(facts, tiny_tokenizer, n=2)
    exact = neuron_scores(rich, prompts)
    cache = lens_cache(rich, prompts)
    _, _, ub = lens_mod._first_order(cache, rich.W_out.detach().float())
    assert (exact <= ub + 1e-5).all()  # concavity of log p in the added vector's scale
    assert (ub - exact).max() > 1e-3 * ub.abs().max()  # and the bound is not the score itself


@pytest.mark.parametrize("k", [1, 10, 40])
def test_topk_mode_equals_exact_top_k(rich, tiny_tokenizer, facts, k):
    prompts = _prompts(facts, tiny_tokenizer, n=3)
    exact = top_neurons(rich, prompts, k=k, cfg=LensConfig(mode="exact"))
    fast = top_neurons(rich, prompts, k=k, cfg=LensConfig(mode="topk"))
    for e, f in zip(exact, fast):
        assert f.certified
        assert torch.allclose(e.scores, f.scores, atol=1e-4)
        same = {tuple(x) for x in e.neurons.tolist()} == {tuple(x) for x in f.neurons.tolist()}
        assert same or abs(e.threshold - f.threshold) < 1e-5  # only a tie at the k-th place may differ


def test_a_loose_bound_costs_time_not_exactness_and_the_cap_drops_the_certificate(tiny_gated, tiny_tokenizer, facts,
                                                                                  monkeypatch):
    prompts = _prompts(facts, tiny_tokenizer, n=2)
    exact = top_neurons(tiny_gated, prompts, k=10, cfg=LensConfig(mode="exact"))
    real = lens_mod._first_order

    def loose(cache, W_out):  # still an upper bound, but useless for pruning
        base, base_lse, ub = real(cache, W_out)
        return base, base_lse, ub + 10.0

    monkeypatch.setattr(lens_mod, "_first_order", loose)
    full = top_neurons(tiny_gated, prompts, k=10, cfg=LensConfig(mode="topk"))
    capped = top_neurons(tiny_gated, prompts, k=10, cfg=LensConfig(mode="topk", max_rescore=1))
    n_live = 3 * tiny_gated.cfg.d_mlp
    for e, f, c in zip(exact, full, capped):
        assert f.certified and f.rescored == n_live  # everything had to be rescored
        assert torch.allclose(e.scores, f.scores, atol=1e-5)
        assert not c.certified and c.rescored == 20  # one round of 2k candidates, then the cap


def _plain_top(model, prompts, layers, k):
    """Per prompt: every (layer, neuron) of ``layers`` scored by score_neurons (a direct log-sum-exp each, not the
    series engine of neuron_scores), sorted by a plain Python sort."""
    pairs = [(layer, i) for layer in layers for i in range(model.cfg.d_mlp)]
    scores = score_neurons(model, prompts, torch.tensor(pairs))
    out = []
    for row in scores.tolist():
        ranked = sorted(zip(row, pairs), key=lambda t: -t[0])[:k]
        out.append(([p for _, p in ranked], [s for s, _ in ranked]))
    return out


@pytest.mark.parametrize("k", [1, 7])
def test_a_layer_subset_gives_the_exact_top_k_of_its_own_neurons_with_real_layer_numbers(rich, tiny_tokenizer,
                                                                                         facts, k):
    prompts = _prompts(facts, tiny_tokenizer, n=3)
    L = rich.cfg.n_layers
    everywhere = _plain_top(rich, prompts, range(L), k)
    best = everywhere[0][0][0][0]  # the layer of prompt 0's best neuron, left out so the subset changes the answer
    layers = [x for x in reversed(range(L)) if x != best]  # not sorted: a position in the subset is not its layer
    want = _plain_top(rich, prompts, layers, k)
    assert set(want[0][0]) != set(everywhere[0][0])
    for mode in ("topk", "exact"):
        got = top_neurons(rich, prompts, k=k, cfg=LensConfig(mode=mode), layers=layers)
        for (pairs, scores), g in zip(want, got):
            assert g.certified
            assert torch.allclose(g.scores, torch.tensor(scores), atol=1e-4), mode
            same = {tuple(x) for x in g.neurons.tolist()} == set(pairs)
            assert same or abs(g.threshold - scores[-1]) < 1e-5, mode  # only a tie at the k-th place may differ
            assert {x[0] for x in g.neurons.tolist()} <= set(layers)


def test_layers_none_is_every_layer_and_the_subset_scores_are_the_full_tables_columns(rich, tiny_tokenizer, facts):
    prompts = _prompts(facts, tiny_tokenizer, n=2)
    L, k = rich.cfg.n_layers, 10
    want = _plain_top(rich, prompts, range(L), k)
    for mode in ("topk", "exact"):
        default = top_neurons(rich, prompts, k=k, cfg=LensConfig(mode=mode))
        none = top_neurons(rich, prompts, k=k, cfg=LensConfig(mode=mode), layers=None)
        for (pairs, scores), d, n in zip(want, default, none):
            assert torch.equal(d.neurons, n.neurons) and torch.equal(d.scores, n.scores)
            assert (d.certified, d.rescored, d.threshold) == (n.certified, n.rescored, n.threshold)
            assert torch.allclose(n.scores, torch.tensor(scores), atol=1e-4)
            assert {tuple(x) for x in n.neurons.tolist()} == set(pairs) or abs(n.threshold - scores[-1]) < 1e-5
    full = neuron_scores(rich, prompts)
    assert full.shape[1] == L
    assert torch.equal(neuron_scores(rich, prompts, layers=None), full)
    assert torch.allclose(neuron_scores(rich, prompts, layers=[L - 1, 0, L - 1]), full[:, [L - 1, 0]], atol=1e-6)


def test_bad_layer_subsets_are_refused(tiny_gated, tiny_tokenizer, facts):
    prompts = _prompts(facts, tiny_tokenizer, n=1)
    L, dm = tiny_gated.cfg.n_layers, tiny_gated.cfg.d_mlp
    for bad in ([], [L], [-1]):
        with pytest.raises(QrncaError, match="not layers of this"):
            top_neurons(tiny_gated, prompts, k=1, layers=bad)
        with pytest.raises(QrncaError, match="not layers of this"):
            neuron_scores(tiny_gated, prompts, layers=bad)
    with pytest.raises(QrncaError, match=f"k must be between 1 and {dm}"):
        top_neurons(tiny_gated, prompts, k=dm + 1, layers=[0])
    assert len(top_neurons(tiny_gated, prompts, k=dm, layers=[0])[0].scores) == dm  # all of one layer is allowed
