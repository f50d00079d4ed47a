"""The ``qrnca-lens lens`` handler (qrnca_lens/cli/lens.py)."""

from __future__ import annotations

import json

from qrnca_lens.lens import BASELINES
from qrnca_lens.cli import lens as lens_mod


def test_cmd_lens_writes_neurons_and_comparison(tiny_checkpoint, tmp_path, monkeypatch):
    from qrnca_lens.model import loading as models
    from qrnca_lens.cli import build_parser

    real = models.load_model

    def fake_load(name, **kw):  # cmd_lens loads by name; the tiny checkpoint stands in for it
        return real(str(tiny_checkpoint))

    monkeypatch.setattr(models, "load_model", fake_load)
    # Through the real parser, so the arguments are the ones generated from the config dataclasses.
    args = build_parser().parse_args(["lens", "--model", "tiny", "--data", "builtin:facts", "--proxy", "cloze",
                                      "--out", str(tmp_path / "run"), "--top", "4", "--limit", "1", "--shots", "1",
                                      "--templates", "2", "--seed", "0", "--quiet", "--compare",
                                      "--compare-prompts", "4", "--compare-k", "5"])
    assert lens_mod.cmd_lens(args) == 0
    doc = json.loads((tmp_path / "run" / "neurons.json").read_text())
    assert doc["model"] == "tiny" and doc["data"] == "builtin:facts"
    assert all(len(v["qr_neurons"]) == 4 for v in doc["queries"].values())
    table = json.loads((tmp_path / "run" / "lens.json").read_text())
    assert [r["method"] for r in table["rows"]] == list(BASELINES) + ["random"]
    assert all(r["n_prompts"] == 4 and r["k"] == 5 for r in table["rows"])
