"""bfloat16 / float16 models on the fast paths: the self-check's dtype tolerance still catches a broken cache,
IG does not underflow, a caller's hooks are named, and the scores agree with float32."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from builders import build_tiny
from qrnca_lens.qrnca.ig import IGConfig, _check_nonzero, attribute_prompt, fast_backend
from qrnca_lens.data.queries import load_data
from qrnca_lens.engine import Prefix, Row, run_rows
from qrnca_lens.engine.checks import check_tolerance, gap_to_plain, off_rows
from qrnca_lens.errors import FastPathError, QrncaError
from qrnca_lens.model.hooks import active_hook_count, hooked_points
from qrnca_lens.model.loading import load_model
from qrnca_lens.data.prompts import ProxyConfig, build_prompts
from test_attribution import _break_prefix

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = ["fp32", "bf16", "fp16"]


@pytest.fixture(scope="module")
def facts():
    return load_data("builtin:facts")


def _as(model, dtype, kind="llama-bridge", tok=None):
    """The model in ``dtype``: a fresh build (the session's tiny models stay float32; a deep-copied TL bridge
    is not independent of its original: TL's capture hooks are closures over the original's modules)."""
    if dtype == torch.float32:
        return model
    if kind == "smollm2":
        return load_model("smollm2", dtype=dtype)
    return build_tiny(kind, tok).to(dtype)


def _prompt(facts, tok, shots=2, qi=0):
    return build_prompts(facts[qi], ProxyConfig("cloze", n_prompts=1, n_shots=shots), tok, pool=facts)[0]


# ---------------------------------------------------------------- the tolerance formula


def test_the_tolerance_is_the_stated_formula():
    assert check_tolerance(torch.float32) == check_tolerance(torch.float32, 45.0) == 1e-3
    assert check_tolerance(torch.float64, 45.0) == 1e-6
    assert check_tolerance(torch.bfloat16, 45.0) == pytest.approx(2 * 2**-7 * 45.0)
    assert check_tolerance(torch.float16, 45.0) == pytest.approx(2 * 2**-10 * 45.0)
    assert check_tolerance(torch.bfloat16, 0.01) == 1e-3  # never below float32's
    assert check_tolerance(torch.bfloat16) == 5e-2  # no spread known


def test_the_gap_covers_live_tokens_and_the_target_whatever_its_probability():
    plain = torch.log_softmax(torch.tensor([[10.0, 0.0, -10.0, -20.0]]), -1)  # token 3: p ~ 1e-13, not live
    row = plain.clone()
    row[0, 3] += 0.5
    assert float(gap_to_plain(row, plain)[0]) == 0.0  # the far tail alone says nothing
    diff, spread = gap_to_plain(row, plain, targets=[3]).tolist()
    assert diff == pytest.approx(0.5) and spread == pytest.approx(30.0)
    gaps = torch.stack([gap_to_plain(row, plain, [3]), gap_to_plain(plain, plain, [3])])
    assert [i for i, _, _ in off_rows(gaps, torch.float32)] == [0]
    assert [(i, round(t, 3)) for i, _, t in off_rows(gaps, torch.bfloat16)] == [(0, 0.469)]  # 2 * 2**-7 * 30
    row[0, 3] -= 0.1  # 0.4 nats: within bfloat16's rounding at this spread, not float32's
    gaps = gap_to_plain(row, plain, [3])[None]
    assert off_rows(gaps, torch.bfloat16) == [] and len(off_rows(gaps, torch.float32)) == 1


# ---------------------------------------------------------------- a broken cache is caught in every dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("how", ["empty", "drop"])
@pytest.mark.parametrize("kind", ["llama-bridge", "gpt2-bridge"])
def test_a_broken_cache_is_caught_in_every_dtype(kind, tiny_tokenizer, facts, monkeypatch, how, dtype):
    model = build_tiny(kind, tiny_tokenizer).to(dtype)
    assert fast_backend(model) == "packed"
    prompt = _prompt(facts, tiny_tokenizer)
    attribute_prompt(model, prompt, IGConfig(steps=3))  # the intact cache passes its check in this dtype
    original = Prefix.__init__

    def broken_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        _break_prefix(self, how)

    monkeypatch.setattr(Prefix, "__init__", broken_init)
    with pytest.raises(FastPathError, match=r"tolerance .* in (float32|bfloat16|float16).*hook of yours.*"
                                            r"transformers .*method='reference'") as e:
        attribute_prompt(model, prompt, IGConfig(steps=3))
    assert str(dtype).replace("torch.", "") in str(e.value)
    assert active_hook_count(model) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_a_broken_engine_cache_is_caught_in_every_dtype(tiny_llama, tiny_tokenizer, facts, monkeypatch, dtype):
    model = _as(tiny_llama, dtype, tok=tiny_tokenizer)
    prompt = _prompt(facts, tiny_tokenizer)
    rows = [Row(0, (prompt.tokens[-1],)), Row(0, (prompt.tokens[-1],), ((1, (0, 1, 2), 0.0),))]
    run_rows(model, [list(prompt.tokens)], rows, lambda r, lp, a: lp)  # intact: passes
    orig = Prefix._fill_packed

    def broken(self, record, continuations):
        orig(self, record, continuations)
        self.kv = [(k * 0, v * 0) for k, v in self.kv]

    monkeypatch.setattr(Prefix, "_fill_packed", broken)
    with pytest.raises(FastPathError, match="plain forward"):
        run_rows(model, [list(prompt.tokens)], rows, lambda r, lp, a: lp)
    assert active_hook_count(model) == 0


# ---------------------------------------------------------------- agreement with float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=IDS[1:])
def test_half_precision_scores_agree_with_float32(tiny_llama, tiny_tokenizer, facts, dtype):
    prompt = _prompt(facts, tiny_tokenizer)
    ref = attribute_prompt(tiny_llama, prompt, IGConfig(steps=8))
    got = attribute_prompt(_as(tiny_llama, dtype, tok=tiny_tokenizer), prompt, IGConfig(steps=8))
    assert got.dtype == torch.float32 and got.abs().max() > 0
    # bf16 keeps 8 bits of mantissa: scores agree to a few percent of the largest
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()
    for layer in range(ref.shape[0]):
        top = set(ref[layer].abs().topk(8).indices.tolist())
        assert len(top & set(got[layer].abs().topk(8).indices.tolist())) >= 6


# ---------------------------------------------------------------- no silent underflow


def test_an_unlikely_multi_token_target_does_not_underflow_in_float16(tiny_llama, tiny_tokenizer, facts):
    """A 3-token target of a random tiny model: P ~ 1e-8, whose gradient flushes to 0 in float16 unless the
    backward runs on log P (the issue's case: every score 0, no warning)."""
    base = _prompt(facts, tiny_tokenizer)
    prompt = dataclasses.replace(base, target=(7, 11, 13))
    model16 = _as(tiny_llama, torch.float16, tok=tiny_tokenizer)
    from qrnca_lens.model.readout import logprobs_at

    seq = torch.tensor([list(prompt.tokens) + list(prompt.target[:-1])])
    lp = logprobs_at(tiny_llama, seq, [range(prompt.target_position, prompt.target_position + 3)])[0]
    P = float(lp[torch.arange(3), torch.tensor(prompt.target)].sum().exp())
    assert P < 1e-6  # the case: dP/df is far below float16's smallest subnormal (6e-8) in its backward
    ref = attribute_prompt(tiny_llama, prompt, IGConfig(steps=4))
    for method in ("fast", "reference"):
        got = attribute_prompt(model16, prompt, IGConfig(steps=4, method=method))
        assert bool((got != 0).any(dim=-1).all()), method  # every layer has nonzero scores
        assert (got - ref).abs().max() <= 0.05 * ref.abs().max(), method


def test_all_zero_scores_are_refused_naming_the_dtype(tiny_tokenizer, facts):
    prompt = _prompt(facts, tiny_tokenizer)
    zero = torch.zeros(3, 8)
    with pytest.raises(QrncaError, match=r"exactly 0 in float16 while P\(target\) = 0\.3.*float32"):
        _check_nonzero(zero, prompt, [0, 1, 2], 0.3, torch.float16)
    assert _check_nonzero(zero, prompt, [0, 1, 2], 1.0, torch.float32) is zero  # P = 1: nothing to attribute
    one_dead = torch.ones(3, 8)
    one_dead[1] = 0
    with pytest.warns(UserWarning, match=r"layers \[5\] are exactly 0 in bfloat16"):
        _check_nonzero(one_dead, prompt, [4, 5, 6], 0.3, torch.bfloat16)
    with pytest.warns(UserWarning, match=r"layers \[0, 1, 2\] are exactly 0 in float16"):
        _check_nonzero(zero, prompt, [0, 1, 2], None, torch.float16)  # P unknown (reference path): a warning


# ---------------------------------------------------------------- the caller's hooks


def test_a_callers_hook_is_named_in_one_line(tiny_llama, tiny_tokenizer, facts):
    prompt = _prompt(facts, tiny_tokenizer)

    def push_last(act, hook):
        act[:, -1] += 3
        return act

    with tiny_llama.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", push_last)]):
        assert hooked_points(tiny_llama) == ["blocks.1.hook_in = blocks.1.hook_resid_pre"]
        with pytest.raises(FastPathError) as e:
            attribute_prompt(tiny_llama, prompt, IGConfig(steps=2))
        msg = str(e.value)
        assert "\n" not in msg and "blocks.1.hook_resid_pre" in msg and "method='reference'" in msg
        assert "reset_hooks" in msg and "versions" not in msg
        with pytest.raises(FastPathError, match=r"blocks\.1\.hook_resid_pre.*engine=False"):
            run_rows(tiny_llama, [list(prompt.tokens)], [Row(0, (prompt.tokens[-1],))], lambda r, lp, a: lp)
        from qrnca_lens import accuracy

        with pytest.raises(FastPathError, match="engine=False"):
            accuracy(tiny_llama, facts[:2], ProxyConfig("cloze", n_prompts=1, n_shots=1), pool=facts)
        assert accuracy(tiny_llama, facts[:2], ProxyConfig("cloze", n_prompts=1, n_shots=1), pool=facts,
                        engine=False).n == 2
        # the ways out: the reference path runs the hook as it is, and "auto" takes it without a word
        ref = attribute_prompt(tiny_llama, prompt, IGConfig(steps=2, method="reference"))
        auto = attribute_prompt(tiny_llama, prompt, IGConfig(steps=2, method="auto"))
        assert torch.equal(ref, auto)
        assert hooked_points(tiny_llama) == ["blocks.1.hook_in = blocks.1.hook_resid_pre"]  # the caller's hook is left alone
    assert hooked_points(tiny_llama) == []
    plain = attribute_prompt(tiny_llama, prompt, IGConfig(steps=2, method="reference"))
    assert (plain - ref).abs().max() > 1e-2 * ref.abs().max()  # the hook did act on the reference path


# ---------------------------------------------------------------- SmolLM2 in half precision (slow)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=IDS[1:])
def test_smollm2_fast_path_in_half_precision_agrees_with_float32(smollm2, facts, dtype):
    """The issue's case: bf16 raised a false FastPathError on 5 of 6 prompts. Now every prompt passes its
    self-check and the top-20 neurons of layers 0, 14, 29 share at least 15 with float32's."""
    prompts = build_prompts(facts[0], ProxyConfig("cloze", n_prompts=3, n_shots=4), smollm2.tokenizer, pool=facts)
    half = _as(smollm2, dtype, "smollm2")
    layers = [0, 14, 29]
    for prompt in prompts:
        ref = attribute_prompt(smollm2, prompt, IGConfig(steps=16), layers=layers)
        got = attribute_prompt(half, prompt, IGConfig(steps=16), layers=layers)
        for i in range(len(layers)):
            common = set(ref[i].topk(20).indices.tolist()) & set(got[i].topk(20).indices.tolist())
            assert len(common) >= 15, (prompt.template, layers[i], len(common))
