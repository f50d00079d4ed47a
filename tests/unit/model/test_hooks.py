"""The one hook door: hooks enter and always leave, even when the call fails."""

from __future__ import annotations

import pytest
import torch

from qrnca_lens.errors import ModelError
from qrnca_lens.model.hooks import active_hook_count, capture, hooked, set_neurons
from qrnca_lens.model.access import mlp_hook_name


def _tokens(model):
    return torch.tensor([[5, 17, 42, 99, 7, 64]])


def test_hooks_leave_after_a_failing_call_and_outputs_are_unchanged(tiny_model):
    toks = _tokens(tiny_model)
    with torch.no_grad():
        before = tiny_model(toks)
    count = active_hook_count(tiny_model)
    name = mlp_hook_name(tiny_model, 1)

    def broken(act, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with hooked(tiny_model, fwd=[(name, set_neurons(torch.tensor([0, 3]), factor=0.0)), (name, broken)]):
            tiny_model(toks)
    assert active_hook_count(tiny_model) == count
    with torch.no_grad():
        after = tiny_model(toks)
    assert torch.equal(before, after)


def test_hooks_leave_after_an_exception_in_the_body(tiny_model):
    count = active_hook_count(tiny_model)
    with pytest.raises(KeyError):
        with hooked(tiny_model, fwd=[(mlp_hook_name(tiny_model, 0), capture({}))]):
            assert active_hook_count(tiny_model) == count + 1
            raise KeyError("inside")
    assert active_hook_count(tiny_model) == count


def test_unknown_hook_name_is_refused_before_anything_is_added(tiny_model):
    count = active_hook_count(tiny_model)
    with pytest.raises(ModelError, match="no hook 'blocks.0.mlp.hook_nonexistent'"):
        with hooked(tiny_model, fwd=[(mlp_hook_name(tiny_model, 0), capture({})), ("blocks.0.mlp.hook_nonexistent", capture({}))]):
            pass
    assert active_hook_count(tiny_model) == count


def test_callers_own_hooks_survive(tiny_model):
    """A hook the user attached outside our door is still there afterwards."""
    name = mlp_hook_name(tiny_model, 0)
    seen = []
    with tiny_model.hooks(fwd_hooks=[(name, lambda a, hook: seen.append(1))]):
        count = active_hook_count(tiny_model)
        with hooked(tiny_model, fwd=[(name, capture({}))]):
            pass
        assert active_hook_count(tiny_model) == count
        with torch.no_grad():
            tiny_model(_tokens(tiny_model))
    assert seen == [1]


def test_exit_resets_the_touched_points_dropping_hooks_added_there_inside_the_block(tiny_model):
    """What ``hooked`` promises on exit: the points it was given get back the hooks they had on entry, so a
    hook the caller adds there inside the block goes too; a hook added inside the block elsewhere stays."""
    touched, other = mlp_hook_name(tiny_model, 0), mlp_hook_name(tiny_model, 1)
    count = active_hook_count(tiny_model)
    fired = []
    try:
        with hooked(tiny_model, fwd=[(touched, capture({}))]):
            tiny_model.add_hook(touched, lambda act, hook: fired.append("touched"))
            tiny_model.add_hook(other, lambda act, hook: fired.append("other"))
            assert active_hook_count(tiny_model) == count + 3
        assert active_hook_count(tiny_model) == count + 1
        with torch.no_grad():
            tiny_model(_tokens(tiny_model))
        assert fired == ["other"]
    finally:
        tiny_model.reset_hooks()  # the hook left on `other` is the caller's (this test's) to remove
    assert active_hook_count(tiny_model) == count


def test_capture_records_the_activation(tiny_model):
    store = {}
    name = mlp_hook_name(tiny_model, 1)
    with torch.no_grad(), hooked(tiny_model, fwd=[(name, capture(store, position=-1))]):
        tiny_model(_tokens(tiny_model))
    (value,) = store.values()
    assert value.shape == (1, tiny_model.cfg.d_mlp)


def test_set_neurons_scales_only_the_chosen_neurons_at_the_last_position(tiny_model):
    name = mlp_hook_name(tiny_model, 1)
    clean, patched = {}, {}
    idx = torch.tensor([1, 4])
    toks = _tokens(tiny_model)
    with torch.no_grad():
        with hooked(tiny_model, fwd=[(name, capture(clean, name))]):
            tiny_model(toks)
        # The capture runs after the patch on the same hook point: it sees the patched activation.
        with hooked(tiny_model, fwd=[(name, set_neurons(idx, factor=2.0)), (name, capture(patched, name))]):
            tiny_model(toks)
    c, p = next(iter(clean.values())), next(iter(patched.values()))
    assert torch.allclose(p[:, -1, idx], 2 * c[:, -1, idx])
    others = torch.ones(c.shape[-1], dtype=torch.bool)
    others[idx] = False
    assert torch.equal(p[:, -1, others], c[:, -1, others])
    assert torch.equal(p[:, :-1], c[:, :-1])


def test_set_neurons_every_position(tiny_model):
    name = mlp_hook_name(tiny_model, 0)
    patched = {}
    with torch.no_grad(), hooked(tiny_model, fwd=[(name, set_neurons(torch.tensor([2]), factor=0.0, position=None)), (name, capture(patched, name))]):
        tiny_model(_tokens(tiny_model))
    assert torch.all(next(iter(patched.values()))[..., 2] == 0)
