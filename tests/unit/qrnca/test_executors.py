"""RayExecutor against SerialExecutor on the tiny Llama: same neurons, same evaluation, and workers killed mid-run.

A local Ray cluster of 2 CPUs runs in this process for the module (no dashboard); every executor has 2 actors,
each loading the tiny checkpoint by path. Skipped as a whole when ray is not installed (the ``ray`` extra).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from qrnca_lens.qrnca.ig import IGConfig
from qrnca_lens.data.queries import limit_per_group, load_data
from qrnca_lens.errors import QrncaError
from qrnca_lens.evaluation.judge import EvalConfig, evaluate
from qrnca_lens.qrnca.executors import RayExecutor, SerialExecutor
from qrnca_lens.qrnca.locate import LocateConfig, locate
from qrnca_lens.data.prompts import ProxyConfig

CFG = LocateConfig(proxy=ProxyConfig("cloze", n_prompts=2, n_shots=1), ig=IGConfig(steps=4))
EVAL = EvalConfig(methods=("qrnca", "random"), n_boot=50, free_form=False, neuron_prediction=False)
# Evaluation numbers, Ray vs serial. Measured on this model: every float exactly equal (the chunked batches change
# nothing at this width). On SmolLM2 they move log-probs by ~1e-5 relative: see docs/ray.md.
REL_TOL = 1e-6


def test_ray_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail, installed or not
    with pytest.raises(QrncaError, match=r"qrnca-lens\[ray\]"):
        RayExecutor("smollm2")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'qrnca-lens[ray]')")
    # Ray nices its workers to 15; on a machine shared with other jobs they would then crawl.
    old = os.environ.get("RAY_worker_niceness")
    os.environ["RAY_worker_niceness"] = "0"
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 object_store_memory=200 * 1024 * 1024)
    finally:
        if old is None:
            os.environ.pop("RAY_worker_niceness", None)
        else:
            os.environ["RAY_worker_niceness"] = old
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def pool():
    return load_data("builtin:facts")


@pytest.fixture(scope="module")
def queries(pool):
    return limit_per_group(pool, 2)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from qrnca_lens.model.loading import load_model

    return load_model(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def serial(model, queries, pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial") / "run"
    res = locate(model, queries, CFG, pool=pool, out=out, progress=False, name="tiny")
    return res, _neurons(out)


@pytest.fixture(scope="module")
def _executors(ray_cluster):
    held = {}
    yield held
    for ex in held.values():
        ex.shutdown()


@pytest.fixture
def executor(_executors, tiny_checkpoint):
    """One 2-actor executor shared by the tests (the 2-CPU cluster holds one at a time); remade if a test broke it."""
    ex = _executors.get("ex")
    if ex is None or len(ex.actors) < 2:
        if ex is not None:
            ex.shutdown()
        ex = _executors["ex"] = RayExecutor(str(tiny_checkpoint), workers=2, startup_timeout=120)
    return ex


def _neurons(out):
    return json.loads((Path(out) / "neurons.json").read_text())


def _close(a, b, path="", rel=REL_TOL):
    """Nested dicts/lists equal; floats within ``rel`` relative (1e-9 absolute near zero); an evaluation's
    ``costs`` and ``timings`` (wall-clock seconds, never the same twice) only name the same methods / stages."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for k in a:
            if path == "" and k in ("costs", "timings"):
                assert set(a[k]) == set(b[k]), path
                continue
            _close(a[k], b[k], f"{path}.{k}", rel)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]", rel)
    elif isinstance(a, float) and isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=1e-9), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_locate_and_evaluate_match_serial(executor, model, queries, pool, serial, tmp_path):
    info = executor.worker_info()
    assert len(info) == 2 and {w["threads"] for w in info} == {torch.get_num_threads()}
    out = tmp_path / "ray"
    res = locate(model, queries, CFG, pool=pool, out=out, progress=False, name="tiny", executor=executor)
    assert _neurons(out) == serial[1]  # bit-identical scores -> identical neurons.json
    # a rerun on the finished directory has nothing left to attribute
    assert locate(model, queries, CFG, pool=pool, out=out, progress=False, name="tiny",
                  executor=executor).neurons_json() == res.neurons_json()

    run = serial[0]
    want = evaluate(model, run, queries, pool, EVAL, progress=False).to_dict()
    got = evaluate(model, run, queries, pool, EVAL, progress=False, executor=executor).to_dict()
    # Each actor packs its own share of the rows into engine chunks, and float32 reductions depend on a
    # chunk's shape: log-probabilities agree to ~1e-6, not bit for bit (locate above stays bit-identical). A
    # PCR divides by the mean change of unrelated prompts, tiny for random neurons on this tiny model, which
    # magnifies that noise to ~1e-4 relative.
    _close(got, want, rel=2e-3)


def test_score_items_keeps_input_order(executor, model, queries, pool, serial):
    from qrnca_lens.data.prompts import build_all_prompts

    run = serial[0]
    prompts = build_all_prompts(queries, run.config.proxy, model.tokenizer, pool=pool)
    iv = ([(a, b) for a, b, _ in run.qr_neurons(queries[0].id)], 0.0)
    items = [(p, iv if k % 3 else None) for k, p in enumerate(p for ps in prompts.values() for p in ps)]
    want = SerialExecutor(model).score_items(items, batch_size=3)
    got = executor.score_items(items, batch_size=3)
    assert [(s.predicted, s.correct) for s in got] == [(s.predicted, s.correct) for s in want]
    assert [s.target_logprob for s in got] == pytest.approx([s.target_logprob for s in want], rel=REL_TOL)
    assert executor.score_items([]) == []


def _items(model, queries, pool, run):
    from qrnca_lens.data.prompts import build_all_prompts

    prompts = build_all_prompts(queries, run.config.proxy, model.tokenizer, pool=pool)
    iv = ([(a, b) for a, b, _ in run.qr_neurons(queries[0].id)], 2.0)
    return [(p, iv if k % 2 else None) for k, p in enumerate(p for ps in prompts.values() for p in ps)]


def test_the_serial_executor_passes_progress_through(model, capsys):
    from qrnca_lens.data.prompts import build_all_prompts

    pool = load_data("builtin:facts")
    prompts = build_all_prompts(limit_per_group(pool, 3), ProxyConfig("cloze"), model.tokenizer, pool=pool)
    items = [(p, None) for ps in prompts.values() for p in ps]  # 45 prompts: several engine steps
    quiet = SerialExecutor(model).score_items(items, progress=False)
    assert "scoring" not in capsys.readouterr().err
    assert SerialExecutor(model).score_items(items) == quiet
    assert "scoring: 100%" in capsys.readouterr().err


def test_ray_scoring_shows_a_bar_over_the_workers_chunks_on_the_driver(executor, model, queries, pool, serial, capsys):
    items = _items(model, queries, pool, serial[0])
    quiet = executor.score_items(items, progress=False)
    assert "scoring" not in capsys.readouterr().err
    assert [s.predicted for s in executor.score_items(items)] == [s.predicted for s in quiet]
    err = capsys.readouterr().err
    assert "scoring: 100%" in err and "2/2" in err and "chunk" in err


def test_a_worker_loads_a_runs_model_by_its_reference(_executors, model, queries, pool, tmp_path):
    """The CLI hands run.model (a ModelRef) to the executor: the workers load the recorded checkpoint from it."""
    from qrnca_lens.qrnca.locate import LocateResult

    if "ex" in _executors:  # the 2-CPU cluster holds one executor at a time: the shared one is remade after
        _executors["ex"].shutdown()
    run = locate(model, queries, CFG, pool=pool, out=tmp_path / "run", progress=False, name="a-name-no-loader-knows")
    ref = LocateResult.load(tmp_path / "run").model
    ex = RayExecutor(ref, workers=1, startup_timeout=120)
    try:
        items = _items(model, queries, pool, run)
        want = SerialExecutor(model).score_items(items, progress=False)
        assert [s.target_logprob for s in ex.score_items(items)] == pytest.approx(
            [s.target_logprob for s in want], rel=REL_TOL)
    finally:
        ex.shutdown()


def test_a_worker_that_cannot_load_the_model_fails_fast(ray_cluster):
    with pytest.raises(QrncaError, match=r"could not load the model.*unknown model '/nonexistent'"):
        RayExecutor("/nonexistent", workers=1, cpus_per_worker=0, startup_timeout=120)


class _KillAfterFirst:
    """Passes results through; after the first one arrives, kills a worker that still has queries in flight."""

    def __init__(self, ex, kill):
        self.ex, self.kill = ex, kill

    def attribute(self, jobs, ig, layers):
        for k, result in enumerate(self.ex.attribute(jobs, ig, layers)):
            if k == 0:
                self.kill(self.ex)
            yield result

    def score_items(self, items, **kw):  # the rest of the Executor protocol, passed through
        return self.ex.score_items(items, **kw)


def test_worker_killed_mid_run_restarts_and_the_run_completes(executor, model, queries, pool, serial, tmp_path):
    ex = executor
    before = [w["pid"] for w in ex.worker_info()]
    out = tmp_path / "killed"
    locate(model, queries, CFG, pool=pool, out=out, progress=False, name="tiny",
           executor=_KillAfterFirst(ex, lambda e: os.kill(before[1], signal.SIGKILL)))
    assert _neurons(out) == serial[1]
    after = [w["pid"] for w in ex.worker_info()]
    assert after[0] == before[0] and after[1] != before[1]  # Ray restarted the killed actor (new process)


def test_worker_lost_for_good_its_queries_move_to_the_survivor(ray_cluster, executor, model, queries, pool, serial,
                                                               tmp_path):
    ex = executor
    out = tmp_path / "lost"
    resubmitted = ex.resubmitted
    locate(model, queries, CFG, pool=pool, out=out, progress=False, name="tiny",
           executor=_KillAfterFirst(ex, lambda e: ray_cluster.kill(e.actors[1], no_restart=True)))
    assert _neurons(out) == serial[1]
    assert ex.resubmitted > resubmitted and len(ex.actors) == 1  # its queries went to the survivor
    # scoring goes on with the one worker left
    from qrnca_lens.data.prompts import build_all_prompts

    prompts = build_all_prompts(queries[:3], serial[0].config.proxy, model.tokenizer, pool=pool)
    items = [(p, None) for ps in prompts.values() for p in ps]
    got = [s.target_logprob for s in ex.score_items(items)]
    assert got == pytest.approx([s.target_logprob for s in SerialExecutor(model).score_items(items)], rel=REL_TOL)
