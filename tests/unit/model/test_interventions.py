"""Boost/suppress context managers and per-row batched interventions."""

from __future__ import annotations

import pytest
import torch

from qrnca_lens.errors import ModelError
from qrnca_lens.model.hooks import active_hook_count, capture, hooked
from qrnca_lens.model.interventions import boost, row_factors, scale_rows, suppress
from qrnca_lens.model.access import mlp_hook_name


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


def _padded(model):
    """Two rows as TL's ``to_tokens`` gives them: the short one right-padded with the tokenizer's pad token."""
    pad = model.tokenizer.pad_token_id
    return torch.tensor([[3, 9, 27, 81, 4], [5, 6, 7, pad, pad]])


def test_a_padded_batch_is_intervened_at_each_rows_last_real_token(tiny_model):
    toks = _padded(tiny_model)
    neurons = [(1, 2), (1, 7)]
    clean = _acts(tiny_model, toks, 1)
    mask = (toks != tiny_model.tokenizer.pad_token_id).long()
    for where in (dict(tokens=toks), dict(attention_mask=mask), dict(positions=[4, 2]),
                  dict(positions=torch.tensor([4, 2]))):
        got = _acts(tiny_model, toks, 1, boost(tiny_model, neurons, **where))
        expect = clean.clone()
        expect[0, 4, [2, 7]] *= 2
        expect[1, 2, [2, 7]] *= 2  # the short row's last real token, not the pad at -1
        assert torch.allclose(got, expect), where


def test_a_prompt_names_its_own_target_position(tiny_model):
    from qrnca_lens.data.prompts import Prompt

    toks = torch.tensor([[3, 9, 27, 81, 4]])
    prompt = Prompt("q", "g", 0, "x", (3, 9, 27), (5,))  # a prompt whose target sits at position 2
    clean = _acts(tiny_model, toks, 1)
    got = _acts(tiny_model, toks, 1, suppress(tiny_model, [(1, 3)], positions=prompt))
    expect = clean.clone()
    expect[0, 2, 3] = 0.0
    assert torch.allclose(got, expect)


def test_a_batch_without_positions_is_refused_rather_than_hit_a_pad(tiny_model):
    count = active_hook_count(tiny_model)
    with pytest.raises(ModelError, match="may be right-padded"):
        _acts(tiny_model, _padded(tiny_model), 1, boost(tiny_model, [(1, 2)]))
    with pytest.raises(ModelError, match="3 positions for a batch of 2"):
        _acts(tiny_model, _padded(tiny_model), 1, boost(tiny_model, [(1, 2)], positions=[1, 2, 3]))
    with pytest.raises(ModelError, match="only one of"):
        with boost(tiny_model, [(1, 2)], positions=[1, 2], tokens=_padded(tiny_model)):
            pass
    assert active_hook_count(tiny_model) == count


def test_out_of_range_neurons_are_refused_before_the_forward_naming_the_range(tiny_model):
    count = active_hook_count(tiny_model)
    width, n_layers = tiny_model.cfg.d_mlp, tiny_model.cfg.n_layers
    with pytest.raises(ModelError, match=rf"valid neurons are 0..{width - 1}"):
        with suppress(tiny_model, [(1, 2), (1, width)]):
            pytest.fail("the block ran with an out-of-range neuron")
    with pytest.raises(ModelError, match=rf"valid layers are 0..{n_layers - 1}"):
        with boost(tiny_model, [(n_layers, 0)]):
            pytest.fail("the block ran with an out-of-range layer")
    with pytest.raises(ModelError, match="valid neurons"):
        row_factors(tiny_model, [([(0, -1)], 0.0)])
    assert active_hook_count(tiny_model) == count
