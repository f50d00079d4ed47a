"""Integrated gradients: fast path == reference path == a plain per-step loop; completeness; guards."""

from __future__ import annotations

import warnings

import pytest
import torch

from builders import has_hooked_transformer, tiny_hooked_transformer
from qrnca_lens.qrnca.ig import IGConfig, alphas, attribute_prompt, attribute_prompts, fast_backend, reference_ig
from qrnca_lens.data.queries import load_data
from qrnca_lens.errors import ModelError, QrncaError
from qrnca_lens.model.hooks import active_hook_count, hooked
from qrnca_lens.model.access import is_gated, mlp_hook_name, n_layers
from qrnca_lens.data.prompts import ProxyConfig, build_prompts


@pytest.fixture(scope="module")
def facts():
    return load_data("builtin:facts")


def _prompt(facts, tok, kind="mcqa-letter", shots=1, qi=0):
    return build_prompts(facts[qi], ProxyConfig(kind, n_prompts=1, n_shots=shots), tok, pool=facts)[0]


def _prob(model, prompt, layer=None, scale=1.0):
    """P(target) with layer ``layer``'s MLP activation at the target position scaled by ``scale``."""
    pos = prompt.target_position
    seq = torch.tensor([list(prompt.tokens) + list(prompt.target[:-1])])
    hooks = []
    if layer is not None:
        def h(act, hook):
            out = act.clone()
            out[:, pos] = act[:, pos] * scale
            return out
        hooks = [(mlp_hook_name(model, layer), h)]
    with torch.no_grad(), hooked(model, fwd=hooks):
        logp = torch.log_softmax(model(seq)[0].double(), -1)
    return float(sum(logp[pos + t, tok] for t, tok in enumerate(prompt.target)).exp())


def _loop_oracle(model, prompt, layer, steps):
    """The paper's Eq. 4 as a plain loop: one forward/backward per step k, batch 1, summed by hand."""
    pos = prompt.target_position
    name = mlp_hook_name(model, layer)
    seq = torch.tensor([list(prompt.tokens) + list(prompt.target[:-1])])
    clean = {}
    with torch.no_grad(), hooked(model, fwd=[(name, lambda a, hook: clean.setdefault("f", a[0, pos].clone()))]):
        model(seq)
    total = torch.zeros_like(clean["f"], dtype=torch.float64)
    for k in range(1, steps + 1):
        x = (clean["f"] * k / steps).clone().requires_grad_(True)

        def put(act, hook):
            out = act.clone()
            out[0, pos] = x
            return out

        with torch.enable_grad(), hooked(model, fwd=[(name, put)]):
            logp = torch.log_softmax(model(seq)[0].float(), -1)
            p = sum(logp[pos + t, tok] for t, tok in enumerate(prompt.target)).exp()
            (g,) = torch.autograd.grad(p, x)
        total += g.double()
    return (clean["f"].double() * total / steps).float()


@pytest.mark.parametrize("kind", ["mcqa-letter", "cloze"])
def test_fast_equals_reference(tiny_model, tiny_tokenizer, facts, kind):
    prompt = _prompt(facts, tiny_tokenizer, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TL-native bridges fall back to the reference path, with a warning
        fast = attribute_prompt(tiny_model, prompt, IGConfig(steps=6, max_batch_rows=7))
    ref = attribute_prompt(tiny_model, prompt, IGConfig(steps=6, method="reference"))
    assert fast.shape == (n_layers(tiny_model), tiny_model.cfg.d_mlp)
    assert ref.abs().max() > 0
    assert (fast - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_reference_equals_the_per_step_loop(tiny_model, tiny_tokenizer, facts):
    prompt = _prompt(facts, tiny_tokenizer, "cloze")
    for layer in (0, 2):
        ref = reference_ig(tiny_model, prompt, layer, steps=5)
        oracle = _loop_oracle(tiny_model, prompt, layer, 5)
        assert (ref - oracle).abs().max() <= 1e-4 * oracle.abs().max()


def test_completeness_per_layer(tiny_gated, tiny_tokenizer, facts):
    """sum_i ig[l, i] -> P(f̄) - P(0) as m grows (Riemann error shrinks)."""
    prompt = _prompt(facts, tiny_tokenizer, "mcqa-letter")
    coarse = attribute_prompt(tiny_gated, prompt, IGConfig(steps=2)).double().sum(-1)
    fine = attribute_prompt(tiny_gated, prompt, IGConfig(steps=128)).double().sum(-1)
    for layer in range(n_layers(tiny_gated)):
        delta = _prob(tiny_gated, prompt) - _prob(tiny_gated, prompt, layer, 0.0)
        assert abs(fine[layer] - delta) <= 0.02 * abs(delta) + 1e-9
        assert abs(fine[layer] - delta) <= abs(coarse[layer] - delta) + 1e-12


def test_chunked_equals_unchunked(tiny_gated, tiny_tokenizer, facts):
    prompt = _prompt(facts, tiny_tokenizer, "cloze")
    whole = attribute_prompt(tiny_gated, prompt, IGConfig(steps=4, max_batch_rows=1000))
    for rows in (1, 3, 4, 9):
        part = attribute_prompt(tiny_gated, prompt, IGConfig(steps=4, max_batch_rows=rows))
        assert (part - whole).abs().max() <= 1e-5 * whole.abs().max()


def test_layer_subset_matches_all_layers(tiny_gated, tiny_tokenizer, facts):
    prompt = _prompt(facts, tiny_tokenizer)
    full = attribute_prompt(tiny_gated, prompt, IGConfig(steps=4))
    sub = attribute_prompt(tiny_gated, prompt, IGConfig(steps=4), layers=[2, 0])
    assert torch.allclose(sub, full[[2, 0]], atol=1e-6 * float(full.abs().max()))


def test_linspace_schedule_is_the_authors():
    assert torch.allclose(alphas(4, "linspace"), torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))
    assert torch.allclose(alphas(4), torch.tensor([0.25, 0.5, 0.75, 1.0]))


def test_linspace_fast_equals_reference(tiny_gated, tiny_tokenizer, facts):
    prompt = _prompt(facts, tiny_tokenizer)
    fast = attribute_prompt(tiny_gated, prompt, IGConfig(steps=5, alpha_schedule="linspace"))
    ref = attribute_prompt(tiny_gated, prompt, IGConfig(steps=5, alpha_schedule="linspace", method="reference"))
    assert (fast - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_leaves_the_model_as_it_was(tiny_model, tiny_tokenizer, facts):
    prompt = _prompt(facts, tiny_tokenizer)
    seq = torch.tensor([prompt.tokens])
    with torch.no_grad():
        before = tiny_model(seq)
    hooks = active_hook_count(tiny_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attribute_prompt(tiny_model, prompt, IGConfig(steps=2))
    assert active_hook_count(tiny_model) == hooks
    assert all(not p.requires_grad and p.grad is None for p in tiny_model.parameters())
    with torch.no_grad():
        assert torch.equal(tiny_model(seq), before)


def test_trainable_parameters_build_no_gradient_and_are_restored(tiny_gated, tiny_tokenizer, facts):
    prompt = _prompt(facts, tiny_tokenizer)
    params = list(tiny_gated.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        attribute_prompt(tiny_gated, prompt, IGConfig(steps=2))
        assert all(p.requires_grad and p.grad is None for p in params)
    finally:
        for p in params:
            p.requires_grad_(False)


def test_works_when_the_caller_disabled_gradients(tiny_gated, tiny_tokenizer, facts):
    prompt = _prompt(facts, tiny_tokenizer)
    free = attribute_prompt(tiny_gated, prompt, IGConfig(steps=3))
    with torch.no_grad():
        inside = attribute_prompt(tiny_gated, prompt, IGConfig(steps=3))
        assert not torch.is_grad_enabled()  # the caller's setting survives the call
    assert torch.equal(free, inside)


def test_inference_mode_is_refused_with_the_fix(tiny_gated, tiny_tokenizer, facts):
    prompt = _prompt(facts, tiny_tokenizer)
    hooks = active_hook_count(tiny_gated)
    with torch.inference_mode():
        with pytest.raises(QrncaError, match="inference_mode"):
            attribute_prompt(tiny_gated, prompt, IGConfig(steps=2))
    assert active_hook_count(tiny_gated) == hooks


def test_plain_mlp_refused_when_gated_is_required(tiny_model, tiny_tokenizer, facts):
    prompt = _prompt(facts, tiny_tokenizer)
    if is_gated(tiny_model):
        pytest.skip("gated model")
    with pytest.raises(ModelError, match="no gated MLP"):
        attribute_prompt(tiny_model, prompt, IGConfig(steps=2, require_gated=True))


def test_nan_scores_are_reported(tiny_tokenizer, facts):
    from builders import tiny_llama_bridge

    model = tiny_llama_bridge(tiny_tokenizer, n_layers=2, seed=3)
    with torch.no_grad():
        model.original_model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    prompt = _prompt(facts, tiny_tokenizer)
    with pytest.raises(QrncaError, match="non-finite attribution scores"):
        attribute_prompt(model, prompt, IGConfig(steps=2))
    assert active_hook_count(model) == 0


def test_backends(tiny_model):
    kind = fast_backend(tiny_model)
    name = type(tiny_model).__name__
    if name == "HookedTransformer":
        assert kind == "batch"
    elif type(tiny_model.original_model).__module__.startswith("transformers"):
        assert kind == "packed"
    else:
        assert kind is None


@pytest.mark.skipif(not has_hooked_transformer(), reason="needs TL 3.x (HookedTransformer)")
def test_a_hooked_transformer_subclass_takes_the_fast_path(tiny_tokenizer, facts):
    """SAELens' HookedSAETransformer and the like are HookedTransformers: same fast path, same scores."""
    from transformer_lens import HookedTransformer

    class MyHT(HookedTransformer):
        pass

    model = tiny_hooked_transformer(tiny_tokenizer, gated=True, cls=MyHT)
    assert fast_backend(model) == "batch"
    prompt = _prompt(facts, tiny_tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reference fallback warns; the fast path must not be skipped
        fast = attribute_prompt(model, prompt, IGConfig(steps=4))
    ref = attribute_prompt(model, prompt, IGConfig(steps=4, method="reference"))
    assert torch.allclose(fast, ref, atol=1e-4 * float(ref.abs().max()))


def test_native_bridge_falls_back_with_a_warning(tiny_tokenizer, facts):
    from builders import tiny_native_bridge

    model = tiny_native_bridge(tiny_tokenizer)
    with pytest.warns(UserWarning, match="reference path"):
        attribute_prompt(model, _prompt(facts, tiny_tokenizer), IGConfig(steps=2), layers=[0])


def test_attribute_prompts_stacks(tiny_gated, tiny_tokenizer, facts):
    prompts = build_prompts(facts[0], ProxyConfig("cloze", n_prompts=2, n_shots=1), tiny_tokenizer, pool=facts)
    both = attribute_prompts(tiny_gated, prompts, IGConfig(steps=2))
    assert both.shape[0] == 2
    alone = attribute_prompt(tiny_gated, prompts[1], IGConfig(steps=2))
    assert (both[1] - alone).abs().max() <= 1e-5 * alone.abs().max()
    with pytest.raises(QrncaError, match="no prompts"):
        attribute_prompts(tiny_gated, [], IGConfig(steps=2))


def test_prompts_of_different_lengths_batch_exactly(tiny_model, tiny_tokenizer, facts):
    """Prompts ride in one pass with right-padded prefixes; padding must not leak into any prompt's rows."""
    prompts = build_prompts(facts[5], ProxyConfig("mcqa-letter", n_prompts=3, n_shots=1), tiny_tokenizer, pool=facts)
    assert len({len(p.tokens) for p in prompts}) > 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batched = attribute_prompts(tiny_model, prompts, IGConfig(steps=3, max_batch_rows=10))
    for p, got in zip(prompts, batched):
        ref = attribute_prompt(tiny_model, p, IGConfig(steps=3, method="reference"))
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.slow
def test_fast_equals_reference_on_smollm2(smollm2, facts):
    prompt = build_prompts(facts[0], ProxyConfig("cloze", n_prompts=1, n_shots=2), smollm2.tokenizer, pool=facts)[0]
    layers = [0, 14, 29]
    fast = attribute_prompt(smollm2, prompt, IGConfig(steps=16), layers=layers)
    ref = attribute_prompt(smollm2, prompt, IGConfig(steps=16, method="reference"), layers=layers)
    assert ref.abs().max() > 0
    assert (fast - ref).abs().max() <= 1e-4 * ref.abs().max()


# ---------------------------------------------------------------- the fast path checks itself


def _break_prefix(prefix, how: str):
    """Break the engine's prefix cache on purpose: ``empty`` (nothing cached: the transformers 5.24 failure,
    every row attends to itself alone) or ``drop`` (layer 1's keys and values zeroed)."""
    if prefix.backend == "packed":
        if how == "empty":
            prefix.P = [0] * len(prefix.P)
            prefix.offsets, prefix.C = [0] * len(prefix.P), 0
            prefix.kv = [(k[:, :, :0], v[:, :, :0]) for k, v in prefix.kv]
        else:
            prefix.kv[1] = tuple(torch.zeros_like(t) for t in prefix.kv[1])
        return
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    for i, cache in enumerate(prefix.caches):
        if how == "empty":
            cache = TransformerLensKeyValueCache.init_cache(prefix.model.cfg, prefix.device, batch_size=1)
            cache.freeze()
            prefix.caches[i] = cache
        else:
            e = cache.entries[1]
            cache.entries[1] = TransformerLensKeyValueCacheEntry(
                past_keys=torch.zeros_like(e.past_keys), past_values=torch.zeros_like(e.past_values), frozen=True)


@pytest.mark.parametrize("how", ["empty", "drop"])
def test_self_check_fails_loudly_on_a_broken_cache(tiny_model, tiny_tokenizer, facts, monkeypatch, how):
    from qrnca_lens.engine import Prefix
    from qrnca_lens.errors import FastPathError

    backend = fast_backend(tiny_model)
    if backend is None:
        pytest.skip("no fast path for this model kind")
    prompt = _prompt(facts, tiny_tokenizer, "cloze", shots=2)
    original = Prefix.__init__

    def broken_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        _break_prefix(self, how)

    monkeypatch.setattr(Prefix, "__init__", broken_init)
    hooks = active_hook_count(tiny_model)
    with pytest.raises(FastPathError, match=r"transformers .*transformer-lens .*method='reference'"):
        attribute_prompt(tiny_model, prompt, IGConfig(steps=3))
    assert active_hook_count(tiny_model) == hooks


def test_self_check_costs_no_extra_forward_on_a_bridge(tiny_gated, tiny_tokenizer, facts, monkeypatch):
    """The prefix pass runs each prompt's target tokens too, so its own logits are the check's reference:
    one forward of the prompts (the prefix pass), not a second plain one per prompt."""
    from qrnca_lens.engine import checks

    calls = []
    monkeypatch.setattr(checks, "plain_logprobs", lambda m, prompt, row: calls.append(len(prompt)))
    prompts = build_prompts(facts[0], ProxyConfig("cloze", n_prompts=3, n_shots=1), tiny_tokenizer, pool=facts)
    embeds = []
    # A torch hook on the embedding module, not a TL hook point: the fast path refuses a caller's hook points.
    embed = tiny_gated.original_model.get_input_embeddings()
    handle = embed.register_forward_hook(lambda mod, args, out: embeds.append(tuple(out.shape[:2])))
    try:
        attribute_prompts(tiny_gated, prompts, IGConfig(steps=4, max_batch_rows=5))
    finally:
        handle.remove()
    assert calls == []
    width = max(len(p.tokens) + len(p.target) - 1 for p in prompts)
    assert sum(1 for shape in embeds if shape[1] >= width - 1) == 1  # one full-length forward: the prefix pass


# ---------------------------------------------------------------- memory stays bounded on long prompts


_SMOLLM2 = dict(n_layers=30, n_heads=9, n_kv_heads=3, d_head=64, d_model=576, d_mlp=1536, d_vocab=49152, act_bytes=4)


def test_row_chunks_shrink_with_the_prefix_and_fit_the_budget():
    from qrnca_lens.engine.plan import Dims, chunk_bytes, plan_groups, prefix_bytes, rows_per_chunk

    d, budget, cap = Dims(**_SMOLLM2), IGConfig().memory_budget_mb * 2**20, IGConfig().max_batch_rows
    plan = {}
    for C in (120, 500, 1000, 2000, 4000):
        groups = plan_groups([C] * 3, d, "packed", budget, max_prefix_tokens=max(512, C))
        b = len(groups[0])
        rows = rows_per_chunk(d, "packed", b * C, 1, cap, budget, grad=True)
        plan[C] = rows
        assert rows <= cap  # max_batch_rows stays the upper bound
        assert chunk_bytes(d, "packed", b * C, rows, grad=True) <= budget
        assert b == 1 or prefix_bytes(d, b, C) <= budget
    assert plan[120] == 240  # short prompts: the old chunks, no slowdown
    assert list(plan.values()) == sorted(plan.values(), reverse=True) and plan[4000] < plan[1000] < plan[120]
    assert len(plan_groups([2000] * 3, d, "packed", budget, max_prefix_tokens=6000)[0]) < 3  # long prompts split
    # The budget moves the plan; the batch backend copies the prefix per row, so it gets fewer rows.
    assert rows_per_chunk(d, "packed", 2000, 1, cap, 4 * budget, grad=True) > rows_per_chunk(d, "packed", 2000, 1, cap, budget, grad=True)
    assert rows_per_chunk(d, "batch", 2000, 1, cap, budget, grad=True) < rows_per_chunk(d, "packed", 2000, 1, cap, budget, grad=True)
    assert rows_per_chunk(d, "packed", 10**5, 1, cap, budget, grad=True) == 1  # never below one row
    # Without a gradient nothing is kept per layer: scoring chunks are larger.
    assert rows_per_chunk(d, "packed", 2000, 1, 10**4, budget, grad=False) > rows_per_chunk(d, "packed", 2000, 1, 10**4, budget, grad=True)


def _long_prompt(n_tokens: int, seed: int = 0):
    from qrnca_lens.data.prompts import Prompt

    g = torch.Generator().manual_seed(seed)
    return Prompt("long", "g", 0, "", tuple(torch.randint(3, 500, (n_tokens,), generator=g).tolist()), (7,))


def _peak_allocated(fn) -> int:
    """Peak bytes held by torch's CPU allocator during ``fn()``, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def test_peak_memory_of_a_long_prompt_stays_within_the_budget(tiny_gated):
    prompt = _long_prompt(450)
    # 600 rows of one layer (rows of different layers would be cut by depth anyway): unbounded, one chunk of
    # ~45 MB on this tiny model.
    cfg = dict(steps=600, max_batch_rows=1000)
    small = _peak_allocated(lambda: attribute_prompt(tiny_gated, prompt, IGConfig(**cfg, memory_budget_mb=16), layers=[1]))
    large = _peak_allocated(lambda: attribute_prompt(tiny_gated, prompt, IGConfig(**cfg, memory_budget_mb=10**5), layers=[1]))
    assert small <= 16 * 2**20
    assert large > 2 * small  # the budget is what bounds it


_RSS_SCRIPT = """
import sys, tempfile, torch
from pathlib import Path
sys.path[:0] = [{tests!r}, {here!r}]
from builders import build_tiny_tokenizer, tiny_llama_bridge
from test_attribution import _long_prompt
from qrnca_lens.qrnca.ig import IGConfig, attribute_prompt
torch.set_num_threads(1)
model = tiny_llama_bridge(build_tiny_tokenizer(Path(tempfile.mkdtemp())))
prompt = _long_prompt(500)
attribute_prompt(model, prompt, IGConfig(steps=2))  # warm-up: allocator, kernels, the prefix pass
# Peak over the resident set at the start of the run, sampled during the run itself: ru_maxrss is a
# process-lifetime high-water mark, so the imports' or the warm-up's own peak could pass for the run's.
import os, threading, time
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page / 2**20
base, peak, done = rss(), [0.0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
t = threading.Thread(target=sample); t.start()
# One layer: rows of different layers are cut into chunks by depth whatever the budget.
attribute_prompt(model, prompt, IGConfig(steps=1200, max_batch_rows=1200, memory_budget_mb={budget}), layers=[1])
done.set(); t.join()
print(max(peak[0], rss()) - base)
"""


def _rss_growth_mb(budget_mb: int) -> float:
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).resolve().parents[2])  # tests/, where builders.py lives
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(tests).parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT.format(tests=tests, here=str(Path(__file__).resolve().parent), budget=budget_mb)], env=env,
                         capture_output=True, text=True, check=True, timeout=600)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two fresh processes measuring RSS: once, in the locked full run, not in every stage
def test_peak_rss_of_a_long_prompt_follows_the_budget():
    """A fresh process each: RSS over the warmed-up baseline while attributing 1,200 rows on a 500-token prefix."""
    bounded, unbounded = _rss_growth_mb(24), _rss_growth_mb(10**5)
    assert bounded < 100  # the allocator's fragmentation on top of a 24 MB plan
    assert unbounded > 2 * bounded + 50


def test_long_prompt_bench_reports_the_plan_and_peak_rss(tiny_gated):
    from qrnca_lens.bench.ig import run_long_prompt_bench

    res = run_long_prompt_bench(tiny_gated, 300, steps=4, memory_budget_mb=2, name="tiny")
    assert res["long_prompt_tokens"] == [300, 300, 300]
    assert res["prompts_per_pass"] < 3 and res["rows_per_chunk"] < 240 // 3  # the small budget shapes the plan
    assert res["peak_rss_mb"] >= res["rss_loaded_mb"] > 0
