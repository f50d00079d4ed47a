"""locate / reduce / the run store: resume, shards, kill -9, re-selection, and the errors of a bad run dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qrnca_lens.executors as executors_mod
from qrnca_lens.attribution import IGConfig
from qrnca_lens.data import limit_per_group, load_data
from qrnca_lens.errors import QrncaError, StoreError
from qrnca_lens.locate import LocateConfig, LocateResult, locate, parse_shard, reduce
from qrnca_lens.proxies import ProxyConfig
from qrnca_lens.selection import SelectionConfig
from qrnca_lens.store import query_filename

CFG = LocateConfig(proxy=ProxyConfig("cloze", n_prompts=2, n_shots=1), ig=IGConfig(steps=4))


@pytest.fixture(scope="module")
def pool():
    return load_data("builtin:facts")


@pytest.fixture(scope="module")
def queries(pool):
    return limit_per_group(pool, 2)


def _neurons(path):
    return json.loads((Path(path) / "neurons.json").read_text())


def test_in_memory_and_stored_runs_agree(tiny_gated, queries, pool, tmp_path):
    mem = locate(tiny_gated, queries, CFG, pool=pool, progress=False, name="tiny")
    disk = locate(tiny_gated, queries, CFG, pool=pool, out=tmp_path / "run", progress=False, name="tiny")
    assert mem.neurons_json()["queries"] == disk.neurons_json()["queries"]
    assert _neurons(tmp_path / "run") == disk.neurons_json()
    doc = disk.neurons_json()
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "run" / "neurons.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert set(doc) >= {"config", "model", "common_neurons", "queries"}
    q = doc["queries"][queries[0].id]
    assert q["group"] == queries[0].group
    assert all(len(row) == 3 and row[2] > 0 for row in q["qr_neurons"])
    assert doc["config"]["proxy"]["prepend_bos"] is not None  # resolved and recorded


def test_resume_redoes_only_missing_queries(tiny_gated, queries, pool, tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = locate(tiny_gated, queries, CFG, pool=pool, out=out, progress=False)
    victim = queries[3].id
    (out / "queries" / query_filename(victim)).unlink()
    calls = []
    real = executors_mod.attribute_prompts
    monkeypatch.setattr(executors_mod, "attribute_prompts", lambda m, ps, *a, **k: calls.append(ps[0].query_id) or real(m, ps, *a, **k))
    again = locate(tiny_gated, queries, CFG, pool=pool, out=out, progress=False)
    assert calls == [victim]
    assert again.neurons_json() == first.neurons_json()


def test_shards_share_a_directory(tiny_gated, queries, pool, tmp_path):
    whole = locate(tiny_gated, queries, CFG, pool=pool, out=tmp_path / "whole", progress=False)
    out = tmp_path / "sharded"
    assert locate(tiny_gated, queries, CFG, pool=pool, out=out, shard=(1, 3), progress=False) is None
    assert not (out / "neurons.json").exists()
    assert locate(tiny_gated, queries, CFG, pool=pool, out=out, shard=(0, 3), progress=False) is None
    last = locate(tiny_gated, queries, CFG, pool=pool, out=out, shard=(2, 3), progress=False)
    assert last.neurons_json()["queries"] == whole.neurons_json()["queries"]
    assert len(list((out / "queries").glob("*.safetensors"))) == len(queries)


def test_reduce_with_new_settings_equals_a_fresh_locate(tiny_gated, queries, pool, tmp_path):
    out = tmp_path / "run"
    locate(tiny_gated, queries, CFG, pool=pool, out=out, progress=False)
    new = SelectionConfig(t=0.3, u=0.5, v=5, cluster_mode="sum")
    reduced = reduce(out, new)
    fresh = locate(tiny_gated, queries, LocateConfig(CFG.proxy, CFG.ig, new), pool=pool, progress=False)
    assert reduced.neurons_json()["queries"] == fresh.neurons_json()["queries"]
    assert _neurons(out)["config"]["selection"]["v"] == 5
    assert all(len(v["qr_neurons"]) <= 5 for v in _neurons(out)["queries"].values())


def test_result_saves_loads_and_converts(tiny_gated, queries, pool, tmp_path):
    res = locate(tiny_gated, queries, CFG, pool=pool, progress=False, name="tiny")
    res.save(tmp_path / "saved")
    back = LocateResult.load(tmp_path / "saved")
    assert back.neurons_json() == res.neurons_json()
    df = res.to_dataframe()
    assert list(df.columns) == ["query_id", "group", "rank", "layer", "neuron", "naica"]
    assert len(df) == sum(len(v["qr_neurons"]) for v in res.neurons_json()["queries"].values())
    assert "QRNCA" in res._repr_html_() and "queries" in repr(res)
    again = back.reselect(SelectionConfig(v=3))
    assert all(len(again.qr_neurons(q.id)) <= 3 for q in queries)


def test_corrupt_query_file_is_named(tiny_gated, queries, pool, tmp_path):
    out = tmp_path / "run"
    locate(tiny_gated, queries, CFG, pool=pool, out=out, progress=False)
    bad = out / "queries" / query_filename(queries[0].id)
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(StoreError, match=f"{bad.name} is corrupt.*delete it"):
        reduce(out)


def test_foreign_and_mismatched_directories(tiny_gated, queries, pool, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a qrnca-lens run"):
        locate(tiny_gated, queries, CFG, pool=pool, out=foreign, progress=False)
    out = tmp_path / "run"
    locate(tiny_gated, queries, CFG, pool=pool, out=out, progress=False)
    other = LocateConfig(ProxyConfig("mcqa-letter", n_prompts=2, n_shots=1), CFG.ig)
    with pytest.raises(StoreError, match="holds a different run.*proxy"):
        locate(tiny_gated, queries, other, pool=pool, out=out, progress=False)
    (out / "manifest.json").write_text("{broken")
    with pytest.raises(StoreError, match="corrupt"):
        reduce(out)
    with pytest.raises(StoreError, match="no manifest.json"):
        reduce(tmp_path / "nowhere")


def test_bad_inputs(tiny_gated, pool):
    with pytest.raises(QrncaError, match="empty"):
        locate(tiny_gated, [], CFG, progress=False)
    for bad in ("1", "2/2", "a/b", "-1/3"):
        with pytest.raises(QrncaError, match="--shard"):
            parse_shard(bad)
    assert parse_shard("1/4") == (1, 4)
    with pytest.warns(UserWarning, match="ICA needs a collection"):
        locate(tiny_gated, pool[:1], CFG, pool=pool, progress=False)


def test_mean_qr_neurons_and_no_common_in_results(tiny_gated, queries, pool):
    res = locate(tiny_gated, queries, CFG, pool=pool, progress=False)
    common = set(res.common_neurons)
    for q in queries:
        assert not common & {(a, b) for a, b, _ in res.qr_neurons(q.id)}


def _run_cli(args, **kw):
    script = Path(sys.executable).parent / "qrnca-lens"
    return subprocess.Popen([str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_kill_9_then_rerun_gives_identical_neurons(tiny_checkpoint, tmp_path):
    args = ["locate", "--model", str(tiny_checkpoint), "--data", "builtin:facts", "--proxy", "cloze",
            "--steps", "8", "--quiet"]
    clean = _run_cli(args + ["--out", str(tmp_path / "clean")])
    assert clean.wait(timeout=300) == 0, clean.stderr.read()
    out = tmp_path / "killed"
    proc = _run_cli(args + ["--out", str(out)])
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "queries").glob("*.safetensors"))) < 5:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(list((out / "queries").glob("*.safetensors")))
    assert 5 <= n_before < 100, "the kill did not land mid-run"
    assert not (out / "neurons.json").exists()
    rerun = _run_cli(args + ["--out", str(out)])
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    assert _neurons(out) == _neurons(tmp_path / "clean")
    assert not list((out / "queries").glob(".*tmp"))


def test_each_query_stores_the_prompts_it_was_attributed_on(tiny_gated, queries, pool, tmp_path):
    from qrnca_lens.models import tokenizer_of
    from qrnca_lens.proxies import build_all_prompts, tokenizer_identity

    disk = locate(tiny_gated, queries, CFG, pool=pool, out=tmp_path / "run", progress=False)
    want = build_all_prompts(queries, disk.config.proxy, tokenizer_of(tiny_gated), pool=pool)
    back = reduce(tmp_path / "run", write=False)  # read from the query files alone
    stored = back.stored_prompts()
    assert stored == want
    assert all(p.meta == w.meta and p.examples and p.distractors for q in want for p, w in zip(stored[q], want[q]))
    assert back.stored_queries() == list(queries)
    info = back.info[queries[0].id]
    assert ProxyConfig.from_dict(info["proxy"]) == disk.config.proxy
    assert info["tokenizer"] == tokenizer_identity(tokenizer_of(tiny_gated))
    mem = locate(tiny_gated, queries, CFG, pool=pool, progress=False)
    assert mem.stored_prompts() == want and mem.stored_queries([queries[1].id]) == [queries[1]]


def test_a_run_without_stored_prompts_names_the_fix(tiny_gated, queries, pool, tmp_path):
    """Runs made before prompts were stored: a clear error, never a silent rebuild."""
    from qrnca_lens.store import RunStore

    out = tmp_path / "run"
    locate(tiny_gated, queries, CFG, pool=pool, out=out, progress=False)
    store = RunStore.load(out)
    for q in queries:  # strip the prompt record, as an older qrnca-lens wrote the files
        scores, info = store.read_query(q.id)
        store.write_query(q.id, scores, {k: v for k, v in info.items()
                                         if k not in ("prompts", "query", "proxy", "tokenizer")})
    old = reduce(out, write=False)
    with pytest.raises(StoreError, match=r"no stored prompts.*rerun locate into a new directory"):
        old.stored_prompts()
    with pytest.raises(StoreError, match=r"no stored prompts"):
        old.stored_queries()
