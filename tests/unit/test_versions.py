"""Every result records what it was measured with: library versions and the model's identity."""

from __future__ import annotations

import json
from importlib import metadata

import pytest

from qrnca_lens.qrnca.ig import IGConfig
from qrnca_lens.data.queries import limit_per_group, load_data
from qrnca_lens.qrnca.locate import LocateConfig, locate
from qrnca_lens.data.prompts import ProxyConfig
from qrnca_lens.versions import library_versions, model_identity, versions_line


def test_library_versions_are_the_installed_ones():
    v = library_versions()
    assert set(v) == {"qrnca-lens", "torch", "transformers", "transformer-lens", "python"}
    assert v["torch"] == metadata.version("torch")
    assert v["transformer-lens"] == metadata.version("transformer-lens")
    assert f"transformers {metadata.version('transformers')}" in versions_line()


def test_model_identity_tells_configs_apart(tiny_tokenizer):
    from builders import tiny_llama_bridge

    a = model_identity(tiny_llama_bridge(tiny_tokenizer, n_layers=2))
    b = model_identity(tiny_llama_bridge(tiny_tokenizer, n_layers=2, seed=5))
    c = model_identity(tiny_llama_bridge(tiny_tokenizer, n_layers=3))
    assert a == b  # same architecture: the config hash cannot tell two checkpoints apart (documented)
    assert a["config_sha256"] != c["config_sha256"]
    assert "TransformerBridge" in a["class"]


def test_run_manifest_query_files_and_neurons_record_versions(tiny_gated, tmp_path):
    pool = load_data("builtin:facts")
    cfg = LocateConfig(proxy=ProxyConfig("cloze", n_prompts=1, n_shots=1), ig=IGConfig(steps=2))
    res = locate(tiny_gated, limit_per_group(pool, 1), cfg, pool=pool, out=tmp_path / "run", progress=False)
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["versions"] == library_versions()
    assert man["model_identity"] == model_identity(tiny_gated)
    assert json.loads((tmp_path / "run" / "neurons.json").read_text())["versions"] == library_versions()
    assert all(i["versions"] == library_versions() for i in res.info.values())


@pytest.mark.slow
def test_embedded_model_identity_hashes_its_gguf(smollm2):
    ident = model_identity(smollm2)
    assert ident["embedded"] == "smollm2" and ident["gguf"].endswith(".gguf")
    assert len(ident["gguf_sha256"]) == 64


def test_evaluation_lens_and_report_record_versions(tiny_gated, tmp_path):
    from qrnca_lens.evaluation.judge import EvalConfig, evaluate
    from qrnca_lens.lens import lens_locate
    from qrnca_lens.render.report import write_report

    pool = load_data("builtin:facts")
    queries = limit_per_group(pool, 2)
    proxy = ProxyConfig("cloze", n_prompts=1, n_shots=1)
    run = locate(tiny_gated, queries, LocateConfig(proxy=proxy, ig=IGConfig(steps=2)), pool=pool,
                 out=tmp_path / "run", progress=False)
    res = evaluate(tiny_gated, run, queries, pool,
                   EvalConfig(methods=("qrnca",), n_boot=10, free_form=False, neuron_prediction=False), progress=False)
    assert res.meta["versions"] == library_versions()
    assert res.meta["model_identity"] == model_identity(tiny_gated)
    doc = lens_locate(tiny_gated, queries[:2], proxy, pool=pool, top_k=3, progress=False).neurons_json()
    assert doc["versions"] == library_versions() and doc["model_identity"] == model_identity(tiny_gated)
    html = write_report(tmp_path / "run").read_text()
    assert "measured with" in html and f"transformers {library_versions()['transformers']}" in html
