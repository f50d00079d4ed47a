"""The certified top k (qrnca_lens/lens/exact.py): the first-order bound and exact rescoring."""

from __future__ import annotations

import pytest
import torch

from qrnca_lens.lens import LensConfig, lens_cache, neuron_scores, top_neurons
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
