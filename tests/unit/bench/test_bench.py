"""The benchmark's evaluation part: identical items through the engine and full sequences."""

from __future__ import annotations

import torch

from qrnca_lens.bench.ig import _eval_items, _neuron_sets, run_eval_bench
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
