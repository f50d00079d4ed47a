"""Reading TL models the same way, and the embedded models (slow: real SmolLM2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from qrnca_lens.errors import ModelError
from qrnca_lens.model.loading import EMBEDDED_MODELS, ModelRef, load_model, model_source, resolve_model
from qrnca_lens.model.access import (
    d_mlp,
    default_prepend_bos,
    is_gated,
    mlp_hook_name,
    model_dtype,
    model_name,
    n_layers,
    post_hook_name,
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
    from qrnca_lens.data.queries import load_data
    from qrnca_lens.data.prompts import ProxyConfig, build_prompts

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
    from qrnca_lens.model.loading import cache_root

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
import qrnca_lens.model.loading as models

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


# ---------------------------------------------------------------- reloading a run's model (load_model(run.model))

def test_an_embedded_models_hf_id_resolves_to_the_embedded_model_without_loading():
    for key, spec in EMBEDDED_MODELS.items():
        assert resolve_model(spec.hf_name) == resolve_model(spec.hf_name.upper()) == resolve_model(key) == ("embedded", key)
        assert model_source(spec.hf_name) == {"embedded": key}
    assert model_source("not-a-model") is None


class _Routed(Exception):
    pass


def test_load_model_of_a_python_runs_model_name_loads_the_embedded_file(tmp_path, monkeypatch):
    """A run made from Python records TL's name, the HF id: load_model takes it to the embedded GGUF's cache."""
    import qrnca_lens.model.loading as models

    def stop(spec, cache):
        raise _Routed(spec.name, cache)

    monkeypatch.setenv("QRNCA_LENS_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_cache_is_fresh", stop)  # where the weights would be read: stop before
    with pytest.raises(_Routed) as e:
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert e.value.args == ("smollm2", tmp_path / "smollm2")
    with pytest.raises(_Routed) as e:
        load_model(ModelRef("renamed", source={"embedded": "gemma3-270m"}, dtype="bfloat16"))
    assert e.value.args[0] == "gemma3-270m"


def test_a_local_directory_wins_over_an_embedded_hf_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake = tmp_path / "HuggingFaceTB" / "SmolLM2-135M-Instruct"
    fake.mkdir(parents=True)
    (fake / "config.json").write_text("{}")
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == ("path", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert model_source("HuggingFaceTB/SmolLM2-135M-Instruct") == {"path": str(fake)}


def test_model_ref_is_its_name_and_survives_pickling():
    import pickle

    ref = ModelRef("tiny", source={"path": "/x/tiny"}, dtype="float16")
    back = pickle.loads(pickle.dumps(ref))  # Ray ships run.model to its workers
    assert back == ref == "tiny" and str(back) == "tiny" and json.dumps({"m": back}) == '{"m": "tiny"}'
    assert (back.source, back.dtype) == ({"path": "/x/tiny"}, "float16") and type(back) is ModelRef


def test_a_checkpoint_loads_by_relative_path_and_is_named_by_its_absolute_path(tiny_checkpoint, monkeypatch):
    monkeypatch.chdir(tiny_checkpoint.parent)
    model = load_model(tiny_checkpoint.name)
    assert model_name(model) == str(tiny_checkpoint.resolve()) and model_dtype(model) == torch.float32
    assert model_source(tiny_checkpoint.name) == {"path": str(tiny_checkpoint.resolve())}


def test_a_ref_loads_in_its_dtype_unless_told_otherwise(tiny_checkpoint):
    ref = ModelRef("whatever-it-was-called", source={"path": str(tiny_checkpoint)}, dtype="bfloat16")
    assert model_dtype(load_model(ref)) == torch.bfloat16
    assert model_dtype(load_model(ref, dtype="float32")) == torch.float32


def test_an_unresolvable_ref_says_what_the_run_recorded_and_how_to_pass_a_model(tmp_path):
    gone = str(tmp_path / "moved-away")
    with pytest.raises(ModelError) as e:
        load_model(ModelRef(gone, source={"path": gone}, dtype="float32"))
    msg = str(e.value)
    assert "\n" not in msg and msg == (
        f"cannot reload the run's model {gone!r} (the run records path {gone!r}, dtype float32); load it yourself "
        "and pass it on: load_model(PATH) with its checkpoint directory, or one of ['gemma3-270m', 'smollm2']")
    with pytest.raises(ModelError, match=r"the run records no checkpoint or embedded name, dtype None"):
        load_model(ModelRef("my-tiny-llama"))  # a model built in memory: nothing on disk to reload
    with pytest.raises(ModelError, match="unknown model 'gpt5'"):  # a plain name keeps its own message
        resolve_model("gpt5")


def _tiny_run(model_dir, out=None, name=None):
    from qrnca_lens.qrnca.ig import IGConfig
    from qrnca_lens.data.queries import limit_per_group, load_data
    from qrnca_lens.qrnca.locate import LocateConfig, locate
    from qrnca_lens.data.prompts import ProxyConfig

    pool = load_data("builtin:facts")
    cfg = LocateConfig(proxy=ProxyConfig("cloze", n_prompts=1, n_shots=1), ig=IGConfig(steps=2))
    model = load_model(model_dir, dtype="bfloat16")
    return locate(model, limit_per_group(pool, 1), cfg, pool=pool, out=out, progress=False, name=name)


def test_load_model_of_run_model_reloads_a_checkpoint_run_in_its_dtype(tiny_checkpoint, tmp_path, monkeypatch):
    """The issue's call: load_model(run.model) on a run made from Python with a checkpoint loaded by a relative path,
    from memory and from its directory, from another working directory."""
    from qrnca_lens.qrnca.locate import LocateResult

    monkeypatch.chdir(tiny_checkpoint.parent)
    mem = _tiny_run(tiny_checkpoint.name)
    _tiny_run(tiny_checkpoint.name, out=tmp_path / "run")
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["model_source"] == {"path": str(tiny_checkpoint.resolve())} and man["dtype"] == "bfloat16"
    monkeypatch.chdir(tmp_path)
    disk = LocateResult.load(tmp_path / "run")
    for run in (mem, disk):
        assert run.model == str(tiny_checkpoint.resolve())  # still the display name
        again = load_model(run.model)
        assert model_dtype(again) == torch.bfloat16 and model_name(again) == str(tiny_checkpoint.resolve())


def test_an_old_run_without_a_model_source_still_loads(tiny_checkpoint, tmp_path, monkeypatch):
    """A manifest from before model_source: its embedded identity, else its model name, is what reloads."""
    from qrnca_lens.qrnca.locate import LocateResult

    _tiny_run(str(tiny_checkpoint), out=tmp_path / "run")
    path = tmp_path / "run" / "manifest.json"
    man = json.loads(path.read_text())
    del man["model_source"], man["dtype"]
    path.write_text(json.dumps(man))
    old = LocateResult.load(tmp_path / "run")
    assert old.model_source == {"path": str(tiny_checkpoint)} and model_dtype(load_model(old.model)) == torch.float32
    man.update(model="smollm2", model_identity={"embedded": "smollm2", "gguf": "x.gguf", "gguf_sha256": "0" * 64})
    path.write_text(json.dumps(man))
    old = LocateResult.load(tmp_path / "run")
    assert old.model_source == {"embedded": "smollm2"} and resolve_model(old.model) == ("embedded", "smollm2")


def test_a_run_given_its_own_name_still_reloads_its_checkpoint(tiny_checkpoint, tmp_path):
    from qrnca_lens.qrnca.locate import LocateResult

    mem = _tiny_run(str(tiny_checkpoint), name="my-tiny")
    _tiny_run(str(tiny_checkpoint), out=tmp_path / "run", name="my-tiny")
    for run in (mem, LocateResult.load(tmp_path / "run")):
        assert run.model == "my-tiny" and run.model_source == {"path": str(tiny_checkpoint.resolve())}
        assert model_name(load_model(run.model)) == str(tiny_checkpoint.resolve())
