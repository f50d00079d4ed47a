"""Scoring against a plain oracle: one unbatched forward per option, log-softmax by hand."""

from __future__ import annotations

import math

import pytest
import torch

from qrnca_lens.data.queries import load_data
from qrnca_lens.errors import ProxyError
from qrnca_lens.data.prompts import ProxyConfig, build_all_prompts
from qrnca_lens.engine.scoring import accuracy, score_prompts
from qrnca_lens.model.access import pad_batch


def _oracle_logprob(model, prefix, cont):
    """sum_t log softmax(model(prefix + cont[:t]))[-1][cont[t]], one sequence at a time."""
    total = 0.0
    for t, tok in enumerate(cont):
        seq = torch.tensor([list(prefix) + list(cont[:t])])
        with torch.no_grad():
            logits = model(seq)[0, -1].double()
        total += float(torch.log_softmax(logits, -1)[tok])
    return total


@pytest.mark.parametrize("kind", ["mcqa-letter", "mcqa-text", "cloze"])
def test_scores_match_the_unbatched_oracle(tiny_model, tiny_tokenizer, kind):
    queries = load_data("builtin:facts", limit=5)[:6]
    prompts_by_q = build_all_prompts(queries, ProxyConfig(kind, n_prompts=2, n_shots=1), tiny_tokenizer,
                                     pool=load_data("builtin:facts"))
    prompts = [p for ps in prompts_by_q.values() for p in ps]
    scores = score_prompts(tiny_model, prompts, batch_size=3)
    for pr, sc in zip(prompts, scores):
        expected = _oracle_logprob(tiny_model, pr.tokens, pr.target)
        assert sc.target_logprob == pytest.approx(expected, abs=1e-4)
        if pr.options:
            opt = [_oracle_logprob(tiny_model, pr.tokens, o) for o in pr.options]
            assert sc.predicted == max(range(len(opt)), key=opt.__getitem__)
            assert sc.correct == (sc.predicted == pr.correct)
        else:
            with torch.no_grad():
                top = int(tiny_model(torch.tensor([pr.tokens]))[0, -1].argmax())
            assert sc.predicted == top and sc.correct == (top == pr.target[0])


def test_cloze_accuracy_reports_guessing_chance_per_group(tiny_gated, tiny_tokenizer):
    from qrnca_lens.data.queries import groups_of
    from qrnca_lens.data.prompts import cloze_chance

    pool = load_data("builtin:facts")
    queries = load_data("builtin:facts", limit=2)
    cfg = ProxyConfig("cloze", n_prompts=2, n_shots=1)
    res = accuracy(tiny_gated, queries, cfg, pool=pool)
    prompts = [p for ps in build_all_prompts(queries, cfg, tiny_tokenizer, prepend_bos=res.prepend_bos,
                                             pool=pool).values() for p in ps]
    members = groups_of(pool)
    each = {p: cloze_chance(p, [o for o in members[p.group] if o.id != p.query_id], tiny_tokenizer,
                            res.prepend_bos) for p in prompts}
    assert res.chance == pytest.approx(sum(each.values()) / len(each))
    for g, r in res.per_group.items():
        mine = [c for p, c in each.items() if p.group == g]
        assert r["chance"] == pytest.approx(sum(mine) / len(mine))
    assert res.per_group["continent"]["chance"] > res.per_group["capital"]["chance"]  # continents repeat
    assert "chance" in str(res).splitlines()[1]


def test_accuracy_aggregates_prompts(tiny_gated, tiny_tokenizer):
    queries = load_data("builtin:domains", limit=2)
    cfg = ProxyConfig("mcqa-letter", n_prompts=2, n_shots=0)
    res = accuracy(tiny_gated, queries, cfg)
    prompts = [p for ps in build_all_prompts(queries, cfg, tiny_tokenizer, prepend_bos=res.prepend_bos).values() for p in ps]
    scores = score_prompts(tiny_gated, prompts)
    assert res.n == len(prompts) == 2 * len(queries)
    assert res.accuracy == pytest.approx(sum(s.correct for s in scores) / len(scores))
    assert res.mean_target_prob == pytest.approx(sum(math.exp(s.target_logprob) for s in scores) / len(scores))
    assert res.chance == 0.25
    assert set(res.per_group) == {q.group for q in queries}
    assert sum(g["n"] for g in res.per_group.values()) == res.n


def test_accuracy_refuses_empty_data(tiny_gated):
    with pytest.raises(ProxyError, match="empty"):
        accuracy(tiny_gated, [], ProxyConfig("cloze"))


def test_right_padding_is_exact(tiny_model):
    a, b = [3, 8, 13, 21, 34], [5, 9]
    batch = pad_batch([a, b], 0, torch.device("cpu"))
    with torch.no_grad():
        both = tiny_model(batch)
        alone = tiny_model(torch.tensor([b]))
    assert torch.allclose(both[1, : len(b)], alone[0], atol=1e-5)


# ---------------------------------------------------------------- memory: logits only where read, token budget


def test_logprobs_at_equals_the_full_forward(tiny_model):
    from qrnca_lens.model.readout import logprobs_at

    ids = torch.randint(3, 500, (2, 23))
    positions = [[0, 7, 22], [15]]
    with torch.no_grad():
        full = torch.log_softmax(tiny_model(ids, return_type="logits").float(), dim=-1)
        got = logprobs_at(tiny_model, ids, positions)
    for b, pos in enumerate(positions):
        assert got[b].shape == (len(pos), full.shape[-1])
        assert (got[b] - full[b, pos]).abs().max() <= 1e-5


def test_scoring_unembeds_only_the_positions_it_reads(tiny_model, tiny_tokenizer):
    """The memory bug: full-vocabulary logits at every position of every padded row. Count what the
    unembedding sees during scoring: only the target positions of each distinct row."""

    queries = load_data("builtin:facts", limit=2)[:4]
    prompts = [p for ps in build_all_prompts(queries, ProxyConfig("cloze", n_prompts=2, n_shots=2), tiny_tokenizer,
                                             pool=load_data("builtin:facts")).values() for p in ps]
    seen = []
    # A torch hook on the unembedding module, not on its TL hook point (the engine refuses a caller's hook points).
    handle = tiny_model.unembed.register_forward_hook(lambda mod, args, out: seen.append(out.shape[:-1].numel()))
    try:
        scores = score_prompts(tiny_model, prompts, batch_size=4)
    finally:
        handle.remove()
    assert len(scores) == len(prompts)
    # The engine's self-check reads the prefix pass's logits at each row's positions too (its reference), and
    # the once-per-model skip check runs one token twice: still the target positions only, not every position.
    assert 0 < sum(seen) <= 2 * sum(len(p.target) for p in prompts) + 2


def test_batch_plan_budgets_padded_tokens():
    from qrnca_lens.engine.scoring import batch_plan

    lengths = [10, 300, 40, 250, 30, 1000, 20]
    plan = batch_plan(lengths, max_rows=8, max_tokens=600)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    for b in plan:
        width = max(lengths[i] for i in b)
        assert len(b) == 1 or len(b) * width <= 600  # a sequence over the budget runs alone
        assert lengths[b[0]] == width  # longest first: little padding
    # 1000 over the budget alone; 300 + 250 pad to exactly 600; the short four share one forward.
    assert plan == [[5], [1, 3], [2, 4, 6, 0]]
    assert all(len(b) <= 2 for b in batch_plan(lengths, max_rows=2, max_tokens=10**6))  # the row cap holds


def test_token_budget_changes_no_score(tiny_gated, tiny_tokenizer):
    queries = load_data("builtin:facts", limit=2)[:4]
    prompts = [p for ps in build_all_prompts(queries, ProxyConfig("mcqa-letter", n_prompts=2, n_shots=1),
                                             tiny_tokenizer, pool=load_data("builtin:facts")).values() for p in ps]
    wide = score_prompts(tiny_gated, prompts, batch_size=16, max_batch_tokens=10**6)
    narrow = score_prompts(tiny_gated, prompts, batch_size=16, max_batch_tokens=1)  # one row per forward
    for a, b in zip(wide, narrow):
        assert a.target_logprob == pytest.approx(b.target_logprob, abs=1e-5) and a.predicted == b.predicted


def test_prompt_longer_than_the_context_is_refused(tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformer_lens.model_bridge import TransformerBridge

    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=24)).eval()
    model = TransformerBridge.boot_transformers("tiny-short", hf_model=hf, tokenizer=tiny_tokenizer)
    assert model.cfg.n_ctx == 24
    queries = load_data("builtin:facts", limit=1)
    cfg = ProxyConfig("cloze", n_prompts=1, n_shots=3)
    prompts = [p for ps in build_all_prompts(queries, cfg, tiny_tokenizer, pool=load_data("builtin:facts")).values()
               for p in ps]
    long = max(prompts, key=lambda p: len(p.tokens))
    assert len(long.tokens) > 24
    with pytest.raises(ProxyError, match=rf"query {long.query_id!r} is {len(long.tokens) + len(long.target) - 1} "
                                         r"tokens .* context of 24 tokens .*--shots"):
        score_prompts(model, [long])
    with pytest.raises(ProxyError, match="context of 24 tokens"):
        accuracy(model, queries, cfg, pool=load_data("builtin:facts"))


# ---------------------------------------------------------------- progress bars (tqdm on stderr)


def _cloze_prompts(tokenizer, per_group=3):
    from qrnca_lens.data.queries import limit_per_group

    pool = load_data("builtin:facts")
    by_q = build_all_prompts(limit_per_group(pool, per_group), ProxyConfig("cloze"), tokenizer, pool=pool)
    return [p for ps in by_q.values() for p in ps]


def test_score_items_shows_a_bar_per_engine_step_and_keeps_its_numbers(tiny_gated, tiny_tokenizer, capsys):
    from qrnca_lens.engine import DEFAULT_MEMORY_BUDGET_MB
    from qrnca_lens.engine.scoring import _engine_steps, score_items

    prompts = _cloze_prompts(tiny_tokenizer)
    items = [(p, None) for p in prompts] + [(p, ([(1, 3), (2, 5)], 2.0)) for p in prompts]
    quiet = score_items(tiny_gated, items, progress=False)
    assert "scoring" not in capsys.readouterr().err
    shown = score_items(tiny_gated, items)  # progress is the default
    err = capsys.readouterr().err
    n = len(_engine_steps(tiny_gated, [p.tokens for p in prompts], DEFAULT_MEMORY_BUDGET_MB))
    assert n > 1 and "scoring: 100%" in err and f"{n}/{n}" in err and "prefix" in err
    assert shown == quiet  # one run_rows call per prefix group computes exactly what one call over all does
    score_items(tiny_gated, items[:1])  # a single step: nothing to show
    assert "scoring" not in capsys.readouterr().err


def test_full_sequence_scoring_shows_a_bar_per_batch(tiny_gated, tiny_tokenizer, capsys):
    from qrnca_lens.engine.scoring import score_items

    items = [(p, None) for p in _cloze_prompts(tiny_tokenizer, 1)]  # 15 prompts: 4 batches of at most 4
    quiet = score_items(tiny_gated, items, engine=False, batch_size=4, progress=False)
    assert "scoring" not in capsys.readouterr().err
    assert score_items(tiny_gated, items, engine=False, batch_size=4) == quiet
    err = capsys.readouterr().err
    assert "scoring: 100%" in err and "4/4" in err and "batch" in err


def test_accuracy_shows_a_bar_over_its_chunks_unless_quiet(tiny_gated, capsys):
    from qrnca_lens.data.queries import limit_per_group

    pool = load_data("builtin:facts")
    queries = limit_per_group(pool, 3)  # 45 prompts: chunks of 4 x batch_size = 32 -> 2 chunks
    quiet = accuracy(tiny_gated, queries, ProxyConfig("cloze"), pool=pool, progress=False)
    assert "scoring cloze" not in capsys.readouterr().err
    shown = accuracy(tiny_gated, queries, ProxyConfig("cloze"), pool=pool)
    err = capsys.readouterr().err
    assert "scoring cloze: 100%" in err and "2/2" in err and shown == quiet
    accuracy(tiny_gated, queries[:2], ProxyConfig("cloze"), pool=pool)  # 6 prompts: one chunk, no bar
    assert "scoring cloze" not in capsys.readouterr().err
