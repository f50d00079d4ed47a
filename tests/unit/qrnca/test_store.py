"""Files the package writes: atomic, umask permissions, no temporary file left behind (also on failure)."""

from __future__ import annotations

import json
import os
import re

import pytest

from qrnca_lens.cli import lens
from qrnca_lens.errors import StoreError
from qrnca_lens.qrnca.store import RunStore, check_run_dtype, dtype_refusal, write_json_atomic
from qrnca_lens.render.report import write_report

from test_render import _tiny_run


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


def _leftovers(directory, name):
    return [p.name for p in directory.iterdir() if p.name != name and name in p.name]


def test_report_html_gets_umask_permissions_and_leaves_no_temp_file(tmp_path, umask_022):
    run = _tiny_run(tmp_path)
    path = write_report(run)
    assert path.stat().st_mode & 0o777 == umask_022  # mkstemp would have made it 0600: unreadable to others
    assert path.read_text().startswith("<!DOCTYPE html>")
    assert _leftovers(run, "report.html") == []


def test_lens_json_gets_umask_permissions_and_leaves_no_temp_file(tmp_path, umask_022):
    path = tmp_path / "lens.json"
    lens._write_json(path, {"rows": [1, 2]})
    assert json.loads(path.read_text()) == {"rows": [1, 2]}
    assert path.stat().st_mode & 0o777 == umask_022
    assert _leftovers(tmp_path, "lens.json") == []


@pytest.mark.parametrize("write", [lambda p: lens._write_json(p, {"a": 1}),
                                   lambda p: write_report(p.parent),
                                   lambda p: write_json_atomic(p, {"a": 1})])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch, write):
    run = _tiny_run(tmp_path)
    target = run / "out.json"
    target.write_text("old")
    (run / "report.html").write_text("old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write(target)
    assert target.read_text() == "old" and (run / "report.html").read_text() == "old"
    assert [p.name for p in run.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"] == []


def test_concurrent_writers_use_distinct_temporary_files(tmp_path, monkeypatch):
    """A fixed temporary name (``x.json.tmp``) lets two writers interleave into one file; ours never share one."""
    seen = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: seen.append(os.fspath(src)) or real(src, dst))
    lens._write_json(tmp_path / "lens.json", {"a": 1})
    lens._write_json(tmp_path / "lens.json", {"a": 2})
    assert len(set(seen)) == 2 and all(os.path.basename(s).startswith(".lens.json.") for s in seen)


# ---------------------------------------------------------------- dtype and device are part of a run


_RUN = {"model": "tiny", "queries": {"q1": "g"}}


def _refusal(root, recorded, asked):
    return re.escape(dtype_refusal(root, recorded, asked))


def test_the_manifest_records_dtype_and_device(tmp_path):
    store = RunStore.open(tmp_path, {**_RUN, "dtype": "float32", "device": "cuda:0"})
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert (man["dtype"], man["device"]) == ("float32", "cuda:0")
    again = RunStore.load(tmp_path)
    assert (again.dtype, again.device) == ("float32", "cuda:0") == (store.dtype, store.device)


def test_another_dtype_is_refused_in_one_line_naming_both_and_the_way_out(tmp_path):
    RunStore.open(tmp_path, {**_RUN, "dtype": "float32", "device": "cpu"})
    with pytest.raises(StoreError, match=_refusal(tmp_path, "float32", "bfloat16")) as e:
        RunStore.open(tmp_path, {**_RUN, "dtype": "bfloat16", "device": "cpu"})
    msg = str(e.value)
    assert "\n" not in msg and msg == (
        f"run {tmp_path} was made in float32; this model is bfloat16: load it with --dtype float32 "
        '(load_model(..., dtype="float32")), or pass --allow-dtype-change (allow_dtype_change=True) to mix them')
    assert "dtype_changes" not in json.loads((tmp_path / "manifest.json").read_text())  # a refusal writes nothing


def test_another_dtype_is_allowed_when_asked_and_recorded(tmp_path):
    RunStore.open(tmp_path, {**_RUN, "dtype": "float32", "device": "cpu"})
    for _ in range(2):  # asked twice: recorded once
        store = RunStore.open(tmp_path, {**_RUN, "dtype": "float16", "device": "cpu"}, allow_dtype_change=True)
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["dtype"] == store.dtype == "float32"  # the run's own dtype stays the one it was made in
    assert man["dtype_changes"] == store.manifest["dtype_changes"] == ["float16"]


def test_another_device_is_fine_and_the_first_one_stays_recorded(tmp_path):
    RunStore.open(tmp_path, {**_RUN, "dtype": "bfloat16", "device": "cuda:0"})
    store = RunStore.open(tmp_path, {**_RUN, "dtype": "bfloat16", "device": "cpu"})  # a cuda run resumes on cpu
    assert store.device == "cuda:0" and "dtype_changes" not in store.manifest


def test_an_old_manifest_without_dtype_loads_and_is_said_to_be_unknown(tmp_path):
    RunStore.open(tmp_path, dict(_RUN))  # what a run made before dtypes were recorded looks like
    assert "dtype" not in json.loads((tmp_path / "manifest.json").read_text())
    old = RunStore.load(tmp_path)
    assert old.dtype is None and old.device is None
    with pytest.warns(UserWarning, match=r"does not record its dtype .*treated as unknown"):
        store = RunStore.open(tmp_path, {**_RUN, "dtype": "bfloat16", "device": "cpu"})
    assert store.dtype is None  # not invented afterwards: the finished queries' dtype is still unknown


def test_check_run_dtype():
    assert check_run_dtype("r", "bfloat16", "bfloat16") is False
    assert check_run_dtype("r", "bfloat16", "float32", allow=True) is True
    with pytest.raises(StoreError, match=_refusal("r", "bfloat16", "float32")):
        check_run_dtype("r", "bfloat16", "float32")
    with pytest.warns(UserWarning, match="unknown"):
        assert check_run_dtype("r", None, "float32") is False


def test_the_manifest_records_how_to_reload_the_model_and_an_old_run_learns_it(tmp_path):
    RunStore.open(tmp_path, dict(_RUN))  # a run made before model_source was recorded
    assert RunStore.load(tmp_path).model_source is None
    store = RunStore.open(tmp_path, {**_RUN, "model_source": {"path": "/ckpt/tiny"}})  # resumed: it learns it
    assert store.model_source == RunStore.load(tmp_path).model_source == {"path": "/ckpt/tiny"}
    RunStore.open(tmp_path, {**_RUN, "model_source": {"path": "/elsewhere"}})  # not identity, and not rewritten
    assert RunStore.load(tmp_path).model_source == {"path": "/ckpt/tiny"}


def test_an_old_embedded_run_reloads_by_its_model_identity(tmp_path):
    ident = {"embedded": "smollm2", "gguf": "smollm2.gguf", "gguf_sha256": "0" * 64}
    RunStore.open(tmp_path, {**_RUN, "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "model_identity": ident})
    assert RunStore.load(tmp_path).model_source == {"embedded": "smollm2"}
