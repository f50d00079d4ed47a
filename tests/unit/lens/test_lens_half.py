"""The log-probability lens on bfloat16 / float16 models: it runs, agrees with float32, and still catches a break.

A half-precision model's activations at the targets are upcast and the lens runs in float32; its self-check
compares it with the model's own (half-precision) log-probabilities within max(check_tol, 4 eps |z|max). The
tolerance grows with the dtype, so the breaks below (a lens that forgot the final norm's weight, a final-norm
scale off by 10 %, FFN activations read one position early) must be caught in every dtype, not only float32.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from builders import TINY_KINDS_BRIDGE, TINY_KINDS_HT, build_tiny, has_hooked_transformer, randomise_norms_and_biases

from qrnca_lens.data.queries import load_data
from qrnca_lens.errors import ModelError
from qrnca_lens.lens import LensConfig, ablation_metrics, lens_cache, neuron_scores, top_neurons
from qrnca_lens.lens import cache as cache_mod
from qrnca_lens.model.access import W_U, n_layers
from qrnca_lens.data.prompts import ProxyConfig, build_all_prompts
from qrnca_lens.model.readout import logprobs_at

KINDS = TINY_KINDS_BRIDGE + (TINY_KINDS_HT if has_hooked_transformer() else ())
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_BUILT: dict[tuple[str, torch.dtype], object] = {}


def _model(kind, tok, dtype):
    """A fresh tiny model with random norm weights and biases, in ``dtype`` (built once per module)."""
    key = (kind, dtype)
    if key not in _BUILT:
        torch.manual_seed(0)
        model = build_tiny(kind, tok)
        randomise_norms_and_biases(model)
        _BUILT[key] = model.to(dtype)
    return _BUILT[key]


@pytest.fixture(scope="module")
def facts():
    return load_data("builtin:facts")


def _prompts(facts, tok, n=3):
    built = build_all_prompts(facts[:n], ProxyConfig("cloze", n_prompts=1, n_shots=1), tok, pool=facts)
    return [p for ps in built.values() for p in ps]


def _top(scores, k):
    return set(torch.topk(scores.flatten(), k).indices.tolist())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", KINDS)
def test_lens_runs_in_half_precision_and_agrees_with_float32(kind, dtype, tiny_tokenizer, facts):
    prompts = _prompts(facts, tiny_tokenizer)
    half, full = _model(kind, tiny_tokenizer, dtype), _model(kind, tiny_tokenizer, torch.float32)
    c = lens_cache(half, prompts)
    assert c.final.dtype == torch.float32 and c.post.dtype == torch.float32
    # model_logp is the float32 head on the model's own half-precision residual (what the engine rows read)
    ids = torch.tensor([list(p.tokens) for p in prompts[:1]])
    own = logprobs_at(half, ids, [[prompts[0].target_position]])[0][0, prompts[0].target[0]]
    assert abs(float(c.model_logp[0]) - float(own)) < 1e-4
    # and it is the float32 model's up to the half-precision forward's own error
    c32 = lens_cache(full, prompts)
    assert torch.allclose(c.model_logp, c32.model_logp, atol=0.05)
    s, s32 = neuron_scores(half, prompts), neuron_scores(full, prompts)
    assert torch.isfinite(s).all()
    for a, b in zip(s, s32):
        assert len(_top(a, 10) & _top(b, 10)) >= 7
    tops = top_neurons(half, prompts, k=5, cfg=LensConfig(mode="topk"))
    for t, a in zip(tops, s):
        assert t.certified
        assert {tuple(x) for x in t.neurons.tolist()} == {(int(i) // a.shape[1], int(i) % a.shape[1]) for i in _top(a, 5)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_ablation_metrics_read_float32_logits_in_half_precision(dtype, tiny_tokenizer, facts):
    prompts = _prompts(facts, tiny_tokenizer)
    half = _model("llama-bridge", tiny_tokenizer, dtype)
    got = ablation_metrics(half, prompts)
    ref = ablation_metrics(_model("llama-bridge", tiny_tokenizer, torch.float32), prompts)
    for i, p in enumerate(prompts):
        lp = logprobs_at(half, torch.tensor([list(p.tokens)]), [[p.target_position]])[0][0]
        assert abs(float(got["logprob"][i]) - float(lp[p.target[0]])) < 1e-5
        assert float(got["rr"][i]) == pytest.approx(1.0 / float(1 + (lp > lp[p.target[0]]).sum()))
    assert torch.allclose(got["logprob"], ref["logprob"], atol=0.05)


def _forgot_the_norm_weight(monkeypatch):
    """The lens built from W_U alone, as if the final norm had no weight (the tiny models' are 1 ± 0.5)."""
    real = cache_mod.frozen_lens

    def broken(model):
        lens = real(model)
        U = W_U(model).detach().float()
        return dataclasses.replace(lens, U=(U - U.mean(0, keepdim=True)) if lens.centered else U)

    monkeypatch.setattr(cache_mod, "frozen_lens", broken)


def _scale_off(monkeypatch):
    """The final norm's frozen scale 10 % too large."""
    real = cache_mod._real_logits

    def broken(model, final):
        logits, s, own = real(model, final)
        if s is None:
            x = cache_mod.frozen_lens(model).center(final)
            s = (x.pow(2).mean(-1) + float(getattr(model.cfg, "eps", 1e-5))).sqrt()
        return logits, s * 1.1, own

    monkeypatch.setattr(cache_mod, "_real_logits", broken)


def _post_one_early(monkeypatch):
    """The FFN activations (hook_post) read one position before the target: the decomposition breaks."""
    real = cache_mod._at_targets

    def broken(store, key, rows, pos):
        return real(store, key, rows, pos - 1 if key.endswith("hook_post") else pos)

    monkeypatch.setattr(cache_mod, "_at_targets", broken)


BREAKS = {"norm-weight": (_forgot_the_norm_weight, "log-probabilities"),
          "scale": (_scale_off, "log-probabilities"),
          "post-position": (_post_one_early, "does not decompose")}


@pytest.mark.parametrize(("dtype", "loose"), [(torch.float32, False), (torch.bfloat16, False), (torch.float16, False),
                                             (torch.bfloat16, True), (torch.float16, True)],
                         ids=["fp32", "bf16", "fp16", "bf16-loose", "fp16-loose"])
@pytest.mark.parametrize("brk", sorted(BREAKS))
@pytest.mark.parametrize("kind", KINDS)
def test_a_broken_lens_is_caught_in_every_dtype(kind, brk, dtype, loose, tiny_tokenizer, facts, monkeypatch):
    """``loose``: as if the model's float32 head rounded to its dtype (TL 3.x's RMSNorm), so that only the
    dtype tolerance max(check_tol, 4 eps |z|max) applies: the breaks are still caught."""
    prompts = _prompts(facts, tiny_tokenizer)
    model = _model(kind, tiny_tokenizer, dtype)
    if loose:
        monkeypatch.setattr(cache_mod, "_float_head", lambda model, final: False)
    lens_cache(model, prompts)  # sound: passes
    breaker, says = BREAKS[brk]
    breaker(monkeypatch)
    with pytest.raises(ModelError, match=says):
        lens_cache(model, prompts)


def test_the_tolerance_is_the_dtype_formula():
    tol = cache_mod._lens_tolerance
    assert tol(torch.float32, 1e-3, 31.0) == 1e-3 and tol(torch.float64, 1e-3, 31.0) == 1e-3
    assert tol(torch.bfloat16, 1e-3, 31.0) == pytest.approx(4 * 2**-7 * 31)  # ~1 nat: bf16 steps 0.125 at |31|
    assert tol(torch.float16, 1e-3, 31.0) == pytest.approx(4 * 2**-10 * 31)
    assert tol(torch.float16, 1e-3, 0.1) == 1e-3  # never tighter than float32's


def test_an_overflowed_float16_activation_is_refused_by_name(tiny_tokenizer, facts):
    prompts = _prompts(facts, tiny_tokenizer, n=1)
    torch.manual_seed(0)
    model = build_tiny("llama-bridge", tiny_tokenizer).to(torch.float16)
    layer = n_layers(model) - 1

    def overflow(act, hook):
        return act + 7e4  # float16's largest finite value is 65504: this sum is inf

    with model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_mid", overflow)]):
        with pytest.raises(ModelError, match=r"float16 forward gives inf/nan in blocks\.\d+\.\S+ at the target"):
            lens_cache(model, prompts)


# ---------------------------------------------------------------- the real model


def _smol_prompts(model, n=6):
    pool = load_data("builtin:facts")
    built = build_all_prompts(pool[:n], ProxyConfig("cloze", n_prompts=1), model.tokenizer, pool=pool)
    return [p for ps in built.values() for p in ps]


@pytest.fixture(scope="module")
def smollm2_fp32_top20(smollm2):
    prompts = _smol_prompts(smollm2)
    return prompts, top_neurons(smollm2, prompts, k=20, cfg=LensConfig(mode="topk"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_smollm2_lens_in_half_precision_agrees_with_float32(dtype, smollm2_fp32_top20):
    from qrnca_lens.model.loading import load_model

    prompts, ref = smollm2_fp32_top20
    model = load_model("smollm2", dtype=dtype)
    c = lens_cache(model, prompts)  # the self-check passes (it refused before: 0.165 / 0.0193 nats > 1e-3)
    assert c.model_logp.isfinite().all()
    got = top_neurons(model, prompts, k=20, cfg=LensConfig(mode="topk"))
    common = [len({tuple(x) for x in a.neurons.tolist()} & {tuple(x) for x in b.neurons.tolist()})
              for a, b in zip(got, ref)]
    assert all(g.certified for g in got)
    assert min(common) >= 15, common  # measured: README, "Half precision and GPUs"
