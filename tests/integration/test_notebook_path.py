"""The notebook path end to end, from Python only (issue 21's done-when): plain dicts -> two locators ->
evaluate each -> save / load -> a report with the evaluation table -> the run's model reloaded from the run."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

import qrnca_lens as ql

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _facts() -> list[dict[str, str]]:
    return [{"id": f"{g}-{i}", "group": g, "question": f"The {g} of thing {i} is", "answer": a}
            for g, answers in (("colour", ("red", "blue", "green")), ("size", ("big", "small", "tiny")))
            for i, a in enumerate(answers)]


def test_dicts_to_two_locators_evaluated_saved_loaded_and_reported(tiny_checkpoint, tmp_path):
    model = ql.load_model(str(tiny_checkpoint))
    proxy = ql.ProxyConfig("cloze", n_prompts=2, n_shots=1)
    facts = _facts()
    qrnca = ql.locate(model, facts, ql.LocateConfig(proxy=proxy, ig=ql.IGConfig(steps=4)), out=tmp_path / "q",
                      progress=False)
    atp = ql.locate(model, facts, ql.RankConfig(proxy=proxy, top_k=6), method="atp", out=tmp_path / "a",
                    progress=False)
    assert isinstance(qrnca, ql.LocateResult) and isinstance(atp, ql.RankedResult)
    assert qrnca.query_ids == atp.query_ids == [f["id"] for f in facts]
    # The two methods ranked the very same prompts (so their verdicts compare like with like).
    assert {q: [p.tokens for p in ps] for q, ps in qrnca.stored_prompts().items()} == \
        {q: [p.tokens for p in ps] for q, ps in atp.stored_prompts().items()}

    quick = dict(n_boot=50, free_form=False, neuron_prediction=False)
    res_q = ql.evaluate(model, qrnca, cfg=ql.EvalConfig(methods=("qrnca", "atp", "random"), **quick), progress=False)
    res_a = ql.evaluate(model, atp, cfg=ql.EvalConfig(budget=4, **quick), progress=False)
    assert set(res_q.pcr) == {"qrnca", "atp", "random"} and set(res_a.pcr) == {"atp", "random"}
    assert res_a.meta["budget"] == 4 and res_a.pcr["atp"]["mean_neurons"] == 4.0
    assert "4 neurons per query" in res_a.table()

    # evaluate wrote each verdict into its run directory; loading gives the same table and frame.
    for res, d in ((res_q, tmp_path / "q"), (res_a, tmp_path / "a")):
        back = ql.EvaluationResult.load(d)
        assert back.table() == res.table()
        assert back.to_dataframe().equals(res.to_dataframe())
        assert list(res.to_dataframe().columns[:1]) == ["method"]

    # A report from the in-memory result shows the evaluation table with every method of it.
    page = ql.write_report(qrnca, model)
    html = Path(page).read_text()
    assert "PCR boost" in html and all(f">{m}<" in html for m in ("qrnca", "atp", "random"))

    # The run alone reloads its model: same weights, same dtype.
    run = ql.LocateResult.load(tmp_path / "q")
    again = ql.load_model(run.model)
    assert next(again.parameters()).dtype == next(model.parameters()).dtype
    a = dict(again.named_parameters())
    assert all(torch.equal(p, a[n]) for n, p in model.named_parameters())
    assert json.loads((tmp_path / "q" / "manifest.json").read_text())["model_source"]["path"] == \
        str(tiny_checkpoint.resolve())


def test_example_04_runs_on_a_local_checkpoint(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QRNCA_EXAMPLE_MODEL", str(tiny_checkpoint))
    ns = runpy.run_path(str(EXAMPLES / "04_notebook_path.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "PCR boost" in out and "report:" in out and "pcr_suppress_lo" in out
    assert isinstance(ns["atp"], ql.RankedResult) and (tmp_path / "runs/notebook/atp/evaluation.json").is_file()


# (A number is refused by the type-checking import hook under pytest before as_queries sees it.)
@pytest.mark.parametrize("bad", ["just text", [["a", "b"]], {"id": "x"}])
def test_inputs_a_notebook_might_hold_get_one_line(tiny_llama, bad):
    with pytest.raises(ql.QrncaError) as e:
        ql.locate(tiny_llama, bad, ql.LocateConfig(), progress=False)
    assert "\n" not in str(e.value)
