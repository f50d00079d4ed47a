"""Reading TL models the same way, and the embedded models (slow: real SmolLM2)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qrnca_lens.errors import ModelError
from qrnca_lens.models import (
    EMBEDDED_MODELS, d_mlp, default_prepend_bos, is_gated, load_model, mlp_hook_name, n_layers, post_hook_name,
)


def test_hook_names_follow_the_mlp_kind(tiny_model):
    gated = "blocks.0.mlp.hook_pre_linear" in tiny_model.hook_dict
    assert is_gated(tiny_model) == gated
    expected = "hook_pre_linear" if gated else "hook_pre"
    assert mlp_hook_name(tiny_model, 2) == f"blocks.2.mlp.{expected}"
    assert post_hook_name(tiny_model, 0) == "blocks.0.mlp.hook_post"
    assert n_layers(tiny_model) == 3 and d_mlp(tiny_model) == 48


def test_plain_mlp_is_refused_where_a_gated_one_is_required(tiny_model):
    if is_gated(tiny_model):
        assert mlp_hook_name(tiny_model, 0, require_gated=True).endswith("hook_pre_linear")
    else:
        with pytest.raises(ModelError, match="no gated MLP"):
            mlp_hook_name(tiny_model, 0, require_gated=True)


def test_unknown_embedded_model():
    with pytest.raises(ModelError, match="unknown model 'gpt5'"):
        load_model("gpt5")


@pytest.mark.slow
def test_smollm2_loads_offline_and_matches_its_config(smollm2):
    assert n_layers(smollm2) == 30 and d_mlp(smollm2) == 1536
    assert is_gated(smollm2)
    assert all(not p.requires_grad for p in smollm2.parameters())


@pytest.mark.slow
def test_smollm2_bos_is_explicit(smollm2):
    """TL's to_tokens prepends <|im_start|> for SmolLM2; our default follows the model's own tokenizer (no BOS)."""
    from qrnca_lens.data import load_data
    from qrnca_lens.proxies import ProxyConfig, build_prompts

    tok = smollm2.tokenizer
    assert smollm2.to_tokens("Paris")[0, 0].item() == tok.bos_token_id == tok.convert_tokens_to_ids("<|im_start|>")
    assert default_prepend_bos(smollm2) is False
    q = load_data("builtin:facts")[0]
    (auto,) = build_prompts(q, ProxyConfig("cloze", n_prompts=1, n_shots=0), tok, prepend_bos=default_prepend_bos(smollm2))
    assert auto.tokens[0] != tok.bos_token_id
    (forced,) = build_prompts(q, ProxyConfig("cloze", n_prompts=1, n_shots=0, prepend_bos=True), tok)
    assert forced.tokens[0] == tok.bos_token_id and forced.tokens[1:] == auto.tokens


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smollm2):
    toks = torch.tensor([smollm2.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        top = smollm2(toks)[0, -1].argmax().item()
    assert smollm2.tokenizer.decode([top]) == " Paris"


@pytest.mark.slow
def test_second_load_in_a_new_process_reuses_the_cache(smollm2):
    """A fresh process loads the dequantised cache instead of re-parsing the GGUF (timing is printed, not asserted)."""
    from qrnca_lens.models import cache_root

    marker = cache_root() / "smollm2" / "qrnca_source.json"
    before = marker.stat().st_mtime_ns
    code = "import time; t=time.perf_counter(); import qrnca_lens as ql; m=ql.load_model('smollm2'); print(time.perf_counter()-t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    print(f"second load in a new process: {float(out.stdout.strip().splitlines()[-1]):.2f} s")
    assert marker.stat().st_mtime_ns == before


@pytest.mark.slow
def test_gemma3_loads_from_the_assembled_chunks():
    model = load_model("gemma3-270m")
    assert is_gated(model) and mlp_hook_name(model, 0) == "blocks.0.mlp.hook_pre_linear"
    toks = torch.tensor([model.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(toks)
    assert torch.isfinite(logits).all() and logits.shape[-1] == model.cfg.d_vocab


def test_embedded_registry_names():
    assert set(EMBEDDED_MODELS) == {"smollm2", "gemma3-270m"}
