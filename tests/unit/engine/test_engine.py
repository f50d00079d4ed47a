"""The row engine: rows behind a cached prefix == full-sequence forwards with the same intervention."""

from __future__ import annotations

import random

import pytest
import torch

from builders import build_tiny, tiny_gemma3_bridge
from qrnca_lens.engine import (Backend, CleanRowCheck, Prefix, Row, backend_of, check_against_plain, choose_backend,
                               plan_row_chunks, run_rows, skipping_is_exact)
from qrnca_lens.engine import checks
from qrnca_lens.engine.plan import Dims, plan_groups, rows_per_chunk
from qrnca_lens.errors import FastPathError, QrncaError
from qrnca_lens.model.hooks import active_hook_count
from qrnca_lens.model.access import d_mlp, mlp_hook_name, n_layers


def _oracle(model, prompt, row):
    """A plain full-sequence forward of prompt[:-1] + row tokens; each (layer, neurons, factor) multiplies the
    MLP hook at the row's first token; log-probs (float64) at the row's tokens."""
    P = len(prompt) - 1
    seq = torch.tensor([list(prompt[:-1]) + list(row.tokens)])
    hooks = []
    for layer, idx, factor in row.scale:
        def h(act, hook, idx=list(idx), factor=factor):
            out = act.clone()
            out[0, P, idx] = act[0, P, idx] * factor
            return out
        hooks.append((mlp_hook_name(model, layer), h))
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(seq, return_type="logits")
    return torch.log_softmax(logits[0, P:].double(), -1)


def _prompts(n, lengths, vocab, seed=0):
    rnd = random.Random(seed)
    return [[rnd.randrange(5, vocab) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


def _rows(model, prompts, n_rows, seed=0):
    rnd = random.Random(seed)
    L, W = n_layers(model), d_mlp(model)
    rows = []
    for i in range(n_rows):
        b = rnd.randrange(len(prompts))
        T = rnd.choice([1, 1, 2, 3])
        toks = (prompts[b][-1], *[rnd.randrange(5, 100) for _ in range(T - 1)])
        kind = i % 4
        if kind == 0:
            scale = ()
        else:
            layers = rnd.sample(range(L), k=min(L, kind))
            scale = tuple((layer, tuple(sorted(rnd.sample(range(W), 5))), rnd.choice([0.0, 2.0, -1.5, 3.0]))
                          for layer in layers)
        rows.append(Row(b, toks, scale))
    return rows


@pytest.fixture(scope="module")
def gemma(tiny_tokenizer):
    return tiny_gemma3_bridge(tiny_tokenizer)


def _check_rows(model, prompts, rows, **kw):
    before = active_hook_count(model)
    got = run_rows(model, prompts, rows, lambda row, lp, acts: lp.double(), **kw)
    assert active_hook_count(model) == before
    for row, lp in zip(rows, got):
        ref = _oracle(model, prompts[row.prompt], row)
        assert lp.shape == ref.shape
        live = ref > -20
        assert float(((lp - ref).abs() * live).max()) < 2e-4, row


def test_rows_equal_full_sequence_forwards(tiny_model, tiny_tokenizer):
    prompts = _prompts(5, [7, 12, 4, 9], len(tiny_tokenizer))
    _check_rows(tiny_model, prompts, _rows(tiny_model, prompts, 24))


def test_rows_equal_full_sequence_on_gemma3_beyond_its_sliding_window(gemma, tiny_tokenizer):
    """Tiny Gemma-3 has a 16-token window: prompts of 30-40 tokens need the sliding mask on its local layers."""
    assert gemma.original_model.config.sliding_window == 16
    assert "sliding_attention" in gemma.original_model.config.layer_types
    prompts = _prompts(4, [30, 41, 9], len(tiny_tokenizer), seed=1)
    _check_rows(gemma, prompts, _rows(gemma, prompts, 16, seed=1))


def test_many_small_groups_and_chunks_give_the_same_numbers(tiny_llama, tiny_tokenizer):
    prompts = _prompts(6, [10, 6, 13], len(tiny_tokenizer), seed=2)
    rows = _rows(tiny_llama, prompts, 30, seed=2)
    big = run_rows(tiny_llama, prompts, rows, lambda r, lp, a: lp)
    small = run_rows(tiny_llama, prompts, rows, lambda r, lp, a: lp, max_rows=2, max_prefix_tokens=8)
    for a, b in zip(big, small):
        assert torch.allclose(a, b, atol=1e-5)


def test_rows_started_at_their_layer_equal_rows_started_at_zero(tiny_llama, tiny_tokenizer):
    prompts = _prompts(3, [9, 11, 5], len(tiny_tokenizer), seed=3)
    prefix = Prefix(tiny_llama, prompts)
    assert skipping_is_exact(prefix)
    W = d_mlp(tiny_llama)
    rows = [Row(b, (prompts[b][-1], 17), ((2, tuple(range(0, W, 3)), 2.0),)) for b in range(3)]
    with torch.no_grad():
        at0 = prefix.forward(rows, start=0)
        at2 = prefix.forward(rows, start=2)
    assert torch.allclose(at0, at2, atol=1e-5)


def test_skipped_blocks_do_not_run(tiny_llama, tiny_tokenizer):
    prompts = _prompts(1, [8], len(tiny_tokenizer))
    prefix = Prefix(tiny_llama, prompts)
    prefix.resid(Row(0, (prompts[0][-1],)))
    fired = []
    with torch.no_grad(), tiny_llama.hooks(fwd_hooks=[(f"blocks.{l}.hook_resid_post", lambda a, hook: fired.append(hook.name))
                                                     for l in range(n_layers(tiny_llama))]):
        prefix.forward([Row(0, (prompts[0][-1],))], start=2)
    assert len(fired) == 1 and fired[0].startswith("blocks.2.")  # the bridge names it by its alias
    assert "forward" not in vars(tiny_llama.blocks[0])  # the skip is undone


def test_gpt2_cannot_start_above_layer_zero_and_says_so_by_falling_back(tiny_tokenizer, _tiny_cache):
    """GPT-2 adds position embeddings to inputs_embeds: the per-model check must refuse the skip."""
    model = _tiny_cache.setdefault("gpt2-bridge", build_tiny("gpt2-bridge", tiny_tokenizer))
    prompts = _prompts(2, [8], len(tiny_tokenizer))
    assert not skipping_is_exact(Prefix(model, prompts))
    _check_rows(model, prompts, _rows(model, prompts, 8, seed=4))  # still exact: rows start at 0


def test_captured_activations_equal_the_full_sequence(tiny_llama, tiny_tokenizer):
    prompts = _prompts(2, [9, 6], len(tiny_tokenizer), seed=5)
    name = mlp_hook_name(tiny_llama, 1)
    rows = [Row(0, (prompts[0][-1], 33, 40)), Row(1, (prompts[1][-1], 7), ((0, (1, 2), 0.0),))]
    got = run_rows(tiny_llama, prompts, rows, lambda r, lp, a: a[name], capture_names=[name])
    for row, act in zip(rows, got):
        P = len(prompts[row.prompt]) - 1
        store = {}
        hooks = [(name, lambda a, hook: store.setdefault("a", a[0, P:].clone()) is None or a)]
        for layer, idx, f in row.scale:
            def h(a, hook, idx=list(idx), f=f):
                out = a.clone()
                out[0, P, idx] = a[0, P, idx] * f
                return out
            hooks.insert(0, (mlp_hook_name(tiny_llama, layer), h))
        with torch.no_grad(), tiny_llama.hooks(fwd_hooks=hooks):
            tiny_llama(torch.tensor([prompts[row.prompt][:-1] + list(row.tokens)]))
        assert torch.allclose(act, store["a"], atol=1e-5)


def test_bad_rows_are_refused(tiny_llama):
    with pytest.raises(QrncaError, match="prompts"):
        run_rows(tiny_llama, [[1, 2, 3]], [Row(3, (3,))], lambda r, lp, a: lp)
    with pytest.raises(QrncaError, match="at least one token"):
        run_rows(tiny_llama, [[1, 2, 3]], [Row(0, ())], lambda r, lp, a: lp)


def test_plan_groups_respects_the_prefix_cap(tiny_llama):
    d = Dims.of(tiny_llama)
    groups = plan_groups([100, 100, 100, 400, 50], d, "packed", 2**30, max_prefix_tokens=300)
    assert groups == [[0, 1, 2], [3], [4]]
    assert plan_groups([5, 5], d, "batch", 2**30) == [[0], [1]]
    assert backend_of(tiny_llama) == "packed"


# ---------------------------------------------------------------- one backend vocabulary, one planner, one check


def test_backends_are_one_literal_and_the_oracle_is_full(tiny_llama, tiny_tokenizer):
    from typing import get_args

    from qrnca_lens.qrnca.ig import fast_backend

    assert get_args(Backend) == ("packed", "batch", "full")
    assert choose_backend(tiny_llama) == backend_of(tiny_llama) == fast_backend(tiny_llama) == "packed"
    assert choose_backend(tiny_llama, fast=False) == "full"
    prompts = _prompts(3, [7, 10], len(tiny_tokenizer), seed=8)
    _check_rows(tiny_llama, prompts, _rows(tiny_llama, prompts, 8, seed=8), backend=choose_backend(tiny_llama, fast=False))


def test_one_planner_cuts_rows_by_depth_within_the_memory_plan(tiny_llama, tiny_tokenizer):
    prompts = _prompts(2, [200, 150], len(tiny_tokenizer), seed=6)
    prefix = Prefix(tiny_llama, prompts)
    by_start = [(2, list(range(0, 50))), (0, list(range(50, 80))), (1, list(range(80, 200)))]
    start_of = {r: s for s, rows in by_start for r in rows}
    budget, n_chunks = 2 * 2**20, {}
    for grad in (True, False):
        per = rows_per_chunk(Dims.of(tiny_llama), "packed", prefix.C, 2, 1000, budget, grad=grad)
        chunks = plan_row_chunks(prefix, by_start, 2, 1000, budget, grad=grad)
        assert sorted(r for _, rows in chunks for r in rows) == list(range(200))  # every row once
        for start, rows in chunks:
            assert 0 < len(rows) <= per
            assert start == min(start_of[r] for r in rows)  # a chunk starts at its lowest row
        n_chunks[grad] = len(chunks)
    # A backward keeps every layer's activations: the same budget holds fewer rows per chunk.
    assert n_chunks[True] > n_chunks[False] >= 200 // 32


def test_the_self_check_names_the_first_row_off_the_plain_forward(tiny_llama, tiny_tokenizer):
    prompts = _prompts(2, [9, 6], len(tiny_tokenizer), seed=7)
    rows = [Row(b, (prompts[b][-1], 21)) for b in range(2)]
    prefix = Prefix(tiny_llama, prompts, continuations=[r.tokens[1:] for r in rows])
    with torch.no_grad():
        lp, _, at = prefix.clean_pass(rows)
    own = [lp[at[r][0] : at[r][0] + 2] for r in rows]
    check = CleanRowCheck(prefix)
    for b, r in enumerate(rows):
        # The reference is the prefix pass's own logits: they are an ordinary forward's.
        plain = checks.plain_logprobs(tiny_llama, prompts[b], r.tokens)
        assert torch.allclose(check.reference(b, r.tokens), plain, atol=1e-5)
        check.add(b, own[b], r.tokens, f"row {b}")
    check.verify()  # intact rows pass
    bent = own[1].clone()
    bent[0, int(own[1][0].argmax())] += 0.5
    check.add(1, bent, rows[1].tokens, "the bent row")
    check.add(0, own[0] + 1.0, rows[0].tokens, "the shifted row")
    with pytest.raises(FastPathError, match=r": the bent row differs .* by 0\.5 nats"):
        check.verify()
    with pytest.raises(FastPathError, match="the bent row"):
        check_against_plain(prefix, 1, bent, rows[1].tokens, "the bent row")


def test_the_self_check_runs_one_plain_forward_per_prompt_and_row(tiny_llama, tiny_tokenizer, monkeypatch):
    """Without the prefix pass's logits (``Prefix.plain`` is None) the reference is an ordinary forward, once."""
    prompts = _prompts(2, [8, 5], len(tiny_tokenizer), seed=9)
    prefix = Prefix(tiny_llama, prompts, backend="full")
    assert prefix.plain is None
    calls = []
    plain = checks.plain_logprobs
    monkeypatch.setattr(checks, "plain_logprobs", lambda *a: calls.append(a[1:]) or plain(*a))
    check = CleanRowCheck(prefix)
    rows = [Row(b, (prompts[b][-1],)) for b in (0, 1, 0, 1, 0)]
    with torch.no_grad():
        for r in rows:
            check.add(r.prompt, prefix.forward([r]), r.tokens, f"row of prompt {r.prompt}")
    check.verify()
    assert len(calls) == 2
