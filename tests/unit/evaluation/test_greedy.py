"""The free-form check's greedy decoding with a key/value cache: the same tokens as the full-sequence loop
(``_greedy_full``, today's oracle), the intervention at every position (the new tokens too) checked against an
unbatched plain forward, no hooks left behind, and the fallbacks (no cache path, a caller's hooks, a cache that
stays empty)."""

from __future__ import annotations

import contextlib
import doctest
import time

import pytest
import torch

import qrnca_lens.evaluation.judge as judge
from qrnca_lens.data.prompts import Prompt
from qrnca_lens.engine import backend_of
from qrnca_lens.evaluation.judge import _greedy, _greedy_cached, _greedy_chunks, _greedy_full, _left_padded_mask
from qrnca_lens.model.access import d_mlp, mlp_hook_name, n_layers
from qrnca_lens.model.hooks import active_hook_count, hooked
from qrnca_lens.model.interventions import SUPPRESS

# (prompt length, target length): two lengths shared by several prompts (they batch), a one-token prompt
# (no cache before the first step), targets of 1-4 tokens.
SHAPES = [(5, 3), (1, 2), (9, 4), (5, 1), (5, 4), (12, 2), (9, 3), (3, 4)]


def _prompts(model, shapes=SHAPES, seed=0) -> list[Prompt]:
    gen = torch.Generator().manual_seed(seed)
    vocab = int(model.cfg.d_vocab)
    out = []
    for i, (P, T) in enumerate(shapes):
        toks = torch.randint(3, vocab, (P + T,), generator=gen).tolist()  # 0-2 are the special tokens
        out.append(Prompt(query_id=f"q{i}", group="g", template=0, text="", tokens=tuple(toks[:P]),
                          target=tuple(toks[P:])))
    return out


def _neurons(model) -> list[tuple[int, int]]:
    """A third of every layer's neurons: enough to change the greedy tokens of a tiny model."""
    return [(layer, i) for layer in range(n_layers(model)) for i in range(0, d_mlp(model), 3)]


def _items(model):
    ps = _prompts(model)
    sup = (_neurons(model), SUPPRESS)
    return [(p, None) for p in ps] + [(p, sup) for p in ps]


def _plain(model, prompt, neurons, new):
    """log-softmax of one unbatched forward of prompt + new[:-1], the neurons zeroed at every position."""
    hooks = []
    for layer in sorted({a for a, _ in neurons}):
        idx = [b for a, b in neurons if a == layer]

        def h(act, hook, idx=idx):
            out = act.clone()
            out[..., idx] = 0.0
            return out

        hooks.append((mlp_hook_name(model, layer), h))
    seq = torch.tensor([list(prompt.tokens) + list(new[:-1])])
    with torch.no_grad(), hooked(model, fwd=hooks):
        logits = model(seq, return_type="logits")
    return torch.log_softmax(logits[0, len(prompt.tokens) - 1 :].float(), -1)


def _spy_full(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = judge._greedy_full

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(judge, "_greedy_full", spy)
    return calls


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_cached_greedy_gives_the_full_loops_tokens(tiny_model, batch_size, monkeypatch):
    model = tiny_model
    items = _items(model)
    want = _greedy_full(model, items, batch_size)
    before = active_hook_count(model)
    calls = _spy_full(monkeypatch)
    got = _greedy(model, items, batch_size)
    assert got == want
    assert [len(g) for g in got] == [len(p.target) for p, _ in items]
    assert active_hook_count(model) == before == 0
    # The cached path ran wherever the model has one (the loop only for TL-native bridges).
    assert calls == ([1] if backend_of(model) == "full" else [])
    # The suppression reaches the tokens: some continuation changes (else the comparison above shows little).
    n = len(items) // 2
    assert got[:n] != got[n:]


def test_each_cached_step_is_the_full_forward_with_the_neurons_zeroed_everywhere(tiny_llama):
    """Logit-level: every step's log-probabilities equal an unbatched full forward with the neurons zeroed
    at every position (prompt and new tokens), so the intervention acts on the cached tokens and the new ones."""
    model = tiny_llama
    neurons = _neurons(model)
    for p in _prompts(model, [(6, 4), (1, 3)]):
        for iv in (None, (neurons, SUPPRESS)):
            gen, steps = _greedy_cached(model, "packed", [(p, iv)])
            plain = _plain(model, p, neurons if iv else [], gen[0])
            assert steps.shape == plain.shape == (len(p.target), int(model.cfg.d_vocab))
            assert torch.allclose(steps, plain, atol=1e-4)
            assert gen[0] == plain.argmax(-1).tolist()
    assert active_hook_count(model) == 0


def test_a_prompt_longer_than_the_sliding_window(tiny_gemma3, monkeypatch):
    """Gemma 3's sliding-window layers (16 tokens): prompts of 14-30 tokens decoded past the window."""
    model = tiny_gemma3
    items = [(p, iv) for p in _prompts(model, [(30, 4), (14, 4), (30, 3), (20, 4)], seed=1)
             for iv in (None, (_neurons(model), SUPPRESS))]
    want = _greedy_full(model, items, 4)
    calls = _spy_full(monkeypatch)
    assert _greedy(model, items, 4) == want
    assert calls == []
    assert active_hook_count(model) == 0


def test_a_callers_hook_runs_the_full_loop_with_it(tiny_llama, monkeypatch):
    """A hook of the caller's on the model would see a cached step's other positions: the loop runs instead,
    with the hook acting as it does there; the hook stays the caller's."""
    model = tiny_llama
    items = _items(model)[:4]

    def halve(act, hook):
        return act * 0.5

    model.add_hook(mlp_hook_name(model, 1), halve)
    try:
        want = _greedy_full(model, items, 2)
        calls = _spy_full(monkeypatch)
        assert _greedy(model, items, 2) == want
        assert calls == [1]
        assert active_hook_count(model) == 1
    finally:
        model.reset_hooks()
    assert active_hook_count(model) == 0


def test_a_cache_that_stays_empty_falls_back_to_the_loop(tiny_llama, monkeypatch):
    """transformers >= 5.24 passes ``cache=`` on to attention, which TL's bridge does not read: without
    ``prefix_cache_kwarg``'s bridging every step attends to itself alone. The self-check sees it, warns, and the
    full loop gives the tokens."""
    import qrnca_lens.model.surgery as surgery

    model = tiny_llama
    if surgery._cache_keyword(model.original_model) != "cache":
        pytest.skip("this transformers takes past_key_values: the attention modules read the cache as passed")

    @contextlib.contextmanager
    def unbridged(model):
        yield "cache"

    items = _items(model)
    want = _greedy_full(model, items, 3)
    monkeypatch.setattr(surgery, "prefix_cache_kwarg", unbridged)
    calls = _spy_full(monkeypatch)
    with pytest.warns(UserWarning, match="cached decoding differs from a full forward"):
        got = _greedy(model, items, 3)
    assert got == want and calls == [1]
    assert active_hook_count(model) == 0


def test_timing_against_the_full_loop(tiny_llama):
    """Side by side on a longer target (printed, not asserted: the machine is shared)."""
    model = tiny_llama
    items = [(p, (_neurons(model), SUPPRESS)) for p in _prompts(model, [(40, 32)] * 4 + [(25, 32)] * 4, seed=2)]
    t0 = time.perf_counter()
    want = _greedy_full(model, items, 8)
    t1 = time.perf_counter()
    got = _greedy(model, items, 8)
    t2 = time.perf_counter()
    assert got == want
    print(f"\ngreedy, 8 prompts x 32 new tokens on the tiny Llama: full loop {t1 - t0:.3f} s, cached {t2 - t1:.3f} s, "
          f"ratio {(t1 - t0) / max(t2 - t1, 1e-9):.1f}x")


@pytest.mark.parametrize("same_length", [True, False])
def test_chunks_cover_every_item_once_sorted_by_length(same_length):
    lengths = [7, 3, 3, 9, 7, 7, 1, 3, 7]
    chunks = _greedy_chunks(lengths, 2, same_length)
    flat = [i for c in chunks for i in c]
    assert sorted(flat) == list(range(len(lengths))) and all(1 <= len(c) <= 2 for c in chunks)
    assert [lengths[i] for i in flat] == sorted(lengths)
    assert all(len({lengths[i] for i in c}) == 1 for c in chunks) == same_length
    assert _greedy_chunks([], 4, same_length) == []


def test_the_helpers_examples():
    for fn in (_greedy_chunks, _left_padded_mask):
        for test in doctest.DocTestFinder().find(fn, globs={"torch": torch, fn.__name__: fn}):
            got = doctest.DocTestRunner().run(test)
            assert got.attempted >= 1 and got.failed == 0, fn.__name__
