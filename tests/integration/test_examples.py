"""The examples run top to bottom as a user runs them (cell scripts): a changed API breaks them here first.

The fast tests run them in-process on the tiny local checkpoint (``QRNCA_EXAMPLE_MODEL``) with one query per
relation (``QRNCA_EXAMPLE_LIMIT``): 01 writes a run, 02 reads it back through ``load_model(run.model)`` and the
run's stored queries, as a user does after 01. The slow one runs 03 on its default, SmolLM2's tokenizer.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(name, monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *argv])  # runpy leaves pytest's own argv otherwise
    return runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_examples_01_then_02_run_on_a_local_checkpoint(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QRNCA_EXAMPLE_MODEL", str(tiny_checkpoint))
    monkeypatch.setenv("QRNCA_EXAMPLE_LIMIT", "1")
    monkeypatch.setenv("QRNCA_EXAMPLE_RUN", "run01")
    one = _run("01_locate_and_intervene.py", monkeypatch)
    out = capsys.readouterr().out
    assert "cloze: accuracy" in out and "LocateResult(" in out and "boosted" in out and "suppressed" in out
    assert len(one["queries"]) == 5 and (tmp_path / "run01" / "neurons.json").is_file()
    man = json.loads((tmp_path / "run01" / "manifest.json").read_text())
    assert man["model_source"] == {"path": str(tiny_checkpoint.resolve())}

    # 02 from another directory, given only the run: its model, dtype and queries come from the run itself.
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.delenv("QRNCA_EXAMPLE_MODEL")
    two = _run("02_prove_and_map.py", monkeypatch, str(tmp_path / "run01"))
    out = capsys.readouterr().out
    assert two["model"].cfg.n_layers == one["model"].cfg.n_layers
    assert [q.id for q in two["queries"]] == [q.id for q in one["queries"]]
    assert set(two["res"].pcr) == {"qrnca", "activation", "random", "logprob"} and "PCR boost" in out
    assert (tmp_path / "run01" / "report.html").is_file() and "report:" in out


def _check_03(ns, out):
    assert "hooks left: 0" in out and "refused: the model carries hooks of yours" in out
    fast, ref, got = ns["fast"], ns["ref"], ns["got"]
    assert float((fast - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    assert float((got - fast).abs().max()) <= 0.05 * float(fast.abs().max())  # bf16 vs float32


def test_your_own_model_example_runs_on_a_local_tokenizer(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setenv("QRNCA_EXAMPLE_MODEL", str(tiny_checkpoint))
    ns = _run("03_your_own_model.py", monkeypatch)
    _check_03(ns, capsys.readouterr().out)


@pytest.mark.slow  # loads SmolLM2 once for its tokenizer; the model itself is a tiny random bridge
def test_your_own_model_example_runs_in_float32_and_bfloat16(monkeypatch, capsys):
    monkeypatch.delenv("QRNCA_EXAMPLE_MODEL", raising=False)
    ns = _run("03_your_own_model.py", monkeypatch)
    _check_03(ns, capsys.readouterr().out)
