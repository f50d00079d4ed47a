"""EvaluationResult as a result that saves itself: typed parts, save/load, tidy frames, a figure, notebook HTML,
and the report drawn from results in memory."""

from __future__ import annotations

import copy
import doctest
import json
import sys

import numpy as np
import pytest

from qrnca_lens.evaluation import result as comparison
from qrnca_lens.evaluation.result import (
    BindingScores,
    EvaluationResult,
    FreeFormPart,
    FreeFormScores,
    GroundTruthPart,
    GroundTruthScores,
    LocatorCost,
    StageTimings,
    SymbolBindingPart,
)
from qrnca_lens.errors import QrncaError, StoreError

# evaluation.json as qrnca-lens wrote it before the parts were typed (`qrnca-lens evaluate`, trimmed to two
# methods and one query): the CLI's meta.selection, the version key, free-form methods next to its totals,
# a cost without stored_attribution_seconds (atp) and one with it (qrnca).
OLD_FILE = {
    "pcr": {
        "qrnca": {"mean_neurons": 4.0, "boost": 3.0, "boost_ci": [2.0, 4.5], "boost_ci_dropped": 0,
                  "boost_related_mean": 12.0, "boost_unrelated_mean": -4.0, "boost_related_abs": 12.0,
                  "boost_unrelated_abs": 4.0, "suppress": 2.0, "suppress_ci": [1.5, 2.5], "suppress_ci_dropped": 0,
                  "suppress_related_mean": -30.0, "suppress_unrelated_mean": 15.0, "suppress_related_abs": 30.0,
                  "suppress_unrelated_abs": 15.0},
        "atp": {"mean_neurons": 4.0, "boost": 1.2, "boost_ci": [0.8, 1.9], "boost_ci_dropped": 0, "suppress": 0.9,
                "suppress_ci": [float("nan"), float("nan")], "suppress_ci_dropped": 20},
    },
    "editing": {"qrnca": {"boost": 0.5, "suppress": 0.25, "n_wrong": 2, "n_right": 4},
                "atp": {"boost": None, "suppress": 0.0, "n_wrong": 0, "n_right": 4}},
    "per_group": {
        "capital": {"pcr": {"qrnca": {"boost": 2.5, "boost_related_mean": 10.0, "suppress": 1.5,
                                      "suppress_related_mean": -20.0},
                            "atp": {"boost": None, "boost_related_mean": 1.0, "suppress": 0.5,
                                    "suppress_related_mean": -1.0}},
                    "editing": {"qrnca": {"boost": 0.5, "suppress": 0.0, "n_wrong": 2, "n_right": 2},
                                "atp": {"boost": None, "suppress": 0.0, "n_wrong": 0, "n_right": 2}}},
        "color": {"pcr": {"qrnca": {"boost": 4.0, "boost_related_mean": 14.0, "suppress": 3.0,
                                    "suppress_related_mean": -40.0}},
                  "editing": {"qrnca": {"boost": None, "suppress": 0.5, "n_wrong": 0, "n_right": 2}}},
    },
    "free_form": {"intervention": "suppress (x0) at every position", "n_prompts": 6, "exact_match_before": 0.5,
                  "qrnca": {"loglik_drop": 0.7, "exact_match_after": 0.25},
                  "atp": {"loglik_drop": 0.2, "exact_match_after": 0.5},
                  "random": {"loglik_drop": 0.1, "exact_match_after": 0.5}, "drop_ratio": 7.0},
    "neuron_prediction": {"note": "reconstruction", "neuron_accuracy": 0.5, "model_accuracy": 0.5, "agreement": 1.0,
                          "n": 2, "per_group": {"capital": {"neuron": 0.5, "model": 0.5, "agree": 1.0, "n": 2}}},
    "ground_truth": {"k": 5, "seed": 0, "factors": [0.0, 2.0], "layers": [0, 1, 2], "exhaustive": False,
                     "queries": {"capital-01": {"neurons": [[0, 1], [2, 3]], "n_union": 2, "effects": [[0.1, 0.2]],
                                                "clean_logprob": [-1.0], "true_top": [[2, 3]], "metrics": {}}},
                     "methods": {m: {"n_queries": {"precision": 1, "recall": 1, "spearman": 1,
                                                   "false_negative_rate": 1, "n_ranked": 1},
                                     "precision": p, "recall": 0.5, "spearman": None, "false_negative_rate": 0.0,
                                     "n_ranked": 5.0} for m, p in (("qrnca", 0.6), ("atp", 0.4))},
                     "meta": {"n_queries": 1, "near_zero": 0.01}},
    "symbol_binding": {},
    "costs": {"qrnca": {"passes": 0, "stored_attribution_seconds": 9.5, "seconds": 0.01, "seconds_per_query": 0.005},
              "atp": {"passes": 24, "seconds": 4.0, "seconds_per_query": 2.0}},
    "meta": {"n_queries": 2, "n_prompts": 12, "group_by": "group", "selection": {"t": 0.2, "u": 0.3, "v": 20}},
    "qrnca_lens_version": "0.1.0",
}

# OLD_FILE's table as qrnca-lens printed it before the parts were typed (its comparison.py, run on OLD_FILE).
OLD_TABLE = """\
method                  PCR boost         PCR suppress edit boost edit suppr. free-form drop GT P@k GT R@k GT FN s/query passes/prompt neurons
----------------------------------------------------------------------------------------------------------------------------------------------
qrnca           3.00 [2.00, 4.50]    2.00 [1.50, 2.50]      50.0%       25.0%         +0.700   0.60   0.50  0.00    9.50             -     4.0
atp             1.20 [0.80, 1.90]          0.90 [-, -]          -        0.0%         +0.200   0.40   0.50  0.00    2.00             2     4.0
GT: agreement with exact single-neuron zero-ablation on each query's candidates (union of the locators' top-5 + as many random)
s/query: the locator's seconds per query on this machine (IG-based ones: the attribution locate stored); passes/prompt: forward or backward passes over one prompt"""


def _old() -> EvaluationResult:
    return EvaluationResult.from_dict(copy.deepcopy(OLD_FILE))


# ---------------------------------------------------------------- typed parts


def test_an_old_evaluation_json_loads_typed_and_prints_the_same_table():
    res = _old()
    assert res.table() == OLD_TABLE
    assert isinstance(res.ground_truth, GroundTruthPart) and res.ground_truth.k == 5
    assert res.ground_truth.factors == (0.0, 2.0) and res.ground_truth.methods["qrnca"].precision == 0.6
    assert isinstance(res.free_form, FreeFormPart) and set(res.free_form.methods) == {"qrnca", "atp", "random"}
    assert res.free_form.methods["atp"] == FreeFormScores(loglik_drop=0.2, exact_match_after=0.5)
    assert res.costs["atp"] == LocatorCost(seconds=4.0, seconds_per_query=2.0, passes=24)
    assert isinstance(res.symbol_binding, SymbolBindingPart) and not res.symbol_binding
    # Every part still reads as the dict it was (what code written against evaluation.json does).
    for key in ("free_form", "ground_truth", "symbol_binding"):
        assert getattr(res, key) == OLD_FILE[key], key
    assert list(res.free_form) == list(OLD_FILE["free_form"])  # the flat order of the file
    assert res.free_form["qrnca"]["loglik_drop"] == 0.7 and res.ground_truth["queries"]["capital-01"]["n_union"] == 2
    # Saved again, the format is the file's; unmeasured cost fields are written as null.
    back = json.loads(json.dumps(res.to_dict()))
    assert back["free_form"] == OLD_FILE["free_form"] and back["ground_truth"] == OLD_FILE["ground_truth"]
    assert back["costs"]["atp"] == {**OLD_FILE["costs"]["atp"], "stored_attribution_seconds": None}
    # (JSON text, not ==: the file's NaN interval is a new NaN object after a round trip, and NaN != NaN.)
    assert json.dumps(EvaluationResult.from_dict(back).to_dict()) == json.dumps(res.to_dict())


def test_parts_convert_plain_dicts_given_or_assigned_as_evaluate_does():
    res = EvaluationResult(pcr={"qrnca": {"boost": 2.0}}, editing={}, per_group={},
                           ground_truth={"k": 3, "methods": {"qrnca": {"precision": 0.5}}})
    assert res.ground_truth.methods["qrnca"] == GroundTruthScores(precision=0.5)
    # evaluate() assigns plain dicts after construction; each converts on assignment.
    res.costs = {"qrnca": {"passes": 0, "seconds": 1.0, "seconds_per_query": 0.5}}
    res.free_form = {"intervention": "x", "qrnca": {"loglik_drop": 0.3, "exact_match_after": 0.0}, "drop_ratio": None}
    res.symbol_binding = {"per_method": {"qrnca": {"content_share": 0.8, "flag": None}},
                          "per_query": {"qrnca": {"q1": {"content_share": 1.0}}}, "per_prompt": [{"method": "qrnca"}]}
    assert isinstance(res.costs["qrnca"], LocatorCost) and res.costs["qrnca"].seconds_per_query == 0.5
    assert res.free_form.methods["qrnca"].loglik_drop == 0.3 and res.free_form.intervention == "x"
    assert res.symbol_binding.per_method["qrnca"] == BindingScores(content_share=0.8)
    assert res.symbol_binding.per_query["qrnca"]["q1"].content_share == 1.0
    assert comparison.comparison_rows(res)[0]["content_share"] == 0.8
    # A result object with to_dict (what ground_truth() and symbol_binding() return) converts too.
    res.symbol_binding = SymbolBindingPart(per_method={"qrnca": BindingScores(content_share=0.1)})
    assert res.symbol_binding.per_method["qrnca"].content_share == 0.1
    # Every part round-trips through JSON.
    for part in (res.ground_truth, res.free_form, res.symbol_binding, res.costs["qrnca"]):
        again = type(part).from_dict(json.loads(json.dumps(part.to_dict())))
        assert again == part and again.to_dict() == part.to_dict()
    assert EvaluationResult.from_dict(json.loads(json.dumps(res.to_dict()))) == res


def test_default_parts_are_fresh_and_empty():
    a = EvaluationResult(pcr={}, editing={}, per_group={})
    b = EvaluationResult(pcr={}, editing={}, per_group={})
    assert a.free_form is not b.free_form and a.costs is not b.costs
    a.costs["x"] = LocatorCost(passes=1)
    assert b.costs == {}
    assert a.to_dict()["free_form"] == {} and a.to_dict()["ground_truth"] == {} and not a.ground_truth


def test_keys_a_part_does_not_name_are_kept_and_bad_values_named():
    newer = {"k": 5, "methods": {"qrnca": {"precision": 0.5, "n_candidates": 12}}, "schema": 2}
    gt = GroundTruthPart.from_dict(newer)
    assert gt.extra == {"schema": 2} and gt.methods["qrnca"].extra == {"n_candidates": 12}
    assert gt.to_dict()["schema"] == 2 and gt.to_dict()["methods"]["qrnca"]["n_candidates"] == 12
    ff = FreeFormPart.from_dict({"qrnca": {"loglik_drop": 0.1}, "note": "beyond the paper"})
    assert ff.extra == {"note": "beyond the paper"} and ff["note"] == "beyond the paper"
    with pytest.raises(QrncaError, match=r"^LocatorCost.passes must be a number or None, got 'many'"):
        EvaluationResult(pcr={}, editing={}, per_group={}, costs={"qrnca": {"passes": "many"}})
    with pytest.raises(QrncaError, match=r"GroundTruthPart.methods\['qrnca'\] must be a mapping, got float"):
        GroundTruthPart.from_dict({"methods": {"qrnca": 0.5}})
    res = EvaluationResult(pcr={}, editing={}, per_group={})
    with pytest.raises(QrncaError, match="EvaluationResult.free_form must be a dict"):
        res.free_form = 3  # type: ignore[assignment]
    with pytest.raises(QrncaError, match=r"unknown EvaluationResult keys \['zz'\]"):
        EvaluationResult.from_dict({**OLD_FILE, "zz": 1})


def test_stage_timings_are_a_part_of_disjoint_stages_that_refuses_negative_seconds():
    t = StageTimings.from_dict({"prepare": 0.5, "locate": 2.0, "scored_rows": 1.5, "free_form": 1.0,
                                "free_form_greedy": 0.75, "total": 5.5})
    # The greedy decoding is inside free form and the total is no stage: neither is in the disjoint stages.
    assert t.stages() == {"prepare": 0.5, "locate": 2.0, "scored_rows": 1.5, "free_form": 1.0}
    assert sum(t.stages().values()) == 5.0 <= t.total
    assert t.line() == "seconds: total 5.50; prepare 0.50, locate 2.00, scored rows 1.50, free form 1.00 (greedy 0.75)"
    assert t["locate"] == 2.0 and t.ground_truth is None and t == json.loads(json.dumps(t.to_dict()))
    assert not StageTimings() and StageTimings().to_dict() == {} and StageTimings().line() == ""
    with pytest.raises(QrncaError, match=r"^StageTimings.locate must be seconds >= 0 or None, got -1.0$"):
        StageTimings(locate=-1.0)
    with pytest.raises(QrncaError, match=r"^StageTimings.total must be a number or None, got 'long'$"):
        StageTimings.from_dict({"total": "long"})


def test_timings_save_and_load_and_an_old_file_without_them_loads(tmp_path):
    old = _old()
    assert "timings" not in OLD_FILE and not old.timings and old.timings.total is None
    assert old.to_dict()["timings"] == {} and "seconds:" not in old.table()
    res = _old()
    res.timings = {"prepare": 0.01, "locate": 1.25, "scored_rows": 2.5, "pcr_editing": 0.125, "total": 4.0}
    assert isinstance(res.timings, StageTimings) and res.timings.scored_rows == 2.5
    # The last note of the table, after the explanations.
    assert res.table().splitlines()[-1] == ("seconds: total 4.00; prepare 0.01, locate 1.25, scored rows 2.50, "
                                            "PCR/editing 0.12")
    assert res.table().splitlines()[:-1] == old.table().splitlines()
    back = EvaluationResult.load(res.save(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "evaluation.json").read_text())["timings"]["locate"] == 1.25
    assert isinstance(back.timings, StageTimings) and back.timings == res.timings and back.table() == res.table()
    assert "seconds: total 4.00" in back._repr_html_()


def test_comparison_examples_run():
    result = doctest.testmod(comparison, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 5 and result.failed == 0


# ---------------------------------------------------------------- save / load


def test_save_then_load_gives_the_same_table_and_frames(tmp_path):
    res = _old()
    path = res.save(tmp_path / "run")
    assert path == tmp_path / "run" / "evaluation.json"
    assert sorted(p.name for p in path.parent.iterdir()) == ["evaluation.json"]  # no temporary file left
    assert json.loads(path.read_text())["qrnca_lens_version"]
    for where in (tmp_path / "run", path):
        back = EvaluationResult.load(where)
        assert back.table() == res.table() and json.dumps(back.to_dict()) == json.dumps(res.to_dict())
        pd = pytest.importorskip("pandas")
        pd.testing.assert_frame_equal(back.to_dataframe(), res.to_dataframe())
        pd.testing.assert_frame_equal(back.per_group_dataframe(), res.per_group_dataframe())


@pytest.mark.parametrize("content, match", [
    (None, r"does not exist: run `qrnca-lens evaluate`"),
    ("{not json", r"is not valid JSON"),
    ("[1, 2]", r"is not an evaluation.json qrnca-lens can read \(EvaluationResult.from_dict needs a mapping"),
    ('{"pcr": {}, "editing": {}, "per_group": {}, "costs": {"qrnca": 3}}',
     r"is not an evaluation.json qrnca-lens can read \(EvaluationResult.costs\['qrnca'\] must be a mapping"),
    ('{"pcr": {}}', r"is not an evaluation.json qrnca-lens can read"),
])
def test_a_bad_or_missing_file_is_one_store_error_line(tmp_path, content, match):
    if content is not None:
        (tmp_path / "evaluation.json").write_text(content)
    with pytest.raises(StoreError, match=match) as info:
        EvaluationResult.load(tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path / "evaluation.json") in str(info.value)


# ---------------------------------------------------------------- tidy frames


def test_to_dataframe_is_tidy_method_first_with_interval_bounds():
    pytest.importorskip("pandas")
    df = _old().to_dataframe()
    cols = list(df.columns)
    assert cols[:7] == ["method", "pcr_boost", "pcr_boost_lo", "pcr_boost_hi", "pcr_suppress", "pcr_suppress_lo",
                        "pcr_suppress_hi"]
    assert cols[7:7 + len(comparison.COLUMNS) - 2] == [k for k, _, _ in comparison.COLUMNS[2:]]
    assert "boost_ci" not in cols and "pcr_boost_ci" not in cols
    assert not any(isinstance(v, (list, tuple, dict)) for v in df.to_numpy().ravel())
    q, a = df.set_index("method").loc["qrnca"], df.set_index("method").loc["atp"]
    assert (q["pcr_boost"], q["pcr_boost_lo"], q["pcr_boost_hi"]) == (3.0, 2.0, 4.5)
    assert np.isnan(a["pcr_suppress_lo"]) and a["pcr_suppress"] == 0.9  # a NaN interval: no bound
    assert q["pcr_boost_related_mean"] == 12.0 and q["pcr_suppress_ci_dropped"] == 0
    assert np.isnan(a["pcr_boost_related_mean"])  # a number the atp entry does not have
    empty = EvaluationResult(pcr={}, editing={}, per_group={}).to_dataframe()
    assert list(empty.columns)[:4] == ["method", "pcr_boost", "pcr_boost_lo", "pcr_boost_hi"] and len(empty) == 0


def test_per_group_dataframe_matches_a_plain_loop_over_the_nested_dicts():
    pytest.importorskip("pandas")
    res = _old()
    df = res.per_group_dataframe()
    assert list(df.columns)[:6] == ["group", "method", "pcr_boost", "pcr_suppress", "edit_boost", "edit_suppress"]
    expected = {}
    for g, d in OLD_FILE["per_group"].items():
        for m in d["pcr"]:
            expected[(g, m)] = {**{f"pcr_{k}": v for k, v in d["pcr"][m].items()},
                                **{f"edit_{k}": v for k, v in d["editing"][m].items()}}
    assert [(r.group, r.method) for r in df.itertuples()] == list(expected)
    for r in df.to_dict("records"):
        want = expected[(r["group"], r["method"])]
        for k, v in want.items():
            assert (v is None and (r[k] is None or np.isnan(r[k]))) or r[k] == v, (r["group"], r["method"], k)


# ---------------------------------------------------------------- the figure


def test_plot_draws_one_bar_per_method_with_its_interval():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = _old()
    ax = res.plot()
    try:
        boost, suppress = ax.containers
        assert [b.get_height() for b in boost] == [3.0, 1.2]
        assert [b.get_height() for b in suppress] == [2.0, 0.9]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["qrnca", "atp"]
        # The vertical interval segments: both boosts, and the one suppress interval that is finite.
        segments = [seg for coll in ax.collections for seg in coll.get_segments() if seg[0][0] == seg[1][0]]
        spans = sorted((round(float(s[0][1]), 6), round(float(s[1][1]), 6)) for s in segments)
        assert spans == [(0.8, 1.9), (1.5, 2.5), (2.0, 4.5)]
        _, given = plt.subplots()
        assert res.plot(ax=given) is given
    finally:
        plt.close("all")


def test_plot_without_matplotlib_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(QrncaError, match=r"^EvaluationResult.plot needs matplotlib, which is not installed: "
                                         r"pip install matplotlib$"):
        _old().plot()


# ---------------------------------------------------------------- notebook display


def test_evaluation_result_displays_as_an_html_table():
    html = _old()._repr_html_()
    assert "<pre>" not in html and "<table>" in html and html.count("<tr>") == 3  # head + two methods
    assert "<b>qrnca</b>" in html and "3.00 <span class=muted>[2.00, 4.50]</span>" in html and "50.0%" in html
    assert "GT P@k" in html and "2 queries" in html and "top-5" in html


# ---------------------------------------------------------------- the report from results in memory


@pytest.fixture(scope="module")
def tiny_run(tiny_llama):
    from qrnca_lens.qrnca.ig import IGConfig
    from qrnca_lens.data.queries import limit_per_group, load_data
    from qrnca_lens.qrnca.locate import LocateConfig, locate
    from qrnca_lens.data.prompts import ProxyConfig

    facts = [q for q in limit_per_group(load_data("builtin:facts"), 2) if q.group in ("capital", "color")]
    cfg = LocateConfig(ProxyConfig("cloze", n_prompts=2, n_shots=1), IGConfig(steps=2))
    return locate(tiny_llama, facts, cfg, progress=False)


def _evaluation_of(run) -> EvaluationResult:
    res = _old()
    res.meta = {**res.meta, "selection": run.config.selection.to_dict()}
    return res


def test_write_report_of_a_result_in_memory_shows_its_evaluation(tmp_path, tiny_run, tiny_gated):
    from qrnca_lens.render.report import write_report

    assert tiny_run.out is None
    with pytest.raises(QrncaError, match="never saved to a run directory.*pass out=PATH"):
        write_report(tiny_run)
    path = write_report(tiny_run, tiny_gated, evaluation=_evaluation_of(tiny_run), out=tmp_path / "r.html",
                        n_queries=1)
    html = path.read_text()
    assert "id=evaluation" in html and "<b>qrnca</b>" in html and "3.00 <span class=muted>[2.00, 4.50]</span>" in html
    assert "in memory" in html and "another selection" not in html
    # The prompts come from the result itself: views drawn, nothing rebuilt.
    assert 'class="cv-view"' in html and "Prompts rebuilt" not in html and "Views skipped" not in html
    # The same from the plain dict, without a model.
    bare = write_report(tiny_run, evaluation=_evaluation_of(tiny_run).to_dict(), out=tmp_path / "b.html").read_text()
    assert "<b>atp</b>" in bare and "No model given" in bare


def test_write_report_of_a_saved_result_reads_its_evaluation_json(tmp_path, tiny_run):
    from qrnca_lens.render.report import write_report
    from qrnca_lens.qrnca.selection import SelectionConfig

    tiny_run.save(tmp_path / "run")
    from qrnca_lens.qrnca.locate import LocateResult

    run = LocateResult.load(tmp_path / "run")
    assert "id=evaluation" not in write_report(run).read_text()  # no evaluation yet: no section
    _evaluation_of(run).save(run.out)
    path = write_report(run)
    assert path == tmp_path / "run" / "report.html"
    html = path.read_text()
    assert "id=evaluation" in html and "<b>atp</b>" in html and str((tmp_path / "run").resolve()) in html
    # A reselected result shown with the directory's evaluation: the report says the two differ.
    other = run.reselect(SelectionConfig(v=3, use_ica=False, remove_common=False))
    assert "another selection" in write_report(other, out=tmp_path / "o.html").read_text()
    # An evaluation given explicitly wins over the directory's.
    mine = EvaluationResult(pcr={"mine": {"boost": 9.0}}, editing={}, per_group={})
    shown = write_report(run, evaluation=mine, out=tmp_path / "m.html").read_text()
    assert "<b>mine</b>" in shown and "<b>atp</b>" not in shown
    with pytest.raises(QrncaError, match="write_report takes a run directory or a located result"):
        write_report(42, out=tmp_path / "x.html")


def test_every_result_type_displays_itself_in_a_notebook():
    """A notebook shows any result as HTML: the Config base gives each config/result a field table; the
    lens's TopNeurons and the Selection say what they hold."""
    import torch

    from qrnca_lens.evaluation.ground_truth import GroundTruthResult
    from qrnca_lens.lens.exact import top_from_scores
    from qrnca_lens.qrnca.locate import LocateConfig
    from qrnca_lens.qrnca.selection import Cluster, SelectionConfig, select

    cfg_html = LocateConfig()._repr_html_()
    assert cfg_html.startswith("<b>LocateConfig</b>") and "<td>proxy</td>" in cfg_html
    gt = GroundTruthResult(k=5, seed=0, factors=(0.0, 2.0), layers=(0, 1), exhaustive=False, queries={}, methods={})
    assert gt._repr_html_().startswith("<b>GroundTruthResult</b>") and "<td>factors</td>" in gt._repr_html_()
    top = top_from_scores(torch.tensor([[0.0, 3.0], [2.0, 1.0]]), 2)
    assert "certified" in top._repr_html_() and "<table" in top._repr_html_()
    a = Cluster(torch.tensor([[0, 0], [1, 1]]), torch.tensor([3.0, 1.0]), shape=(2, 2))
    sel = select({"a": a, "b": a}, SelectionConfig(u=0.5))
    assert "2 queries" in sel._repr_html_() and "common neurons" in sel._repr_html_()
