"""Files the package writes: atomic, umask permissions, no temporary file left behind (also on failure)."""

from __future__ import annotations

import json
import os

import pytest

from qrnca_lens.cli import lens
from qrnca_lens.store import write_json_atomic
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
