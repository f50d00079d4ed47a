"""Boost/suppress context managers and per-row batched interventions."""

from __future__ import annotations

import torch

from qrnca_lens.hooks import active_hook_count, capture, hooked
from qrnca_lens.interventions import boost, row_factors, scale_rows, suppress
from qrnca_lens.models import mlp_hook_name


def _acts(model, toks, layer, ctx=None):
    store = {}
    name = mlp_hook_name(model, layer)
    with torch.no_grad():
        if ctx is None:
            with hooked(model, fwd=[(name, capture(store, name))]):
                model(toks)
        else:
            with ctx, hooked(model, fwd=[(name, capture(store, name))]):
                model(toks)
    return store[name]


def test_boost_and_suppress_at_the_last_position(tiny_model):
    toks = torch.tensor([[3, 9, 27, 81, 4]])
    neurons = [(1, 2), (1, 7), (2, 0)]
    count = active_hook_count(tiny_model)
    clean = _acts(tiny_model, toks, 1)
    boosted = _acts(tiny_model, toks, 1, boost(tiny_model, neurons))
    assert torch.allclose(boosted[0, -1, [2, 7]], 2 * clean[0, -1, [2, 7]])
    assert torch.equal(boosted[0, :-1], clean[0, :-1])
    gone = _acts(tiny_model, toks, 1, suppress(tiny_model, neurons, every_position=True))
    assert torch.all(gone[0, :, [2, 7]] == 0)
    assert active_hook_count(tiny_model) == count


def test_rows_carry_their_own_neurons_and_positions(tiny_model):
    toks = torch.tensor([[3, 9, 27, 81, 4], [5, 6, 7, 8, 9]])
    rows = [([(1, 2)], 2.0), ([(1, 5)], 0.0)]
    clean = _acts(tiny_model, toks, 1)
    positions = torch.tensor([4, 2])
    got = _acts(tiny_model, toks, 1, scale_rows(tiny_model, row_factors(tiny_model, rows), positions))
    expect = clean.clone()
    expect[0, 4, 2] *= 2.0
    expect[1, 2, 5] = 0.0
    assert torch.allclose(got, expect)


def test_untouched_rows_stay_clean(tiny_model):
    toks = torch.tensor([[3, 9, 27, 81, 4], [5, 6, 7, 8, 9]])
    with torch.no_grad():
        clean = tiny_model(toks)
        with scale_rows(tiny_model, row_factors(tiny_model, [None, ([(0, 1)], 0.0)]), torch.tensor([4, 4])):
            mixed = tiny_model(toks)
    assert torch.equal(mixed[0], clean[0])
    assert not torch.equal(mixed[1], clean[1])
