"""locate / reduce / the run store: resume, shards, kill -9, re-selection, and the errors of a bad run dir."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import qrnca_lens.qrnca.executors as executors_mod
from qrnca_lens.qrnca.ig import IGConfig
from qrnca_lens.data.queries import limit_per_group, load_data
from qrnca_lens.errors import QrncaError, StoreError
from qrnca_lens.qrnca.locate import LocateConfig, LocateResult, locate, parse_shard, reduce
from qrnca_lens.qrnca.selection import degenerate_selection
from qrnca_lens.data.prompts import ProxyConfig
from qrnca_lens.qrnca.selection import SelectionConfig, query_cluster, select
from qrnca_lens.evaluation.judge import EvalConfig, evaluate
from qrnca_lens.qrnca.store import RunStore, dtype_refusal, query_filename

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
        # The library's message is plain; the command line adds the option's name (tests/test_cli.py).
        with pytest.raises(QrncaError, match=r"shard.*(I/N|0 <= I < N)"):
            parse_shard(bad)
    assert parse_shard("1/4") == (1, 4)
    with pytest.warns(UserWarning, match=r"needs a larger collection: with N = 1 query .*ICA needs N >= 3"):
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
    # 20 queries, not all 100: the clean run alone took over the 300 s timeout on a loaded 2-core machine.
    args = ["locate", "--model", str(tiny_checkpoint), "--data", "builtin:facts", "--proxy", "cloze",
            "--steps", "8", "--quiet", "--limit", "4"]
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
    assert 5 <= n_before < 20, "the kill did not land mid-run"
    assert not (out / "neurons.json").exists()
    rerun = _run_cli(args + ["--out", str(out)])
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    assert _neurons(out) == _neurons(tmp_path / "clean")
    assert not list((out / "queries").glob(".*tmp"))


@pytest.mark.slow
@pytest.mark.smoke
def test_locate_one_builtin_query_on_smollm2_fast_equals_reference(smollm2):
    """The latest-dependencies smoke test: a real locate on SmolLM2 takes the fast path (which checks itself
    against a plain forward), and its stored scores equal the reference path's on a few layers."""
    import warnings as _w

    from qrnca_lens.qrnca.ig import IGConfig, attribute_prompts
    from qrnca_lens.data.queries import load_data
    from qrnca_lens.qrnca.locate import LocateConfig, locate, scores_of
    from qrnca_lens.data.prompts import ProxyConfig, build_all_prompts
    from qrnca_lens.qrnca.selection import SelectionConfig

    pool = load_data("builtin:facts")
    cfg = LocateConfig(proxy=ProxyConfig("cloze"), ig=IGConfig(steps=8), selection=SelectionConfig(use_ica=False))
    with _w.catch_warnings(record=True) as caught:
        _w.simplefilter("always")
        run = locate(smollm2, pool[:1], cfg, pool=pool, progress=False)
    # The fast path ran (no fallback), and nothing was deprecated on the way; one query is a degenerate
    # collection, which locate rightly says.
    assert not [w for w in caught if "reference path" in str(w.message)]
    assert not [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    q = pool[0]
    fast = scores_of(run, q.id)
    prompts = build_all_prompts([q], run.config.proxy, smollm2.tokenizer, pool=pool)[q.id]
    layers = [0, 15, 29]
    ref = attribute_prompts(smollm2, prompts, IGConfig(steps=8, method="reference"), layers=layers)
    assert ref.abs().max() > 0
    assert (fast[:, layers] - ref).abs().max() <= 1e-4 * ref.abs().max()


# ---------------------------------------------------------------- the run directory: never a silent subset

DATA = "builtin:facts"


@pytest.fixture(scope="module")
def base_run(tiny_llama, pool, tmp_path_factory):
    """A finished 5-query run (one per relation); tests copy it instead of attributing again."""
    out = tmp_path_factory.mktemp("base") / "run"
    locate(tiny_llama, limit_per_group(pool, 1), CFG, pool=pool, out=out, progress=False, name="tiny", data=DATA)
    return out


@pytest.fixture
def run_copy(base_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    return out


def _count_attributions(monkeypatch):
    calls = []
    real = executors_mod.attribute_prompts
    monkeypatch.setattr(executors_mod, "attribute_prompts",
                        lambda m, ps, *a, **k: calls.append(ps[0].query_id) or real(m, ps, *a, **k))
    return calls


def test_rerun_with_more_queries_extends_the_run(tiny_gated, queries, pool, run_copy, monkeypatch):
    first = {q.id for q in limit_per_group(pool, 1)}
    calls = _count_attributions(monkeypatch)
    res = locate(tiny_gated, queries, CFG, pool=pool, out=run_copy, progress=False, name="tiny", data=DATA)
    assert sorted(calls) == sorted(q.id for q in queries if q.id not in first)  # only the new ones
    assert res.selection.n_clusters == len(queries)  # N of ICA is the whole set
    assert set(_neurons(run_copy)["queries"]) == {q.id for q in queries}
    assert set(json.loads((run_copy / "manifest.json").read_text())["queries"]) == {q.id for q in queries}
    fresh = locate(tiny_gated, queries, CFG, pool=pool, progress=False, name="tiny")
    assert res.neurons_json()["queries"] == fresh.neurons_json()["queries"]
    assert reduce(run_copy, write=False).neurons_json()["queries"] == fresh.neurons_json()["queries"]


def test_rerun_with_fewer_or_regrouped_queries_names_the_difference(tiny_gated, pool, run_copy):
    five = limit_per_group(pool, 1)
    with pytest.raises(StoreError, match=rf"1 of its 5 queries are not in the asked set of 4 .*'{five[0].id}'"):
        locate(tiny_gated, five[1:], CFG, pool=pool, out=run_copy, progress=False, name="tiny", data=DATA)
    moved = [dataclasses.replace(five[0], group=five[1].group), *five[1:]]
    with pytest.raises(StoreError, match=rf"1 query changes group \(e.g. '{five[0].id}': stored "
                                         rf"'{five[0].group}', asked '{five[1].group}'\)"):
        locate(tiny_gated, moved, CFG, pool=pool, out=run_copy, progress=False, name="tiny", data=DATA)
    assert len(json.loads((run_copy / "manifest.json").read_text())["queries"]) == 5  # untouched


def test_every_stage_uses_the_selection_of_the_latest_reduce(run_copy, tiny_gated, monkeypatch):
    import qrnca_lens.evaluation.judge as evaluation_mod
    import qrnca_lens.model.loading as models_mod
    from qrnca_lens import cli

    (run_copy / "evaluation.json").write_text(json.dumps({"meta": {"selection": SelectionConfig().to_dict()}}))
    with pytest.warns(UserWarning, match="evaluation.json evaluated the neurons of another selection"):
        assert cli.main(["reduce", str(run_copy), "--v", "3"]) == 0
    assert _neurons(run_copy)["config"]["selection"]["v"] == 3
    again = reduce(run_copy, write=False)
    assert again.config.selection.v == 3
    assert again.neurons_json()["queries"] == _neurons(run_copy)["queries"]
    with pytest.warns(UserWarning, match="evaluation.json evaluated the neurons of another selection"):
        assert cli.main(["reduce", str(run_copy), "--t", "0.3"]) == 0  # other flags keep the recorded v
    assert _neurons(run_copy)["config"]["selection"]["v"] == 3

    seen = []

    class Stop(Exception):
        pass

    def fake_evaluate(model, run, *a, **k):
        seen.append(run)
        raise Stop

    monkeypatch.setattr(models_mod, "load_model", lambda name, **kw: tiny_gated)
    monkeypatch.setattr(evaluation_mod, "evaluate", fake_evaluate)
    with pytest.raises(Stop):
        cli.main(["evaluate", str(run_copy), "--quiet"])
    assert seen[0].config.selection == SelectionConfig(t=0.3, v=3)
    assert seen[0].neurons_json()["queries"] == _neurons(run_copy)["queries"]


def _singletons(n, shape=(2, 8)):
    """n queries, each with one neuron of its own: the most favourable collection for ICA and commons."""
    return {f"q{i}": query_cluster(torch.eye(shape[0] * shape[1])[i].reshape(1, *shape)) for i in range(n)}


@pytest.mark.parametrize("u", [0.3, 0.5, 0.1, 1.0])
@pytest.mark.parametrize("use_ica,remove_common", [(True, True), (True, False), (False, True), (False, False)])
def test_degenerate_selection_is_exactly_when_every_query_is_empty(u, use_ica, remove_common):
    for n in range(1, 12):
        cfg = SelectionConfig(u=u, use_ica=use_ica, remove_common=remove_common)
        why = degenerate_selection(n, cfg)
        empty = select(_singletons(n), cfg).mean_qr_count() == 0
        assert (why is not None) == empty, (n, cfg, why)


def test_tiny_collections_warn_with_the_minimum_n(tiny_gated, pool, run_copy):
    two = limit_per_group(pool, 1)[:2]
    with pytest.warns(UserWarning, match=r"N = 2 queries every query gets 0 QR neurons: .*ICA needs N >= 3.*"
                                         r"N < 1/u = 4.*Locate at least 4 queries"):
        res = locate(tiny_gated, two, CFG, pool=pool, progress=False)
    assert res.selection.mean_qr_count() == 0
    three = degenerate_selection(3, SelectionConfig())  # ICA is fine, but u * N = 0.9 < 1: every neuron is common
    assert "ICA needs" not in three and "0.3 * 3, which every neuron of a cluster is while N < 1/u = 4" in three
    assert degenerate_selection(4, SelectionConfig()) is None
    with pytest.warns(UserWarning, match=r"N = 5 queries .*u \* N = 0.1 \* 5.*N < 1/u = 10"):
        res = reduce(run_copy, SelectionConfig(u=0.1))  # the reduce says it, so `qrnca-lens reduce` does too
    assert res.selection.mean_qr_count() == 0


def test_max_batch_rows_is_recorded_but_not_identity(tiny_gated, pool, base_run, run_copy, monkeypatch):
    victim = limit_per_group(pool, 1)[2].id
    (run_copy / "queries" / query_filename(victim)).unlink()
    calls = _count_attributions(monkeypatch)
    smaller = dataclasses.replace(CFG, ig=dataclasses.replace(CFG.ig, max_batch_rows=3, memory_budget_mb=64))
    res = locate(tiny_gated, limit_per_group(pool, 1), smaller, pool=pool, out=run_copy, progress=False,
                 name="tiny", data=DATA)
    assert calls == [victim]
    # Other batches may differ in the last float32 bits, never in which neurons are chosen.
    for q, stored in _neurons(base_run)["queries"].items():
        got = res.neurons_json()["queries"][q]["qr_neurons"]
        assert [r[:2] for r in got] == [r[:2] for r in stored["qr_neurons"]]
        assert [r[2] for r in got] == pytest.approx([r[2] for r in stored["qr_neurons"]], rel=1e-5)
    assert json.loads((run_copy / "manifest.json").read_text())["ig"]["max_batch_rows"] == CFG.ig.max_batch_rows
    other_steps = dataclasses.replace(CFG, ig=dataclasses.replace(CFG.ig, steps=5))
    with pytest.raises(StoreError, match="holds a different run.*ig"):
        locate(tiny_gated, limit_per_group(pool, 1), other_steps, pool=pool, out=run_copy, progress=False,
               name="tiny", data=DATA)


def test_truncated_query_file_is_named_and_recomputed(tiny_gated, pool, base_run, run_copy, monkeypatch):
    victim = run_copy / "queries" / query_filename(limit_per_group(pool, 1)[1].id)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    calls = _count_attributions(monkeypatch)
    with pytest.warns(UserWarning, match=rf"{victim.name} is corrupt .*recomputing that query"):
        res = locate(tiny_gated, limit_per_group(pool, 1), CFG, pool=pool, out=run_copy, progress=False,
                     name="tiny", data=DATA)
    assert calls == [limit_per_group(pool, 1)[1].id]
    assert res.neurons_json()["queries"] == _neurons(base_run)["queries"]


def test_a_second_process_on_the_same_shard_is_refused(tiny_gated, pool, run_copy):
    hold = ("import sys; from qrnca_lens.qrnca.store import RunStore\n"
            "with RunStore.load(sys.argv[1]).shard_lock(0, 1):\n"
            "    print('held', flush=True); sys.stdin.read()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # this checkout's qrnca_lens
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run_copy)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreError, match=r"another qrnca-lens locate is already attributing this run into .*"
                                             r"wait for it to finish"):
            locate(tiny_gated, limit_per_group(pool, 1), CFG, pool=pool, out=run_copy, progress=False,
                   name="tiny", data=DATA)
        # Shards hold their own locks: shard 1/2 runs while shard 0/1 is held.
        assert locate(tiny_gated, limit_per_group(pool, 1), CFG, pool=pool, out=run_copy, shard=(1, 2),
                      progress=False, name="tiny", data=DATA) is not None
    finally:
        holder.communicate("", timeout=30)
    assert locate(tiny_gated, limit_per_group(pool, 1), CFG, pool=pool, out=run_copy, progress=False,
                  name="tiny", data=DATA) is not None  # released with the process


def test_each_query_stores_the_prompts_it_was_attributed_on(tiny_gated, queries, pool, tmp_path):
    from qrnca_lens.model.access import tokenizer_of
    from qrnca_lens.data.prompts import build_all_prompts, tokenizer_identity

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
    from qrnca_lens.qrnca.store import RunStore

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


# ---------------------------------------------------------------- dtype and device are part of a run

_EVAL = EvalConfig(methods=("qrnca", "random"), n_boot=10, free_form=False, neuron_prediction=False,
                   symbol_binding=False)


@pytest.fixture(scope="module")
def tiny_bf16(tiny_llama):
    """The tiny Llama in bfloat16 (a copy: the session's model stays float32)."""
    import copy

    return copy.deepcopy(tiny_llama).to(torch.bfloat16)


@pytest.fixture(scope="module")
def few(pool):
    return limit_per_group(pool, 1)


def test_a_run_records_its_dtype_and_device(tiny_gated, few, pool, tmp_path):
    out = tmp_path / "run"
    run = locate(tiny_gated, few, CFG, pool=pool, out=out, progress=False)
    man = json.loads((out / "manifest.json").read_text())
    assert (man["dtype"], man["device"]) == ("float32", "cpu") == (run.dtype, run.device)
    assert (_neurons(out)["dtype"], _neurons(out)["device"]) == ("float32", "cpu")
    info = RunStore.load(out).read_info(few[0].id)  # each query file records what computed it
    assert (info["dtype"], info["device"]) == ("float32", "cpu")
    mem = locate(tiny_gated, few, CFG, pool=pool, progress=False)
    assert (mem.dtype, mem.neurons_json()["dtype"]) == ("float32", "float32")


def test_resume_in_another_dtype_is_refused_before_any_work_then_allowed_when_asked(
        tiny_gated, tiny_bf16, few, pool, tmp_path, monkeypatch):
    out = tmp_path / "run"
    locate(tiny_gated, few[:4], CFG, pool=pool, out=out, progress=False)
    calls = []
    real = executors_mod.attribute_prompts
    monkeypatch.setattr(executors_mod, "attribute_prompts",
                        lambda m, ps, *a, **k: calls.append(ps[0].query_id) or real(m, ps, *a, **k))
    with pytest.raises(StoreError) as e:
        locate(tiny_bf16, few, CFG, pool=pool, out=out, progress=False)
    assert str(e.value) == dtype_refusal(out, "float32", "bfloat16") and "\n" not in str(e.value)
    assert calls == [] and len(RunStore.load(out).manifest["queries"]) == 4  # not extended, nothing attributed
    res = locate(tiny_bf16, few, CFG, pool=pool, out=out, progress=False, allow_dtype_change=True)
    assert sorted(calls) == sorted(q.id for q in few[4:])
    man = RunStore.load(out).manifest
    assert man["dtype"] == res.dtype == "float32" and man["dtype_changes"] == ["bfloat16"]
    store = RunStore.load(out)
    assert {q.id: store.read_info(q.id)["dtype"] for q in few} == {
        q.id: "float32" if i < 4 else "bfloat16" for i, q in enumerate(few)}


def test_evaluate_refuses_another_dtype_unless_asked(tiny_gated, tiny_bf16, few, pool, tmp_path):
    out = tmp_path / "run"
    run = locate(tiny_gated, few, CFG, pool=pool, out=out, progress=False)
    with pytest.raises(StoreError) as e:
        evaluate(tiny_bf16, run, cfg=_EVAL, progress=False)
    assert str(e.value) == dtype_refusal(out, "float32", "bfloat16")
    res = evaluate(tiny_bf16, run, cfg=dataclasses.replace(_EVAL, engine=False), progress=False,
                   allow_dtype_change=True)
    assert (res.meta["dtype"], res.meta["run_dtype"], res.meta["device"], res.meta["run_device"]) == (
        "bfloat16", "float32", "cpu", "cpu")


def test_a_run_made_on_another_device_resumes_and_evaluates_here(tiny_gated, few, pool, tmp_path):
    out = tmp_path / "run"
    locate(tiny_gated, few, CFG, pool=pool, out=out, progress=False)
    path = out / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "device": "cuda:0"}))  # as if made on a GPU
    run = locate(tiny_gated, few, CFG, pool=pool, out=out, progress=False)
    assert run.device == "cuda:0"
    res = evaluate(tiny_gated, run, cfg=_EVAL, progress=False)
    assert (res.meta["device"], res.meta["run_device"]) == ("cpu", "cuda:0")


def test_an_old_run_without_a_dtype_still_loads_resumes_and_evaluates(tiny_gated, few, pool, tmp_path):
    out = tmp_path / "run"
    locate(tiny_gated, few, CFG, pool=pool, out=out, progress=False)
    path = out / "manifest.json"
    man = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in man.items() if k not in ("dtype", "device")}))
    run = reduce(out, write=False)
    assert run.dtype is None and run.device is None
    with pytest.warns(UserWarning, match=r"does not record its dtype .*treated as unknown"):
        locate(tiny_gated, few, CFG, pool=pool, out=out, progress=False)
    with pytest.warns(UserWarning, match=r"does not record its dtype .*treated as unknown"):
        res = evaluate(tiny_gated, run, cfg=_EVAL, progress=False)
    assert res.meta["run_dtype"] is None and res.meta["dtype"] == "float32"
