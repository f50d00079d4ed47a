"""Benchmark of the log-probability lens (``qrnca_lens.lens``) on a real model: exact mode, top-K mode, agreement.

Prompts: the built-in facts as cloze prompts (``ProxyConfig("cloze")``, 3 templates per query), the first
``n_prompts`` of them. Measured, in one process:

- ``forward_s``: the forward pass with its cache (``lens_cache``), per prompt.
- ``exact_s``: every FFN neuron's exact score (``neuron_scores``, series engine), per prompt amortised over
  batches of ``batch_size`` prompts; the products W_out[l] · U are computed once per layer and batch
  (``exact_cpu_s``: the process's CPU time, less sensitive to other processes on a shared machine).
- ``direct_layer_s``: the textbook floor for comparison: one logsumexp over the vocabulary per neuron, per layer
  and prompt, timed on ``direct_layers`` layers of one prompt; ``direct_s_est`` extrapolates it to all layers.
  ``series_vs_direct_max_diff``: the largest difference between the two engines' scores on those layers.
- ``topk_s``: the top-K mode (first-order bound + exact rescoring) for the top ``k``, per prompt;
  ``certified``: the share of prompts whose top k is certified exact; ``mean_rescored``: neurons scored exactly.
- ``agreement``: the share of prompts whose top-k set equals exact mode's.

The last line printed is one JSON object. This is a benchmark, not a test: numbers depend on the machine and
its load (``load_avg`` is recorded). From the shell::

    python -m qrnca_lens.bench.lens --prompts 32 --batch-size 32 --threads 1

Example:
    >>> res = run_lens_bench(load_model("smollm2"), n_prompts=12)   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any

import torch

from ..data.prompts import ProxyConfig, build_all_prompts
from ..data.queries import load_data
from ..lens.cache import lens_cache, scoring_weights
from ..lens.config import LensConfig
from ..lens.exact import neuron_scores, top_neurons
from ..lens.lse import layer_neuron_scores
from ..model.access import default_prepend_bos, model_name, n_layers, tokenizer_of
from ..protocols import HookedModel

__all__ = ["run_lens_bench"]


def _prompts(model: HookedModel, n_prompts: int) -> list[Any]:
    pool = load_data("builtin:facts")
    cfg = ProxyConfig("cloze")
    n_queries = -(-n_prompts // cfg.n_prompts)
    bos = default_prepend_bos(model)
    built = build_all_prompts(pool[:n_queries], cfg, tokenizer_of(model), pool=pool, prepend_bos=bos)
    return [p for ps in built.values() for p in ps][:n_prompts]


def run_lens_bench(
    model: HookedModel, n_prompts: int = 32, *, batch_size: int = 32, k: int = 10, direct_layers: int = 2,
    threads: int | None = None, verbose: bool = True,
) -> dict[str, Any]:
    """Time exact and top-K modes on ``n_prompts`` cloze prompts; print a summary and, last, one JSON line.

    ``threads``: torch's intra-op threads for the run (restored afterwards). On a machine whose cores are busy
    with other processes, 1 thread can be several times faster than 2 (a thread waiting for a descheduled
    sibling at every operation); the default keeps torch's setting.
    """
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(model, n_prompts, batch_size, k, direct_layers, verbose)
    finally:
        torch.set_num_threads(old_threads)


def _run(model: HookedModel, n_prompts: int, batch_size: int, k: int, direct_layers: int, verbose: bool) -> dict[str, Any]:
    prompts = _prompts(model, n_prompts)
    n = len(prompts)
    L = n_layers(model)
    say = print if verbose else (lambda *a, **kw: None)
    say(f"[lens-bench] {model_name(model)}: {n} prompts of {min(len(p.tokens) for p in prompts)}-"
        f"{max(len(p.tokens) for p in prompts)} tokens, {L} layers x {model.cfg.d_mlp} neurons, vocab {model.cfg.d_vocab}, "
        f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")

    with torch.no_grad():
        lens_cache(model, prompts[:1])  # warm-up
        t0 = time.perf_counter()
        for i in range(0, n, batch_size):
            lens_cache(model, prompts[i : i + batch_size])
        forward_s = (time.perf_counter() - t0) / n
    say(f"[lens-bench] forward + cache: {forward_s:.3f} s/prompt")

    t0, c0 = time.perf_counter(), time.process_time()
    exact = neuron_scores(model, prompts, LensConfig(batch_size=batch_size))
    exact_s, exact_cpu_s = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
    say(f"[lens-bench] exact mode (series engine), all neurons: {exact_s:.3f} s/prompt "
        f"(process CPU {exact_cpu_s:.3f} s/prompt)")

    # the textbook floor, on a few layers of one prompt
    W_out = scoring_weights(model, prompts)
    layers = sorted({round(i * (L - 1) / max(1, direct_layers - 1)) for i in range(direct_layers)})
    with torch.no_grad():
        c = lens_cache(model, prompts[:1])
        base, a = c.base_logits(), c.coefficients
        t0 = time.perf_counter()
        direct = [layer_neuron_scores(W_out[l], c.lens.U, base[:, l], a[:, l], c.targets, LensConfig(engine="direct"))[0].cpu()
                  for l in layers]
        direct_layer_s = (time.perf_counter() - t0) / len(layers)
    diff = max(float((d - exact[0, l]).abs().max()) for d, l in zip(direct, layers))
    say(f"[lens-bench] direct engine (one logsumexp per neuron): {direct_layer_s:.3f} s per layer and prompt "
        f"(~{direct_layer_s * L:.1f} s/prompt); max |series - direct| = {diff:.2e} on layers {layers}")

    t0, c0 = time.perf_counter(), time.process_time()
    fast = top_neurons(model, prompts, k=k, cfg=LensConfig(mode="topk", batch_size=batch_size))
    topk_s, topk_cpu_s = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
    agree = 0
    for e, f in zip(exact, fast):
        idx = torch.topk(e.flatten(), k).indices
        want = {(int(i) // e.shape[1], int(i) % e.shape[1]) for i in idx}
        agree += want == {tuple(x) for x in f.neurons.tolist()}
    certified = sum(f.certified for f in fast) / n
    rescored = sum(f.rescored for f in fast) / n
    say(f"[lens-bench] top-{k} mode: {topk_s:.3f} s/prompt (CPU {topk_cpu_s:.3f}), {certified:.0%} certified, {rescored:.0f} neurons rescored "
        f"per prompt; same top-{k} as exact mode on {agree}/{n} prompts")
    res = {
        "model": model_name(model), "n_prompts": n, "batch_size": batch_size, "k": k,
        "forward_s": forward_s, "exact_s": exact_s, "exact_cpu_s": exact_cpu_s, "direct_layer_s": direct_layer_s,
        "direct_s_est": direct_layer_s * L, "series_vs_direct_max_diff": diff, "topk_s": topk_s, "topk_cpu_s": topk_cpu_s,
        "certified": certified, "mean_rescored": rescored, "agreement": agree / n,
        "threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0], "machine": platform.machine(),
    }
    say(json.dumps(res))
    return res


if __name__ == "__main__":  # pragma: no cover
    import argparse

    from ..model.loading import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    run_lens_bench(load_model(args.model), args.prompts, batch_size=args.batch_size, threads=args.threads)
