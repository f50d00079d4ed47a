"""Attribution patching and direct logit attribution (first_order.py) against plain loops, and as locators.

The ATP oracle takes one layer at a time: a plain full-sequence forward whose hook replaces that layer's
activation by a detached leaf, ``torch.autograd.grad`` of P, then f · grad. The DLA oracle reads no lens:
it loops over neurons with the cached final residual and the final norm written out by hand (checked first
to reproduce the model's own logits), on models with random norm weights and biases.
"""

from __future__ import annotations

import pytest
import torch
from builders import build_tiny, randomise_norms_and_biases

from qrnca_lens.qrnca.ig import IGConfig
from qrnca_lens.data.queries import limit_per_group, load_data
from qrnca_lens.errors import QrncaError
from qrnca_lens.locators.first_order import atp_scores, dla_scores
from qrnca_lens.model.hooks import active_hook_count, hooked, set_neurons
from qrnca_lens.qrnca.locate import LocateConfig, locate
from qrnca_lens.locators.registry import LOCATORS, LocatorContext, neuron_sets, register_locator, report_passes
from qrnca_lens.model.access import mlp_hook_name, n_layers, post_hook_name
from qrnca_lens.data.prompts import ProxyConfig, build_all_prompts

_FRESH: dict[tuple[str, str], object] = {}


@pytest.fixture(scope="module")
def facts():
    return load_data("builtin:facts")


def _prompts(facts, tok, kind, n=2, shots=1):
    built = build_all_prompts(facts[:n], ProxyConfig(kind, n_prompts=2, n_shots=shots), tok, pool=facts)
    return [p for ps in built.values() for p in ps]


def _mixed(facts, tok):
    """Letter prompts (one-token targets, P ~ 1e-3) and cloze prompts (multi-token targets), of several lengths."""
    prompts = _prompts(facts, tok, "mcqa-letter", n=1) + _prompts(facts[1:], tok, "cloze", n=1, shots=2)
    assert len({len(p.tokens) for p in prompts}) > 1 and max(len(p.target) for p in prompts) > 1
    return prompts


def _fresh(kind, tok, what):
    """A private copy of a tiny model: "double" (float64) or "rich" (random norm weights and biases)."""
    if (kind, what) not in _FRESH:
        model = build_tiny(kind, tok)
        if what == "double":
            model = model.to(torch.float64)
        else:
            randomise_norms_and_biases(model, seed=1)
        _FRESH[(kind, what)] = model
    return _FRESH[(kind, what)]


# ---------------------------------------------------------------- attribution patching


def _prob(model, prompt, hooks=()):
    """P(target) from a plain forward (float64 softmax): teacher-forced product over the target's tokens."""
    pos = prompt.target_position
    seq = torch.tensor([list(prompt.tokens) + list(prompt.target[:-1])])
    with hooked(model, fwd=list(hooks)):
        lp = torch.log_softmax(model(seq)[0].double(), -1)
    return sum(lp[pos + k, t] for k, t in enumerate(prompt.target)).exp()


def _oracle_atp(model, prompt, layer):
    """f · dP/df at the target position for one layer: its activation made a leaf by a plain hook."""
    store = {}

    def leaf(act, hook):
        store["x"] = act.detach().clone().requires_grad_(True)
        return store["x"]

    with torch.enable_grad():
        p = _prob(model, prompt, [(mlp_hook_name(model, layer), leaf)])
        (g,) = torch.autograd.grad(p, store["x"])
    pos = prompt.target_position
    return (store["x"][0, pos].double() * g[0, pos].double()).detach()


def test_atp_equals_the_per_layer_oracle(tiny_model, tiny_tokenizer, facts):
    prompts = _mixed(facts, tiny_tokenizer)
    got = atp_scores(tiny_model, prompts, max_batch_tokens=120)  # some prompts share a pass, others do not
    L = n_layers(tiny_model)
    want = torch.stack([torch.stack([_oracle_atp(tiny_model, p, layer) for layer in range(L)]) for p in prompts])
    for b in range(len(prompts)):  # each prompt on its own scale: a cloze P is ~1e-9, a letter's ~1e-3
        scale = float(want[b].abs().max())
        assert scale > 0
        assert torch.allclose(got[b].double(), want[b], rtol=1e-3, atol=1e-4 * scale), (b, float((got[b] - want[b]).abs().max()), scale)
    some = [2, 0]
    assert torch.allclose(atp_scores(tiny_model, prompts[:1], some), got[:1, some], rtol=1e-4, atol=1e-9)
    # One pass per prompt or one for all: the same numbers.
    assert torch.allclose(atp_scores(tiny_model, prompts, max_batch_tokens=1), got, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("kind", ["llama-bridge", "gpt2-bridge", "native-plain-ln"])
def test_atp_is_the_directional_derivative_of_scaling_a_neuron(kind, tiny_tokenizer, facts):
    """Scaling f_i by 1 ± eps changes P by ± eps · f_i · dP/df_i: the zero-ablation estimate -atp is the slope
    towards 0. Symmetric differences (no second-order term), per neuron and for a whole layer (float64 model;
    its float error, ~1e-11 in P (HF computes rotary tables in float32), bounds eps from below)."""
    model = _fresh(kind, tiny_tokenizer, "double")
    prompt = _prompts(facts, tiny_tokenizer, "mcqa-letter", n=1)[0]
    atp = atp_scores(model, [prompt])[0].double()
    pos, eps = prompt.target_position, 1e-2
    with torch.no_grad():
        for layer in range(n_layers(model)):
            name = mlp_hook_name(model, layer)
            picks = [[i] for i in atp[layer].abs().topk(3).indices.tolist()] + [list(range(atp.shape[-1]))]
            for idx in picks:
                up, down = (_prob(model, prompt, [(name, set_neurons(torch.tensor(idx), factor=1 + sign * eps,
                                                                     position=pos))]) for sign in (1, -1))
                slope, est = float((down - up) / (2 * eps)), -float(atp[layer, idx].sum())
                assert abs(est) > 1e-7 and slope == pytest.approx(est, rel=1e-3), (layer, idx[:3], slope, est)


def test_atp_under_no_grad_without_hooks_left_and_refused_in_inference_mode(tiny_llama, tiny_tokenizer, facts):
    model = tiny_llama
    prompts = _prompts(facts, tiny_tokenizer, "mcqa-letter", n=1)
    before = active_hook_count(model)
    free = atp_scores(model, prompts)
    with torch.no_grad():
        assert torch.equal(atp_scores(model, prompts), free)
        assert not torch.is_grad_enabled()  # the caller's setting is back
    assert active_hook_count(model) == before == 0
    assert not any(p.requires_grad for p in model.parameters())
    with torch.inference_mode(), pytest.raises(QrncaError, match="inference_mode"):
        atp_scores(model, prompts)
    with pytest.raises(QrncaError, match="out of range"):
        atp_scores(model, prompts, [n_layers(model)])
    assert active_hook_count(model) == 0


# A failure mid-forward (hooks and grad flags restored) is covered for both by test_public_api's sweep.


# ---------------------------------------------------------------- direct logit attribution


def _acts(model, prompt, names):
    store = {}

    def keep(name):
        def hook(act, hook):
            store[name] = act[0, prompt.target_position].detach().double().clone()
            return act
        return hook

    with torch.no_grad(), hooked(model, fwd=[(n, keep(n)) for n in names]):
        logits = model(torch.tensor([list(prompt.tokens)]))
    return store, logits[0, prompt.target_position].double()


def _norm_by_hand(model):
    """The final norm as written in the model's config: (weight, bias, centred, eps), float64."""
    params = {n.split(".")[-1]: p.detach().double() for n, p in model.ln_final.named_parameters()}
    d = model.cfg.d_model
    w = params.get("weight", params.get("w", torch.ones(d, dtype=torch.float64)))
    b = params.get("bias", params.get("b", torch.zeros(d, dtype=torch.float64)))
    return w, b, model.cfg.normalization_type.startswith("LN"), float(model.cfg.eps)


@pytest.mark.parametrize("kind", ["llama-bridge", "gpt2-bridge", "native-gated", "native-plain-ln"])
def test_dla_equals_the_neuron_loop_and_layers_sum_to_their_mlp_output(kind, tiny_tokenizer, facts):
    model = _fresh(kind, tiny_tokenizer, "rich")
    prompts = _mixed(facts, tiny_tokenizer)
    got = dla_scores(model, prompts, batch_size=2)
    L, dm = n_layers(model), model.cfg.d_mlp
    W_out, W_U = model.W_out.detach().double(), model.W_U.detach().double()
    b_U = model.b_U.detach().double() if getattr(model, "b_U", None) is not None else 0.0
    b_out = getattr(model, "b_out", None) if kind in ("gpt2-bridge", "native-plain-ln") else None
    w, bias, centred, eps = _norm_by_hand(model)
    assert centred == (kind in ("gpt2-bridge", "native-plain-ln"))
    final = f"blocks.{L - 1}.hook_resid_post"
    for b, p in enumerate(prompts):
        names = [final] + [post_hook_name(model, layer) for layer in range(L)]
        names += [f"blocks.{layer}.hook_mlp_out" for layer in range(L)]
        acts, logits = _acts(model, p, names)
        x = acts[final]
        xc = x - x.mean() if centred else x
        s = (xc.pow(2).mean() + eps).sqrt()
        # The hand-written norm is the model's: it reproduces the logits (so the oracle below reads it right).
        assert torch.allclose(xc / s * w @ W_U + bias @ W_U + b_U, logits, atol=1e-4)
        t = p.target[0]
        want = torch.zeros(L, dm, dtype=torch.float64)
        for layer in range(L):
            for i in range(dm):
                v = acts[post_hook_name(model, layer)][i] * W_out[layer, i]
                v = v - v.mean() if centred else v
                want[layer, i] = (v / s * w) @ W_U[:, t]
        assert want.abs().max() > 1e-2
        assert torch.allclose(got[b].double(), want, atol=1e-5, rtol=1e-4), float((got[b] - want).abs().max())
        for layer in range(L):  # the layer's MLP output, less b_out, read through the same frozen norm
            out = acts[f"blocks.{layer}.hook_mlp_out"] - (0.0 if b_out is None else b_out[layer].detach().double())
            out = out - out.mean() if centred else out
            assert float(got[b, layer].double().sum()) == pytest.approx(float((out / s * w) @ W_U[:, t]), abs=1e-4)
    assert torch.allclose(dla_scores(model, prompts, [1], batch_size=8), got[:, [1]], atol=1e-6)


def test_dla_under_no_grad_and_through_gemmas_post_norms(tiny_llama, tiny_tokenizer, facts):
    from builders import tiny_gemma3_bridge

    prompts = _prompts(facts, tiny_tokenizer, "mcqa-letter", n=1)
    free = dla_scores(tiny_llama, prompts)
    with torch.no_grad():
        assert torch.equal(dla_scores(tiny_llama, prompts), free)
    # Gemma-3: (1 + w) RMSNorms and a post-MLP norm. A layer's neurons, each written through the post-norm and
    # the final norm with their scales frozen from the real forward, add up to the layer's normed MLP output
    # (what the block adds to the residual) read through the frozen final norm.
    gemma = tiny_gemma3_bridge(tiny_tokenizer)
    got = dla_scores(gemma, prompts)
    L = n_layers(gemma)
    final = f"blocks.{L - 1}.hook_resid_post"
    names = [final] + [f"blocks.{layer}.hook_mlp_out" for layer in range(L)]
    for b, p in enumerate(prompts):
        acts, logits = _acts(gemma, p, names)
        x = acts[final]
        eps = float(getattr(gemma.cfg, "eps", 1e-6))
        s = (x.pow(2).mean() + eps).sqrt()
        w = gemma.ln_final.w.detach().double() + 1.0  # the bridge keeps Gemma's raw w (offset on the norm)
        W_U = gemma.W_U.detach().double()
        assert torch.allclose(x / s * w @ W_U, logits, atol=1e-4)  # the hand-written final norm is the model's
        t = p.target[0]
        for layer in range(L):
            want = (acts[f"blocks.{layer}.hook_mlp_out"] / s * w) @ W_U[:, t]
            assert float(got[b, layer].double().sum()) == pytest.approx(float(want), abs=1e-4, rel=1e-4)
    assert active_hook_count(tiny_llama) == active_hook_count(gemma) == 0


# ---------------------------------------------------------------- as locators, with their cost


@pytest.fixture(scope="module")
def run_setup(tiny_llama, tiny_tokenizer, facts):
    queries = limit_per_group(facts, 1)  # five groups: enough for ICA and common neurons
    run = locate(tiny_llama, queries, LocateConfig(ProxyConfig("cloze", n_prompts=2, n_shots=1), IGConfig(steps=2)),
                 pool=facts, progress=False)
    prompts = build_all_prompts(queries, run.config.proxy, tiny_tokenizer, pool=facts)
    return queries, run, prompts


def test_atp_and_dla_locators_rank_by_the_mean_score_and_record_their_cost(tiny_llama, run_setup):
    queries, run, prompts = run_setup
    ctx = LocatorContext(tiny_llama, queries, prompts, run, 0)
    methods = ["qrnca", "kn", "activation", "atp", "dla", "random"]
    sets = neuron_sets(methods, ctx)
    n_prompts = sum(len(prompts[q.id]) for q in queries)
    for q in queries:
        n = len(run.qr_neurons(q.id))
        for name, scorer in (("atp", atp_scores), ("dla", dla_scores)):
            mean = scorer(tiny_llama, prompts[q.id], run.layers).mean(0)
            got = sets[name][q.id]
            assert len(got) == n
            # best first, each neuron's score the mean over prompts, nothing left out above the last one kept
            assert [x for _, _, x in got] == sorted((x for _, _, x in got), reverse=True)
            for layer, i, x in got:
                assert x == pytest.approx(float(mean[run.layers.index(layer), i]), rel=1e-5, abs=1e-12)
            if n:
                assert int((mean > got[n - 1][2] * (1 + 1e-6) + 1e-12).sum()) <= n
    passes = {m: ctx.costs[m]["passes"] for m in methods}
    assert passes == {"qrnca": 0, "kn": 0, "activation": n_prompts, "atp": 2 * n_prompts, "dla": n_prompts,
                      "random": 0}
    for m in methods:
        c = ctx.costs[m]
        assert c["seconds"] > 0 and c["seconds_per_query"] == pytest.approx(c["seconds"] / len(queries))
    stored = ctx.costs["qrnca"]["stored_attribution_seconds"]  # locate stores its IG time per query
    assert isinstance(stored, float) and stored > 0
    assert "stored_attribution_seconds" not in ctx.costs["atp"]


def test_costs_of_a_custom_locator_and_a_second_call(tiny_llama, run_setup):
    queries, run, prompts = run_setup
    ctx = LocatorContext(tiny_llama, queries, prompts, run, 0)

    @register_locator("test-silent")
    def silent(c):
        return {q.id: [(0, i, 1.0) for i in range(3)] for q in c.queries}

    @register_locator("test-counted")
    def counted(c):
        report_passes(c, "test-counted", 7)
        return silent(c)

    try:
        neuron_sets(["test-silent", "test-counted"], ctx)
        assert ctx.costs["test-silent"]["passes"] is None and ctx.costs["test-counted"]["passes"] == 7
        ctx.costs["test-counted"]["passes"] = 99
        neuron_sets(["test-counted"], ctx)  # measured afresh, not merged with the old entry
        assert ctx.costs["test-counted"]["passes"] == 7
    finally:
        LOCATORS.pop("test-silent")
        LOCATORS.pop("test-counted")
