"""The fast IG path on the real Gemma 3 270M (slow): sliding-window and global layers, short and long prompts.

Gemma 3 alternates local (sliding-window, 512 tokens) and global attention layers. The fast path's rows attend
to the cached prefix through a 4D mask (one per attention type); past the window the local layers must see only
the last 512 positions. Both paths are compared with the plain per-step loop of test_attribution (one ordinary
forward/backward per step, batch 1, the model's own masks).
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
from test_attribution import _loop_oracle

from qrnca_lens.qrnca.ig import IGConfig, attribute_prompts, fast_backend, reference_ig
from qrnca_lens.data.queries import load_data
from qrnca_lens.model.access import default_prepend_bos
from qrnca_lens.data.prompts import ProxyConfig, build_prompts

STEPS = 4


@pytest.fixture(scope="module")
def facts():
    return load_data("builtin:facts")


def _cloze(model, facts, qi=0):
    return build_prompts(facts[qi], ProxyConfig("cloze", n_prompts=1, n_shots=2), model.tokenizer, pool=facts,
                         prepend_bos=default_prepend_bos(model))[0]


def _long(model, facts, n_tokens):
    """The cloze prompt with in-context fact lines inserted after BOS, up to ``n_tokens`` tokens."""
    p = _cloze(model, facts)
    text = "\n".join(f"{q.question} {q.answer}." for q in facts) + "\n"
    filler = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    need = n_tokens - len(p.tokens)
    filler = (filler * (need // len(filler) + 1))[:need]
    bos = p.tokens[:1] if p.tokens[0] == model.tokenizer.bos_token_id else ()
    return replace(p, tokens=tuple(bos) + tuple(filler) + tuple(p.tokens[len(bos):]))


def _layers(model):
    types = list(model.original_model.config.layer_types)
    return [types.index("sliding_attention"), types.index("full_attention")]


@pytest.mark.slow
@pytest.mark.parametrize("n_tokens", [None, 650])
def test_fast_equals_reference_and_the_plain_loop_on_gemma3(gemma3, facts, n_tokens):
    cfg = gemma3.original_model.config
    assert fast_backend(gemma3) == "packed"
    prompt = _cloze(gemma3, facts) if n_tokens is None else _long(gemma3, facts, n_tokens)
    if n_tokens is not None:
        assert len(prompt.tokens) == n_tokens > cfg.sliding_window  # the local layers must drop the far prefix
    # Past the window one start layer suffices: rows started at the first (local) layer run every layer above it,
    # local and global, against the long cached prefix; the global start is covered by the short prompt.
    layers = _layers(gemma3) if n_tokens is None else _layers(gemma3)[:1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback to the reference path warns: fail on it
        fast = attribute_prompts(gemma3, [prompt], IGConfig(steps=STEPS), layers=layers)[0]
    for row, layer in enumerate(layers):
        ref = reference_ig(gemma3, prompt, layer, steps=STEPS)
        loop = _loop_oracle(gemma3, prompt, layer, STEPS)
        top = float(loop.abs().max())
        assert top > 0
        assert float((fast[row] - ref).abs().max()) <= 1e-4 * top, (layer, "fast vs reference")
        assert float((fast[row] - loop).abs().max()) <= 1e-4 * top, (layer, "fast vs loop")
        assert float((ref - loop).abs().max()) <= 1e-4 * top, (layer, "reference vs loop")
