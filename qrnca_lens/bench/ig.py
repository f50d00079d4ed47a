"""``qrnca-lens bench``: the fast IG path against the reference path on identical work, in one run.

One built-in query (3 prompts of about 100 tokens, m = 16). The reference path costs seconds per layer and
prompt, so the speed-up is measured on an evenly spaced subset of layers (``--reference-layers``) that both
paths compute; the fast path is also timed on all layers. Captum's ``LayerIntegratedGradients`` on the same
hook modules is timed too, for scale only: it interpolates the activation at *every* position (the
prompt's whole sequence), which is different math from QRNCA's last-position IG, so no score is compared.

Evaluation is measured the same way: four queries' scored rows as ``evaluate`` builds them (7 neuron sets x
boost/suppress x each query's own prompts and its control's, every query the control of another, plus the
clean prompts) through the row engine and through full-sequence scoring, on identical items
(``eval_speedup``, ``eval_s`` per query, ``max_abs_logprob_diff``). Then the whole commands on those four
queries and their prompts: ``locate`` (IG, m steps) and ``evaluate`` with its default locators and checks
(``locate_s_per_query``, ``evaluate_s_per_query``, and evaluate's seconds per stage, ``evaluate_stage_s``).

The last line printed is one JSON object (``speedup``, ``fast_s``, ``locate_s_per_query``,
``evaluate_s_per_query``, ``reference_s``, ``reference_layers``, ``max_rel_diff``, ``eval_speedup``,
``eval_s``, ``peak_rss_mb``, ``evaluate_stage_s``, ...). This is a benchmark, not a test:
numbers depend on the machine; the ratios are measured side by side in one run.

``--long-prompt-tokens N`` measures memory instead: one query of 3 prompts of N tokens (built-in facts as
filler before a real cloze prompt), the fast path on all layers under ``--memory-budget-mb``, and the
process's peak RSS (model included). It runs alone, since RSS is a high-water mark that the reference path
would set.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..protocols import HookedModel

__all__ = ["run_bench", "run_long_prompt_bench", "run_eval_bench", "run_evaluate_bench"]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _even_layers(n_layers: int, k: int) -> list[int]:
    if k >= n_layers:
        return list(range(n_layers))
    if k == 1:
        return [n_layers // 2]
    return sorted({round(i * (n_layers - 1) / (k - 1)) for i in range(k)})


def _captum_time(model: HookedModel, prompts: Sequence[Any], layers: Sequence[int], steps: int) -> float | None:
    try:
        from captum.attr import LayerIntegratedGradients
    except ImportError:
        return None
    from ..model.access import mlp_hook_name, model_device

    device = model_device(model)
    t0 = time.perf_counter()
    for p in prompts:
        ids = torch.tensor([list(p.tokens)], device=device)  # on the model's device: a CUDA model runs captum too
        pos, target = p.target_position, p.target[0]

        def forward(x: torch.Tensor, pos: int = pos, target: int = target) -> torch.Tensor:
            return torch.softmax(model(x)[:, pos].float(), dim=-1)[:, target]

        # A pad-token baseline is the usual choice; captum then interpolates every position's activation.
        base = torch.full_like(ids, int(model.tokenizer.pad_token_id or 0))
        for layer in layers:
            module = model.hook_dict[mlp_hook_name(model, layer)]
            lig = LayerIntegratedGradients(forward, module)
            with torch.enable_grad():
                lig.attribute(ids, baselines=base, n_steps=steps, internal_batch_size=steps)
    return time.perf_counter() - t0


def _neuron_sets(scores: Any, n_sets: int = 7, size: int = 20) -> list[list[tuple[int, int]]]:
    """Stand-ins for the 7 methods' neuron sets: slices of a query's IG ranking (QR-like: mostly upper
    layers) and seeded random neurons (any layer)."""
    summed = scores.sum(0).flatten()
    width = scores.shape[-1]
    ranked = torch.argsort(summed, descending=True)
    g = torch.Generator().manual_seed(0)
    sets = []
    for k in range(n_sets):
        pick = ranked[k * size : (k + 1) * size] if k < n_sets - 2 else torch.randperm(summed.numel(), generator=g)[:size]
        sets.append([(int(i) // width, int(i) % width) for i in pick])
    return sets


def _eval_items(queries: Sequence[Sequence[Any]], controls: Sequence[int], sets: Sequence[Any]) -> list[Any]:
    """The scored rows ``evaluate`` builds: every query's clean prompts, then per neuron set, boost and
    suppress, each query's own prompts (related) and its control query's (unrelated)."""
    from ..evaluation.judge import BOOST, SUPPRESS

    items: list[Any] = [(p, None) for prompts in queries for p in prompts]
    for neurons in sets:
        for factor in (BOOST, SUPPRESS):
            for q, prompts in enumerate(queries):
                items += [(p, (neurons, factor)) for p in [*prompts, *queries[controls[q]]]]
    return items


def run_eval_bench(model: HookedModel, queries: Sequence[Sequence[Any]], controls: Sequence[int], scores: Any,
                   repeats: int = 3) -> dict[str, Any]:
    """Evaluation of ``queries`` (7 neuron sets x boost/suppress x related/unrelated + clean, each query the
    control of another, as in ``evaluate``) through the row engine vs full-sequence scoring, on identical
    items: times, ratio, and the largest log-probability difference."""
    from ..engine.scoring import score_items

    items = _eval_items(queries, controls, _neuron_sets(scores))
    score_items(model, items[:4], progress=False)  # warm-up; no bars inside the timings
    engine_s, fast = _median_time(lambda: score_items(model, items, progress=False), repeats)
    full_s, slow = _median_time(lambda: score_items(model, items, engine=False, progress=False), 1)
    diff = max(abs(a.target_logprob - b.target_logprob) for a, b in zip(fast, slow))
    same = sum((a.predicted, a.correct) == (b.predicted, b.correct) for a, b in zip(fast, slow))
    n = len(queries)
    print(f"evaluation of {n} queries ({len(items)} scored rows: 7 neuron sets x boost/suppress x related/unrelated "
          f"+ clean): engine {engine_s:.2f} s ({engine_s / n:.2f} s per query), full sequences {full_s:.1f} s, "
          f"speed-up {full_s / engine_s:.1f}x; max |log-prob difference| {diff:.2e}; same predictions "
          f"{same}/{len(items)}")
    return {"eval_s": engine_s / n, "eval_engine_s": engine_s, "eval_full_s": full_s, "eval_speedup": full_s / engine_s,
            "max_abs_logprob_diff": diff, "eval_rows": len(items), "eval_queries": n,
            "eval_same_predictions": same == len(items)}


def run_evaluate_bench(model: HookedModel, queries: Sequence[Any], prompts: dict[str, Sequence[Any]], proxy: Any, *,
                       steps: int = 16, max_batch_rows: int = 240, n_boot: int = 1000) -> dict[str, Any]:
    """``locate`` then ``evaluate`` (its default locators and checks) on ``queries`` and their ``prompts``, as
    the command line runs them: seconds per query of each, and evaluate's seconds per stage (``timings``).

    Example:
        >>> run_evaluate_bench(model, queries, prompts, ProxyConfig("mcqa-letter"))["evaluate_s_per_query"]  # doctest: +SKIP
        41.2
    """
    from ..evaluation.judge import EvalConfig, evaluate
    from ..qrnca.ig import IGConfig
    from ..qrnca.locate import LocateConfig, locate

    t0 = time.perf_counter()
    run = locate(model, queries, LocateConfig(proxy, IGConfig(steps=steps, max_batch_rows=max_batch_rows)),
                 prompts=prompts, progress=False)
    locate_s = time.perf_counter() - t0
    assert run is not None  # in memory, unsharded: locate always returns the result
    res = evaluate(model, run, cfg=EvalConfig(n_boot=n_boot), progress=False, save=False)
    t, n = res.timings, len(queries)
    assert t.total is not None  # evaluate always measures its total
    print(f"locate + evaluate of {n} queries ({', '.join(res.meta['methods'])}): locate {locate_s / n:.2f} s per "
          f"query, evaluate {t.total / n:.2f} s per query; evaluate's {t.line()}")
    return {"locate_s_per_query": locate_s / n, "evaluate_s_per_query": t.total / n,
            "evaluate_stage_s": t.to_dict(), "evaluate_queries": n}


def run_bench(model: HookedModel, *, steps: int = 16, reference_layers: int = 3, repeats: int = 3,
              captum: bool = True, max_batch_rows: int = 240, name: str = "model") -> dict[str, Any]:
    from ..data.prompts import ProxyConfig, build_prompts
    from ..data.queries import load_data
    from ..model.access import default_prepend_bos, n_layers
    from ..qrnca.ig import IGConfig, attribute_prompt, attribute_prompts

    pool = load_data("builtin:domains")
    # Two in-context examples bring the letter prompts to about 100-130 tokens with SmolLM2's tokenizer.
    prompts = build_prompts(pool[0], ProxyConfig("mcqa-letter", n_prompts=3, n_shots=2), model.tokenizer,
                            pool=pool, prepend_bos=default_prepend_bos(model))
    tokens = [len(p.tokens) for p in prompts]
    subset = _even_layers(n_layers(model), reference_layers)
    fast_cfg = IGConfig(steps=steps, max_batch_rows=max_batch_rows)
    ref_cfg = IGConfig(steps=steps, method="reference")
    print(f"model {name}: {n_layers(model)} layers; query {pool[0].id!r}, 3 prompts of {tokens} tokens; m = {steps}")
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")

    attribute_prompt(model, prompts[0], fast_cfg, layers=subset[:1])  # warm-up (allocator, kernels)
    # The same call locate makes: the query's prompts together.
    fast_all_s, all_scores = _median_time(lambda: attribute_prompts(model, prompts, fast_cfg), repeats)
    print(f"fast path, all {n_layers(model)} layers, 3 prompts: median {fast_all_s:.2f} s over {repeats} runs")
    fast_rss = _rss_mb()
    fast_sub_s, fast_sub = _median_time(lambda: attribute_prompts(model, prompts, fast_cfg, layers=subset), repeats)
    print(f"fast path, layers {subset}: median {fast_sub_s:.3f} s")
    ref_s, ref = _median_time(lambda: attribute_prompts(model, prompts, ref_cfg, layers=subset), 1)
    print(f"reference path, layers {subset}: {ref_s:.2f} s (one run: it is slow)")
    diff = max(float((f - r).abs().max() / r.abs().max()) for f, r in zip(fast_sub, ref))
    captum_s = _captum_time(model, prompts, subset, steps) if captum else None
    if captum_s is not None:
        print(f"captum LayerIntegratedGradients, layers {subset}: {captum_s:.2f} s "
              "(interpolates every position: different math, time only)")
    # Two queries of each of two groups, each the control of a query of the other group (as evaluate draws).
    a_group = [q for q in pool if q.group == pool[0].group][:2]
    b_group = [q for q in pool if q.group != pool[0].group][:2]
    cfg = ProxyConfig("mcqa-letter", n_prompts=3, n_shots=2)
    eval_queries = [prompts] + [build_prompts(q, cfg, model.tokenizer, pool=pool, prepend_bos=default_prepend_bos(model))
                                for q in [a_group[1], *b_group]]
    evaluation = run_eval_bench(model, eval_queries, [2, 3, 0, 1], all_scores, repeats)
    chosen = [pool[0], a_group[1], *b_group]
    whole = run_evaluate_bench(model, chosen, {q.id: ps for q, ps in zip(chosen, eval_queries)}, cfg, steps=steps,
                               max_batch_rows=max_batch_rows)
    result = {
        "speedup": ref_s / fast_sub_s,
        "fast_s": fast_all_s,
        # The whole commands on the four evaluation queries: locate (IG) and evaluate, seconds per query.
        "locate_s_per_query": whole.pop("locate_s_per_query"),
        "evaluate_s_per_query": whole.pop("evaluate_s_per_query"),
        "reference_s": ref_s,
        "reference_layers": subset,
        "fast_subset_s": fast_sub_s,
        "max_rel_diff": diff,
        # The fast path's peak (model loaded + all layers): what a locate run needs. The whole bench peaks
        # higher because the reference path holds m full-sequence copies and their vocabulary logits.
        "peak_rss_mb": fast_rss,
        "bench_peak_rss_mb": _rss_mb(),
        "captum_s": captum_s,
        "prompt_tokens": tokens,
        "steps": steps,
        "model": name,
        **evaluation,
        **whole,
    }
    print(f"speed-up on identical work: {result['speedup']:.0f}x; max |fast - reference| / max|reference| = {diff:.2e}; "
          f"peak RSS of the fast path {fast_rss:.0f} MB (whole bench, reference and captum included: "
          f"{result['bench_peak_rss_mb']:.0f} MB)")
    return result


def _long_prompts(model: HookedModel, n_tokens: int, n_prompts: int = 3) -> list[Any]:
    """A query's prompts of ``n_tokens`` tokens each: built-in facts as filler, then a real cloze prompt."""
    from dataclasses import replace

    from ..data.prompts import ProxyConfig, build_prompts
    from ..data.queries import load_data
    from ..model.access import default_prepend_bos

    pool = load_data("builtin:facts")
    prompts = build_prompts(pool[0], ProxyConfig("cloze", n_prompts=n_prompts, n_shots=2), model.tokenizer,
                            pool=pool, prepend_bos=default_prepend_bos(model))
    text = "\n".join(f"{q.question} {q.answer}." for q in pool) + "\n"
    filler = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    out = []
    for i, p in enumerate(prompts):
        need = max(0, n_tokens - len(p.tokens))
        reps = filler * (need // max(1, len(filler)) + 2)
        start = (i * 97) % max(1, len(filler))  # each prompt its own filler
        out.append(replace(p, tokens=tuple(reps[start : start + need]) + tuple(p.tokens)))
    return out


def run_long_prompt_bench(model: HookedModel, n_tokens: int, *, steps: int = 16, memory_budget_mb: int | None = None,
                          max_batch_rows: int = 240, name: str = "model") -> dict[str, Any]:
    """Peak RSS and time of the fast path on one query of 3 prompts of ``n_tokens`` tokens."""
    from ..engine.plan import DEFAULT_MAX_PREFIX_TOKENS, Dims, plan_groups, rows_per_chunk
    from ..model.access import n_layers
    from ..qrnca.ig import IGConfig, attribute_prompts

    cfg = IGConfig(steps=steps, max_batch_rows=max_batch_rows,
                   memory_budget_mb=IGConfig().memory_budget_mb if memory_budget_mb is None else memory_budget_mb)
    prompts = _long_prompts(model, n_tokens)
    tokens = [len(p.tokens) for p in prompts]
    d, budget = Dims.of(model), cfg.memory_budget_mb * 2**20
    lengths = [n - 1 for n in tokens]
    per_pass = len(plan_groups(lengths, d, "packed", budget, max(DEFAULT_MAX_PREFIX_TOKENS, max(lengths)))[0])
    rows = rows_per_chunk(d, "packed", sum(lengths[:per_pass]), 1, cfg.max_batch_rows, budget, grad=True)
    print(f"model {name}: {n_layers(model)} layers; 3 prompts of {tokens} tokens; m = {steps}; budget "
          f"{cfg.memory_budget_mb} MB: {per_pass} prompt(s) per pass, {rows} rows per prompt per chunk")
    rss_loaded = _rss_mb()
    t0 = time.perf_counter()
    attribute_prompts(model, prompts, cfg)
    seconds = time.perf_counter() - t0
    result = {
        "long_prompt_tokens": tokens, "fast_s": seconds, "peak_rss_mb": _rss_mb(), "rss_loaded_mb": rss_loaded,
        "memory_budget_mb": cfg.memory_budget_mb, "prompts_per_pass": per_pass, "rows_per_chunk": rows,
        "steps": steps, "model": name,
    }
    print(f"fast path, all layers: {seconds:.1f} s; peak RSS {result['peak_rss_mb']:.0f} MB "
          f"(model loaded: {rss_loaded:.0f} MB)")
    return result
