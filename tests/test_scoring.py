"""Scoring against a plain oracle: one unbatched forward per option, log-softmax by hand."""

from __future__ import annotations

import math

import pytest
import torch

from qrnca_lens.data import load_data
from qrnca_lens.errors import ProxyError
from qrnca_lens.proxies import ProxyConfig, build_all_prompts
from qrnca_lens.scoring import accuracy, pad_batch, score_prompts


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
