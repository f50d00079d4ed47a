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


_RACE = r"""
import json, os, shutil, sys, time, types
from pathlib import Path
import qrnca_lens.models as models

work = Path(sys.argv[1])
log = work / "log"


def note(event):
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {event}\n")


def slow_build(spec, cache):
    # the real build's shape, without the GGUF: fill a temp dir slowly, then rmtree + rename over the cache
    note("build")
    tmp = cache.parent / f".tmp-{os.getpid()}"
    tmp.mkdir()
    time.sleep(1.5)
    (tmp / "qrnca_source.json").write_text(json.dumps(
        {"gguf": str(work / "fake.gguf"), "size": 4, "model": spec.name, "gguf_sha256": "0" * 64}))
    if cache.exists():
        shutil.rmtree(cache)
    os.replace(tmp, cache)


models.EMBEDDED_MODELS["fake"] = models.EmbeddedModel("fake", "fake/fake", "fake", lambda c: work / "fake.gguf",
                                                      ("LlamaForCausalLM",), "a fake for the cache lock")
models._build_cache = slow_build
models._finish = lambda model, tok, compat: model
import transformers
from transformer_lens.model_bridge import TransformerBridge
transformers.AutoTokenizer.from_pretrained = lambda path, **kw: note("read") or sorted(os.listdir(path))
transformers.AutoModelForCausalLM.from_pretrained = lambda path, **kw: types.SimpleNamespace(eval=lambda: None)
TransformerBridge.boot_transformers = staticmethod(lambda name, **kw: types.SimpleNamespace(tok=kw["tokenizer"]))
note("ready")
while not (work / "go").exists():  # both processes reach the cache check together
    time.sleep(0.01)
print(json.dumps(models.load_model("fake").tok))
"""


def test_two_first_loads_build_the_model_cache_once(tmp_path):
    """Two processes (or Ray actors) loading a model for the first time: one builds, the other waits."""
    (tmp_path / "fake.gguf").write_bytes(b"GGUF")
    env = {**os.environ, "QRNCA_LENS_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    log = tmp_path / "log"
    import time

    deadline = time.monotonic() + 120
    while (not log.exists() or log.read_text().count("ready") < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").write_text("")
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    events = [line.split()[1] for line in log.read_text().splitlines()]
    assert events.count("build") == 1, events
    # each process read a complete cache
    assert all(out.strip().splitlines()[-1] == '["qrnca_source.json"]' for out, _ in outs), outs
