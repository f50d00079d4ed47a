"""The benchmark's evaluation part: identical items through the engine and full sequences."""

from __future__ import annotations

import json

import pytest
import torch

from qrnca_lens.bench.ig import _eval_items, _neuron_sets, run_eval_bench, run_evaluate_bench
from qrnca_lens.data.queries import load_data
from qrnca_lens.model.access import d_mlp, n_layers
from qrnca_lens.data.prompts import ProxyConfig, build_prompts


def test_eval_bench_compares_identical_items(tiny_gated, tiny_tokenizer):
    pool = load_data("builtin:domains")
    other = next(q for q in pool if q.group != pool[0].group)
    cfg = ProxyConfig("mcqa-letter", n_prompts=2, n_shots=1)
    prompts = build_prompts(pool[0], cfg, tiny_tokenizer, pool=pool)
    control = build_prompts(other, cfg, tiny_tokenizer, pool=pool)
    scores = torch.randn(2, n_layers(tiny_gated), d_mlp(tiny_gated))
    items = _eval_items([prompts, control], [1, 0], _neuron_sets(scores, size=5))
    assert len(items) == 4 + 7 * 2 * 2 * 4  # clean + sets x boost/suppress x queries x (related + unrelated)
    res = run_eval_bench(tiny_gated, [prompts, control], [1, 0], scores, repeats=1)
    assert res["eval_rows"] == len(items)
    assert res["max_abs_logprob_diff"] < 1e-4 and res["eval_same_predictions"]
    assert res["eval_s"] == res["eval_engine_s"] / 2 and res["eval_speedup"] == res["eval_full_s"] / res["eval_engine_s"]


def _two_groups(tokenizer):
    """Two queries of each of two groups (as the bench picks them), two letter prompts each."""
    pool = load_data("builtin:domains")
    queries = [q for q in pool if q.group == pool[0].group][:2] + [q for q in pool if q.group != pool[0].group][:2]
    cfg = ProxyConfig("mcqa-letter", n_prompts=2, n_shots=1)
    return queries, {q.id: build_prompts(q, cfg, tokenizer, pool=pool) for q in queries}, cfg


@pytest.mark.filterwarnings("ignore:evaluate.*has no neurons")  # a tiny model's selection may leave a query empty
def test_evaluate_bench_reports_evaluates_seconds_per_query_and_its_stages(tiny_gated, tiny_tokenizer):
    queries, prompts, cfg = _two_groups(tiny_tokenizer)
    res = run_evaluate_bench(tiny_gated, queries, prompts, cfg, steps=2, n_boot=20)
    stages = res["evaluate_stage_s"]
    assert res["evaluate_queries"] == 4 and res["evaluate_s_per_query"] == stages["total"] / 4
    assert res["locate_s_per_query"] > 0
    # Letter MCQA: the symbol-binding control runs, the free-form check (answer text only) does not.
    assert {"prepare", "locate", "scored_rows", "pcr_editing", "symbol_binding", "total"} <= set(stages)
    assert stages.get("free_form") is None
    assert sum(v for k, v in stages.items() if k not in ("total", "free_form_greedy") and v is not None) \
        <= stages["total"] + 1e-6


@pytest.mark.filterwarnings("ignore:evaluate.*has no neurons")
def test_the_bench_json_line_has_evaluates_and_locates_seconds_per_query(monkeypatch, capsys, tiny_gated):
    import qrnca_lens.model.loading as models
    from qrnca_lens import cli

    monkeypatch.setattr(models, "load_model", lambda name, **kw: tiny_gated)
    assert cli.main(["bench", "--model", "smollm2", "--steps", "2", "--reference-layers", "1", "--repeats", "1",
                     "--no-captum"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    keys = list(last)
    # Evaluate's seconds per query sit next to locate's: the IG of one query (fast_s) and the whole locate.
    assert keys[keys.index("fast_s") + 1 : keys.index("fast_s") + 3] == ["locate_s_per_query", "evaluate_s_per_query"]
    assert last["evaluate_s_per_query"] == last["evaluate_stage_s"]["total"] / last["evaluate_queries"] > 0
    assert last["evaluate_queries"] == last["eval_queries"] == 4  # the same four queries as the engine comparison
