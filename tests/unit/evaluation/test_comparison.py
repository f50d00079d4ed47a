"""The one comparison table (qrnca_lens/comparison.py) and evaluate's wiring of ground truth, costs and free-form."""

from __future__ import annotations

import pytest

from qrnca_lens.qrnca.ig import IGConfig
from qrnca_lens.evaluation.result import COLUMNS, EvaluationResult, comparison_rows
from qrnca_lens.data.queries import limit_per_group, load_data
from qrnca_lens.evaluation.judge import EvalConfig, evaluate
from qrnca_lens.evaluation.ground_truth import ground_truth
from qrnca_lens.qrnca.locate import LocateConfig, locate
from qrnca_lens.locators.registry import LocatorContext, cut_to_qrnca, neuron_sets
from qrnca_lens.data.prompts import ProxyConfig
from qrnca_lens.qrnca.selection import SelectionConfig


def _result():
    return EvaluationResult(
        pcr={"qrnca": {"boost": 3.0, "boost_ci": [2.0, 4.0], "suppress": 2.0, "suppress_ci": [1.0, 3.0],
                       "mean_neurons": 12.0, "boost_related_mean": 5.0},
             "atp": {"boost": 1.5, "suppress": 1.1, "mean_neurons": 12.0}},
        editing={"qrnca": {"boost": 0.5, "suppress": 0.25}, "atp": {"boost": 0.1, "suppress": 0.0}},
        per_group={},
        free_form={"qrnca": {"loglik_drop": 0.7}, "random": {"loglik_drop": 0.1}, "drop_ratio": 7.0},
        ground_truth={"k": 50, "methods": {"qrnca": {"precision": 0.4, "recall": 0.3, "spearman": 0.5,
                                                     "false_negative_rate": 0.2},
                                           "atp": {"precision": 0.6, "recall": None, "spearman": float("nan"),
                                                   "false_negative_rate": 0.1}}},
        symbol_binding={"per_method": {"qrnca": {"content_share": 0.8}}},
        costs={"qrnca": {"passes": 0, "seconds_per_query": 0.001, "stored_attribution_seconds": 9.5},
               "atp": {"passes": 12, "seconds_per_query": 2.0}},
        meta={"n_prompts": 6},
    )


def test_rows_read_every_part_and_leave_the_unmeasured_empty():
    rows = {r["method"]: r for r in comparison_rows(_result())}
    q, a = rows["qrnca"], rows["atp"]
    assert (q["pcr_boost"], q["boost_ci"], q["edit_suppress"], q["free_form_drop"]) == (3.0, [2.0, 4.0], 0.25, 0.7)
    assert (q["gt_precision"], q["gt_spearman"], q["content_share"]) == (0.4, 0.5, 0.8)
    # An IG-based locator costs the attribution locate ran, not the re-read of stored scores.
    assert q["seconds_per_query"] == 9.5 and q["passes_per_prompt"] is None
    assert a["seconds_per_query"] == 2.0 and a["passes_per_prompt"] == 2.0
    # NaN and None are "not measured", never a number.
    assert a["gt_spearman"] is None and a["gt_recall"] is None and a["content_share"] is None
    assert a["free_form_drop"] is None
    assert set(q) >= {k for k, _, _ in COLUMNS}


def test_table_dataframe_and_dict_agree():
    res = _result()
    text = res.table()
    assert "GT P@k" in text and "content share" in text and "3.00 [2.00, 4.00]" in text and "9.50" in text
    df = res.to_dataframe()
    assert list(df["method"]) == ["qrnca", "atp"]
    assert df.loc[0, "gt_precision"] == 0.4 and df.loc[0, "pcr_boost_related_mean"] == 5.0
    back = EvaluationResult.from_dict(res.to_dict())
    assert comparison_rows(back) == comparison_rows(res)


def test_columns_nobody_measured_are_not_shown():
    res = EvaluationResult(pcr={"random": {"boost": 1.0, "suppress": 1.0}}, editing={}, per_group={})
    text = res.table()
    assert "GT" not in text and "content share" not in text and "PCR boost" in text


@pytest.fixture(scope="module")
def run_setup(tiny_llama):
    pool = load_data("builtin:facts")
    queries = limit_per_group(pool, 2)
    run = locate(tiny_llama, queries, LocateConfig(ProxyConfig("cloze", n_prompts=2, n_shots=1), IGConfig(steps=2)),
                 pool=pool, progress=False)
    return tiny_llama, queries, run


def test_evaluate_wires_ground_truth_costs_and_free_form(run_setup):
    model, queries, run = run_setup
    methods = ("qrnca", "atp", "random")
    cfg = EvalConfig(methods=methods, n_boot=20, neuron_prediction=False, ground_truth=True, ground_truth_k=5,
                     ground_truth_queries=1)
    res = evaluate(model, run, cfg=cfg, progress=False)
    # Ground truth: the first query of every group, each locator's uncut top-5 (not QRNCA's cut) as candidates.
    chosen = limit_per_group(run.stored_queries(), 1)
    assert set(res.ground_truth["queries"]) == {q.id for q in chosen}
    prompts = run.stored_prompts([q.id for q in chosen])
    ctx = LocatorContext(model, chosen, prompts, run, 0)
    uncut = neuron_sets(methods, ctx, cut=False)
    again = ground_truth(model, chosen, prompts, uncut, k=5, seed=0, layers=run.layers)
    assert res.ground_truth["methods"] == again.to_dict()["methods"]
    # Every method gets its free-form drop and a cost; the table shows them.
    assert set(res.free_form) >= set(methods) and all("loglik_drop" in res.free_form[m] for m in methods)
    assert res.costs["atp"]["passes"] == 2 * res.meta["n_prompts"]
    assert isinstance(res.costs["qrnca"]["stored_attribution_seconds"], float)
    assert "GT P@k" in res.table() and "free-form drop" in res.table()
    # The cut sets the other judges see are QRNCA's count, from the same rankings.
    cut = cut_to_qrnca(uncut, run)
    assert all(len(cut[m][q.id]) <= len(run.qr_neurons(q.id)) for m in methods for q in chosen)
    assert not res.symbol_binding  # cloze: the letter control does not apply


def test_ground_truth_options_are_validated():
    from qrnca_lens.errors import QrncaError

    with pytest.raises(QrncaError, match="ground_truth_k"):
        EvalConfig(ground_truth_k=0)


def test_evaluate_runs_the_symbol_binding_control_on_letter_runs(tiny_llama):
    from qrnca_lens.evaluation.symbol_binding import symbol_binding

    pool = load_data("builtin:domains")
    queries = limit_per_group(pool, 1)[:3]
    proxy = ProxyConfig("mcqa-letter", n_prompts=2, n_shots=1)
    # Three queries: ICA and common-neuron removal would leave every query without neurons, and evaluate
    # leaves a query with no neurons out (nothing to boost), so the control needs a selection that keeps some.
    keep = SelectionConfig(use_ica=False, remove_common=False)
    run = locate(tiny_llama, queries, LocateConfig(proxy, IGConfig(steps=2), keep), pool=pool, progress=False)
    assert all(run.qr_neurons(q.id) for q in queries)
    methods = ("qrnca", "random")
    res = evaluate(tiny_llama, run, cfg=EvalConfig(methods=methods, n_boot=20, neuron_prediction=False),
                   progress=False)
    prompts = run.stored_prompts()
    sets = neuron_sets(methods, LocatorContext(tiny_llama, run.stored_queries(), prompts, run, 0))
    direct = symbol_binding(tiny_llama, prompts, sets, seed=0, proxy=run.config.proxy)
    assert res.symbol_binding["per_method"] == direct.to_dict()["per_method"]
    assert set(res.symbol_binding["per_method"]) == set(methods)
    off = evaluate(tiny_llama, run, cfg=EvalConfig(methods=methods, n_boot=20, neuron_prediction=False,
                                                   symbol_binding=False), progress=False)
    assert not off.symbol_binding


def test_an_evaluate_result_is_typed_and_saves_and_loads_itself(run_setup, tmp_path):
    """evaluate() assigns plain dicts to its result; they arrive typed, and the result round-trips through disk."""
    from qrnca_lens.evaluation.result import FreeFormPart, LocatorCost

    model, _, run = run_setup
    res = evaluate(model, run, cfg=EvalConfig(methods=("qrnca", "atp", "random"), n_boot=20, neuron_prediction=False),
                   progress=False)
    assert isinstance(res.free_form, FreeFormPart) and set(res.free_form.methods) >= {"qrnca", "atp", "random"}
    assert all(isinstance(c, LocatorCost) for c in res.costs.values()) and res.costs["atp"].passes > 0
    back = EvaluationResult.load(res.save(tmp_path))
    assert back.table() == res.table() and "free-form drop" in back.table()
    pd = pytest.importorskip("pandas")
    pd.testing.assert_frame_equal(back.to_dataframe(), res.to_dataframe())
    pd.testing.assert_frame_equal(back.per_group_dataframe(), res.per_group_dataframe())
    assert set(back.per_group_dataframe()["group"]) == set(res.per_group)
