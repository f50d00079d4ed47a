"""The examples run top to bottom as a user runs them (cell scripts): a changed API breaks them here first."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.slow  # loads SmolLM2 once for its tokenizer; the model itself is a tiny random bridge
def test_your_own_model_example_runs_in_float32_and_bfloat16(capsys):
    ns = runpy.run_path(str(EXAMPLES / "03_your_own_model.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "hooks left: 0" in out and "refused: the model carries hooks of yours" in out
    fast, ref, got = ns["fast"], ns["ref"], ns["got"]
    assert float((fast - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    assert float((got - fast).abs().max()) <= 0.05 * float(fast.abs().max())  # bf16 vs float32
