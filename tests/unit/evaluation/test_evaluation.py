"""Evaluation against plain loops: one prompt, one intervention, one forward at a time."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from qrnca_lens.qrnca.ig import IGConfig
from qrnca_lens.data.queries import limit_per_group, load_data
from qrnca_lens.errors import QrncaError
from qrnca_lens.engine.scoring import score_items
from qrnca_lens.evaluation.judge import EvalConfig, control_queries, evaluate
from qrnca_lens.model.hooks import hooked
from qrnca_lens.qrnca.locate import LocateConfig, locate
from qrnca_lens.locators.registry import LOCATORS, LocatorContext, neuron_sets, register_locator
from qrnca_lens.evaluation.metrics import pcr
from qrnca_lens.model.access import mlp_hook_name
from qrnca_lens.data.prompts import ProxyConfig, build_all_prompts


@pytest.fixture(scope="module")
def pool():
    return load_data("builtin:facts")


@pytest.fixture(scope="module")
def setup(tiny_llama, tiny_tokenizer, pool):
    model, tok = tiny_llama, tiny_tokenizer
    queries = limit_per_group(pool, 2)
    run = locate(model, queries, LocateConfig(ProxyConfig("cloze", n_prompts=2, n_shots=1), IGConfig(steps=4)),
                 pool=pool, progress=False)
    return model, tok, queries, run


def _oracle_logprob(model, prompt, neurons=(), factor=1.0, every=False):
    """log P(target) with the neurons scaled at the prompt's last position (or everywhere), unbatched."""
    pos = prompt.target_position
    seq = torch.tensor([list(prompt.tokens) + list(prompt.target[:-1])])
    hooks = []
    for layer in sorted({a for a, _ in neurons}):
        idx = [b for a, b in neurons if a == layer]

        def h(act, hook, idx=idx):
            out = act.clone()
            if every:
                out[..., idx] = act[..., idx] * factor
            else:
                out[:, pos, idx] = act[:, pos, idx] * factor
            return out

        hooks.append((mlp_hook_name(model, layer), h))
    with torch.no_grad(), hooked(model, fwd=hooks):
        lp = torch.log_softmax(model(seq)[0].double(), -1)
    return float(sum(lp[pos + t, tok] for t, tok in enumerate(prompt.target))), int(lp[pos].argmax())


def test_score_items_matches_the_loop(setup, pool):
    model, tok, queries, run = setup
    prompts = build_all_prompts(queries[:3], run.config.proxy, tok, pool=pool)
    neurons = [(a, b) for a, b, _ in run.qr_neurons(queries[0].id)][:4]
    items = [(p, (neurons, 2.0)) for ps in prompts.values() for p in ps] + [(p, None) for p in prompts[queries[1].id]]
    got = score_items(model, items, batch_size=3)
    for (p, iv), s in zip(items, got):
        lp, top = _oracle_logprob(model, p, *(iv or ((), 1.0)))
        assert s.target_logprob == pytest.approx(lp, abs=1e-4)
        assert s.predicted == top and s.correct == (top == p.target[0])


def test_pcr_and_editing_match_the_loop(setup, pool):
    model, tok, queries, run = setup
    res = evaluate(model, run, queries, pool, EvalConfig(methods=("qrnca", "random"), n_boot=50, free_form=False,
                                                         neuron_prediction=False), progress=False)
    prompts = build_all_prompts(queries, run.config.proxy, tok, pool=pool)
    controls = control_queries(queries, 0)
    ctx = LocatorContext(model, queries, prompts, run, 0)
    sets = neuron_sets(["qrnca", "random"], ctx)
    for method in ("qrnca", "random"):
        for kind, factor in (("boost", 2.0), ("suppress", 0.0)):
            rel, unr, before, after = [], [], [], []
            for q in queries:
                neurons = [(a, b) for a, b, _ in sets[method][q.id]]
                for target, out in ((q.id, rel), (controls[q.id], unr)):
                    ch = []
                    for p in prompts[target]:
                        b, top_b = _oracle_logprob(model, p)
                        a, top_a = _oracle_logprob(model, p, neurons, factor)
                        ch.append(100 * math.expm1(a - b))
                        if target == q.id:
                            before.append(top_b == p.target[0])
                            after.append(top_a == p.target[0])
                    out.append(float(np.mean(ch)))
            assert res.pcr[method][kind] == pytest.approx(pcr(rel, unr), rel=1e-4)
            assert res.pcr[method][f"{kind}_related_mean"] == pytest.approx(np.mean(rel), rel=1e-4, abs=1e-6)
            b, a = np.array(before), np.array(after)
            expected = np.mean(a[~b]) if kind == "boost" and (~b).any() else (np.mean(~a[b]) if kind == "suppress" and b.any() else None)
            if expected is not None:
                assert res.editing[method][kind] == pytest.approx(expected)
    assert "qrnca" in res.table() and set(res.to_dict()) >= {"pcr", "editing", "per_group", "free_form"}
    assert set(res.per_group) == {q.group for q in queries}


def test_free_form_drop_matches_the_loop(setup, pool):
    model, tok, queries, run = setup
    res = evaluate(model, run, queries, pool, EvalConfig(methods=("qrnca",), n_boot=20, neuron_prediction=False),
                   progress=False)
    prompts = build_all_prompts(queries, run.config.proxy, tok, pool=pool)
    drops = []
    for q in queries:
        neurons = [(a, b) for a, b, _ in run.qr_neurons(q.id)]
        for p in prompts[q.id]:
            drops.append(_oracle_logprob(model, p)[0] - _oracle_logprob(model, p, neurons, 0.0, every=True)[0])
    assert res.free_form["qrnca"]["loglik_drop"] == pytest.approx(np.mean(drops), rel=1e-4, abs=1e-6)
    assert res.free_form["n_prompts"] == len(drops)
    ff = res.free_form
    rnd = ff["random"]["loglik_drop"]  # a ratio only over a positive random drop (else it is float noise)
    assert ff["drop_ratio"] == (pytest.approx(ff["qrnca"]["loglik_drop"] / rnd) if rnd > 0 else None)


def test_neuron_prediction_reports_a_reconstruction(setup, pool):
    model, tok, queries, run = setup
    res = evaluate(model, run, queries, pool, EvalConfig(methods=("qrnca",), n_boot=20, free_form=False), progress=False)
    npred = res.neuron_prediction
    assert "reconstruction" in npred["note"]
    assert npred["n"] == sum(v["n"] for v in npred["per_group"].values()) > 0
    for v in (npred["neuron_accuracy"], npred["model_accuracy"], npred["agreement"]):
        assert 0.0 <= v <= 1.0


def test_controls_come_from_other_groups_and_one_group_is_refused(pool):
    qs = limit_per_group(pool, 3)
    c = control_queries(qs, 7)
    by = {q.id: q for q in qs}
    assert all(by[c[q.id]].group != q.group for q in qs)
    assert c == control_queries(qs, 7) and c != control_queries(qs, 8)
    one = [q for q in qs if q.group == "capital"]
    with pytest.raises(QrncaError, match="one group .*'capital'.*no unrelated control"):
        control_queries(one)


def test_same_count_per_query_and_custom_locators(setup, pool):
    model, tok, queries, run = setup
    prompts = build_all_prompts(queries, run.config.proxy, tok, pool=pool)
    ctx = LocatorContext(model, queries, prompts, run, 0)

    @register_locator("test-first")
    def first(c):
        return {q.id: [(0, i, 1.0) for i in range(100)] for q in c.queries}

    try:
        sets = neuron_sets(["qrnca", "activation", "test-first", "random", "kn"], ctx)
        for q in queries:
            n = len(run.qr_neurons(q.id))
            assert len(sets["activation"][q.id]) == len(sets["test-first"][q.id]) == len(sets["random"][q.id]) == n
            assert len(sets["kn"][q.id]) <= n
        assert sets["random"] == neuron_sets(["random"], ctx)["random"]
    finally:
        LOCATORS.pop("test-first")
    with pytest.raises(QrncaError, match="unknown method"):
        neuron_sets(["nope"], ctx)


def test_evaluate_judges_the_prompts_the_run_stored(setup, pool, monkeypatch):
    """No pool given: every stage still sees the prompts locate attributed (drawn from the pool), not a rebuild."""
    from dataclasses import replace

    import qrnca_lens.lens as lens_mod
    from qrnca_lens.qrnca.executors import SerialExecutor
    from qrnca_lens.lens import LensResult
    from qrnca_lens.neurons import NeuronSet

    model, tok, queries, run = setup
    attributed = build_all_prompts(queries, run.config.proxy, tok, pool=pool)
    scored = []

    class Recording(SerialExecutor):
        def score_items(self, items, **kw):
            scored.extend(p for p, _ in items)
            return super().score_items(items, **kw)

    lens_saw = {}

    def fake_lens(model, qs, proxy, *, prompts=None, **kw):
        lens_saw.update(prompts)
        return LensResult(config={}, model="fake", model_identity={}, layers=[0], groups={q.id: q.group for q in qs},
                          neurons={q.id: NeuronSet([(0, 0, 1.0)]) for q in qs}, certified={q.id: True for q in qs},
                          target_logprob={q.id: 0.0 for q in qs})

    monkeypatch.setattr(lens_mod, "lens_locate", fake_lens)
    cfg = EvalConfig(methods=("qrnca", "logprob"), n_boot=20, free_form=False)
    res = evaluate(model, run, queries, cfg=cfg, progress=False, executor=Recording(model))
    assert set(scored) == {p for ps in attributed.values() for p in ps}
    assert lens_saw == attributed
    # A pool with other answers (as if the data file were edited) changes nothing, neuron prediction included.
    edited = [replace(q, answer=q.answer[::-1]) for q in pool]
    again = evaluate(model, run, [q.id for q in queries], edited, cfg, progress=False)
    assert again.neuron_prediction == res.neuron_prediction and again.pcr == res.pcr
    assert again.editing == res.editing and res.neuron_prediction["n"] > 0


def test_evaluate_refuses_another_tokenizer(setup, monkeypatch):
    import copy

    import qrnca_lens.evaluation.judge as evaluation_mod

    model, tok, queries, run = setup
    other = copy.deepcopy(tok)
    other.add_tokens(["<qrnca-test-extra>"])
    monkeypatch.setattr(evaluation_mod, "tokenizer_of", lambda m: other)
    with pytest.raises(QrncaError, match="another tokenizer.*the model the run was made with"):
        evaluate(model, run, queries, cfg=EvalConfig(methods=("qrnca",), n_boot=20), progress=False)


def test_engine_and_full_sequence_paths_give_the_same_evaluation(setup, pool):
    """PCR, editing and neuron-based prediction through the row engine == through full sequences."""
    model, tok, queries, run = setup
    kw = dict(methods=("qrnca", "kn", "random"), n_boot=50, free_form=False, neuron_prediction=True, group_neurons=10)
    fast = evaluate(model, run, queries, cfg=EvalConfig(**kw), progress=False).to_dict()
    slow = evaluate(model, run, queries, cfg=EvalConfig(**kw, engine=False), progress=False).to_dict()
    assert fast["neuron_prediction"]["n"] > 0
    fast["meta"].pop("config"), slow["meta"].pop("config")

    def close(a, b, path=""):
        if isinstance(a, dict):
            assert set(a) == set(b), path
            for k in a:
                if path == "" and k in ("costs", "timings"):  # wall-clock seconds: never the same twice
                    assert set(a[k]) == set(b[k])
                    continue
                close(a[k], b[k], f"{path}.{k}")
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b), path
            for i, (x, y) in enumerate(zip(a, b)):
                close(x, y, f"{path}[{i}]")
        elif isinstance(a, float):
            assert a == pytest.approx(b, rel=1e-3, abs=1e-6) or (math.isnan(a) and math.isnan(b)), path
        else:
            assert a == b, path

    close(fast, slow)


def test_score_items_engine_equals_full_sequences_with_options(setup, pool):
    """Letter MCQA (options read at one row) and answer-text MCQA (one row per multi-token option)."""
    model, tok, queries, run = setup
    neurons = [(a, b) for a, b, _ in run.qr_neurons(queries[0].id)][:6]
    for kind in ("mcqa-letter", "mcqa-text"):
        prompts = build_all_prompts(queries[:3], ProxyConfig(kind, n_prompts=2, n_shots=1), tok, pool=pool)
        items = [(p, iv) for ps in prompts.values() for p in ps for iv in (None, (neurons, 0.0), (neurons, 2.0))]
        fast = score_items(model, items)
        slow = score_items(model, items, engine=False)
        for a, b in zip(fast, slow):
            assert a.target_logprob == pytest.approx(b.target_logprob, abs=1e-5)
            assert (a.predicted, a.correct) == (b.predicted, b.correct)


# ---------------------------------------------------------------- grouping by another field


@pytest.fixture(scope="module")
def lang_run(tiny_llama, pool, tmp_path_factory):
    """A tiny stored run whose queries carry a language (the 1st of each relation "xx", the 2nd "yy") and a
    relation, located with group_by="language"."""
    base = limit_per_group(pool, 2)
    queries = [replace(q, language="xx" if i % 2 == 0 else "yy", relation=q.group) for i, q in enumerate(base)]
    out = tmp_path_factory.mktemp("lang") / "run"
    cfg = LocateConfig(ProxyConfig("cloze", n_prompts=2, n_shots=1), IGConfig(steps=4))
    run = locate(tiny_llama, queries, cfg, pool=pool, out=out, progress=False, group_by="language")
    return tiny_llama, queries, run, out


def test_neurons_json_carries_language_relation_and_the_runs_group_by(lang_run):
    from qrnca_lens.qrnca.locate import reduce

    _, queries, run, out = lang_run
    doc = json.loads((out / "neurons.json").read_text())
    by_id = {q.id: q for q in queries}
    for qid, e in doc["queries"].items():
        assert (e["group"], e["language"], e["relation"]) == (by_id[qid].group, by_id[qid].language, by_id[qid].relation)
    assert doc["group_by"] == run.group_by == "language"
    assert reduce(out, write=False).group_by == "language"  # recorded in the manifest


def test_evaluate_groups_and_draws_controls_by_the_chosen_field(lang_run):
    model, queries, run, _ = lang_run
    cfg = EvalConfig(methods=("qrnca",), n_boot=20, free_form=False, neuron_prediction=False)
    by_id = {q.id: q for q in queries}
    controls_of = {}
    for group_by, field in (("relation", "relation"), (None, "language")):  # None: the run's, language
        res = evaluate(model, run, cfg=replace(cfg, group_by=group_by), progress=False)
        controls_of[group_by] = res.meta["controls"]
        key = {q.id: getattr(q, field) for q in queries}
        assert set(res.per_group) == set(key.values()), group_by
        assert set(res.per_group["xx" if field == "language" else "capital"]["editing"]) == {"qrnca"}
        controls = res.meta["controls"]
        assert all(key[c] != key[q] for q, c in controls.items()), group_by
        assert res.meta["group_by"] == field
    # By language half the controls share their query's relation: that is the point of judging by language.
    lang = controls_of[None]
    assert any(by_id[c].relation == by_id[q].relation for q, c in lang.items())
    assert control_queries(queries, 0, by="language") == lang


def test_group_by_on_queries_without_the_field_fails_before_any_work(tiny_llama, pool):
    cfg = LocateConfig(ProxyConfig("cloze", n_prompts=2, n_shots=1), IGConfig(steps=4))
    with pytest.raises(QrncaError, match="cannot group by 'language'.*add a 'language' field"):
        locate(tiny_llama, limit_per_group(pool, 1), cfg, pool=pool, progress=False, group_by="language")
    with pytest.raises(QrncaError, match="group_by must be one of"):
        EvalConfig(group_by="subject")


# ---------------------------------------------------------------- any Located, an explicit budget, empty sets


def _light(**kw):
    return EvalConfig(**{"n_boot": 20, "free_form": False, "neuron_prediction": False, **kw})


def test_evaluate_a_ranked_result_judges_its_own_neurons_to_its_own_count(setup):
    import qrnca_lens as ql
    from qrnca_lens.locators.registry import RankConfig

    model, tok, queries, run = setup
    atp = ql.locate(model, queries, RankConfig(top_k=5), method="atp", run=run, progress=False)  # the run's prompts
    res = evaluate(model, atp, cfg=_light(free_form=True), progress=False)
    assert (res.meta["located"], res.meta["methods"], res.meta["budget"]) == ("atp", ["atp", "random"], "own")
    assert "own count" in res.meta["budget_note"]
    assert res.pcr["atp"]["mean_neurons"] == res.pcr["random"]["mean_neurons"] == 5.0
    assert res.costs["atp"] == atp.costs  # the cost of the locate that found them, not of a second one
    assert res.free_form["drop_ratio_of"] == "atp" and "atp" in res.free_form
    # The same judgement as the QRNCA run's evaluate of atp cut to 5: same prompts, controls and neurons.
    same = evaluate(model, run, cfg=_light(methods=("atp", "random"), budget=5), progress=False)
    assert res.pcr == same.pcr and res.editing == same.editing and res.per_group == same.per_group


def test_evaluate_a_lens_result(setup):
    from qrnca_lens.lens import lens_locate

    model, tok, queries, run = setup
    lens = lens_locate(model, queries, run.config.proxy, prompts=run.stored_prompts(), top_k=5, progress=False)
    res = evaluate(model, lens, cfg=_light(neuron_prediction=True, group_neurons=5), progress=False)
    assert (res.meta["located"], res.meta["methods"], res.meta["budget"]) == ("logprob", ["logprob", "random"], "own")
    assert res.pcr["logprob"]["mean_neurons"] == 5.0 and res.neuron_prediction["method"] == "logprob"
    assert res.costs["logprob"]["passes"] == sum(len(v) for v in run.stored_prompts().values())
    same = evaluate(model, run, cfg=_light(methods=("logprob", "random"), budget=5), progress=False)
    assert res.pcr == same.pcr and res.editing == same.editing


def test_an_integer_budget_cuts_every_method_to_k(setup):
    model, tok, queries, run = setup
    res = evaluate(model, run, cfg=_light(methods=("qrnca", "atp", "kn", "random"), budget=3), progress=False)
    assert res.meta["budget"] == 3 and res.meta["budget_note"] == "every method cut to 3 neurons per query"
    assert res.pcr["atp"]["mean_neurons"] == res.pcr["random"]["mean_neurons"] == 3.0
    assert res.pcr["qrnca"]["mean_neurons"] == np.mean([min(3, len(run.qr_neurons(q.id))) for q in queries])
    assert res.pcr["kn"]["mean_neurons"] <= 3.0
    default = evaluate(model, run, cfg=_light(methods=("qrnca", "random")), progress=False)
    assert default.meta["budget"] == "qrnca" and "QRNCA's count" in default.meta["budget_note"]
    assert default.pcr["random"]["mean_neurons"] == np.mean([len(run.qr_neurons(q.id)) for q in queries])


def test_the_qrnca_budget_on_another_method_locates_qrnca_on_its_prompts(setup):
    import qrnca_lens as ql

    model, tok, queries, run = setup
    atp = ql.locate(model, queries, method="atp", run=run, progress=False)  # the whole ranking (144 <= TOP)
    res = evaluate(model, atp, cfg=_light(budget="qrnca"), progress=False)
    qr = locate(model, queries, LocateConfig(run.config.proxy, layers=tuple(run.layers)), prompts=run.stored_prompts(),
                progress=False)  # QRNCA (default IG) on the very prompts: the counts the budget takes
    want = np.mean([len(qr.qr_neurons(q.id)) for q in queries])
    assert res.pcr["atp"]["mean_neurons"] == res.pcr["random"]["mean_neurons"] == want
    assert res.meta["methods"] == ["atp", "random"] and res.meta["budget"] == "qrnca"


def test_a_query_without_neurons_is_named_counted_and_left_out(setup):
    model, tok, queries, run = setup
    prompts = run.stored_prompts()
    gap = queries[0].id

    @register_locator("test-gap")
    def qrnca_but_one(ctx):
        return {q.id: [] if q.id == gap else run.qr_neurons(q.id) for q in ctx.queries}

    @register_locator("test-none")
    def nothing(ctx):
        return {q.id: [] for q in ctx.queries}

    try:
        with pytest.warns(UserWarning, match=rf"'test-gap' has no neurons for 1 of {len(queries)} queries \({gap}\)"):
            res = evaluate(model, run, cfg=_light(methods=("test-gap", "test-none"), free_form=True), progress=False)
    finally:
        LOCATORS.pop("test-gap")
        LOCATORS.pop("test-none")
    p = res.pcr["test-gap"]
    assert (p["n_empty"], p["empty_queries"], res.meta["n_empty"]["test-gap"]) == (1, [gap], 1)
    # Its numbers are QRNCA's over the other queries only (the plain loop), not a 0 for the empty one.
    controls = control_queries(queries, 0)
    kept = [q for q in queries if q.id != gap]
    for kind, factor in (("boost", 2.0), ("suppress", 0.0)):
        rel, unr = [], []
        for q in kept:
            neurons = [(a, b) for a, b, _ in run.qr_neurons(q.id)]
            for target, out in ((q.id, rel), (controls[q.id], unr)):
                out.append(float(np.mean([100 * math.expm1(_oracle_logprob(model, x, neurons, factor)[0]
                                                          - _oracle_logprob(model, x)[0]) for x in prompts[target]])))
        assert p[kind] == pytest.approx(pcr(rel, unr), rel=1e-4)
    edit = res.editing["test-gap"]
    assert edit["n_wrong"] + edit["n_right"] == sum(len(prompts[q.id]) for q in kept)
    assert res.free_form["test-gap"]["n_empty"] == 1
    # A method with no neuron anywhere: counted, every number None, never a measured "no change".
    none = res.pcr["test-none"]
    assert none["n_empty"] == len(queries) and none["boost"] is None and none["suppress"] is None
    assert res.editing["test-none"]["n_wrong"] == res.editing["test-none"]["n_right"] == 0
    assert res.free_form["test-none"]["loglik_drop"] is None


def test_evaluate_writes_evaluation_json_into_the_results_directory(setup, tmp_path):
    import qrnca_lens as ql
    from qrnca_lens.evaluation.judge import evaluation_doc
    from qrnca_lens.located import RankedResult
    from qrnca_lens.locators.registry import RandomConfig

    model, tok, queries, run = setup
    ql.locate(model, queries, RandomConfig(top_k=3), method="random", run=run, progress=False, out=tmp_path / "r")
    saved = RankedResult.load(tmp_path / "r")
    res = evaluate(model, saved, cfg=_light(), progress=False, save=False)
    assert not (tmp_path / "r" / "evaluation.json").exists()
    res = evaluate(model, saved, cfg=_light(), progress=False)
    doc = json.loads((tmp_path / "r" / "evaluation.json").read_text())
    assert doc == json.loads(json.dumps(evaluation_doc(res, saved)))
    assert doc["meta"]["budget"] == "own" and "selection" not in doc["meta"]


def test_evaluate_shows_a_bar_per_stage_and_is_quiet_without_progress(setup, capsys):
    model, tok, queries, run = setup
    cfg = EvalConfig(methods=("qrnca", "random"), n_boot=20, group_neurons=5)
    evaluate(model, run, cfg=cfg, progress=False)
    quiet = capsys.readouterr()
    assert quiet.err == "" and quiet.out == ""
    evaluate(model, run, cfg=cfg, progress=True)
    err = capsys.readouterr().err
    for desc in ("locate qrnca", "locate random", "free-form greedy (clean)", "free-form greedy (qrnca)",
                 "free-form", "neuron prediction"):
        assert desc in err, desc


# ---------------------------------------------------------------- the profile: seconds per stage


def test_evaluate_times_each_stage_and_the_times_are_saved(setup, tmp_path, monkeypatch):
    import time

    from qrnca_lens.evaluation import judge
    from qrnca_lens.evaluation.result import EvaluationResult

    model, tok, queries, run = setup
    # A known delay inside two stages: each must land in its own stage (greedy inside free form), not elsewhere.
    greedy, npred = judge._greedy, judge._neuron_prediction
    calls = []

    def slow_greedy(*a, **k):
        calls.append(1)
        time.sleep(0.05)
        return greedy(*a, **k)

    def slow_npred(*a, **k):
        time.sleep(0.2)
        return npred(*a, **k)

    monkeypatch.setattr(judge, "_greedy", slow_greedy)
    monkeypatch.setattr(judge, "_neuron_prediction", slow_npred)
    cfg = EvalConfig(methods=("qrnca", "random"), n_boot=20, group_neurons=5, ground_truth=True, ground_truth_k=2,
                     ground_truth_queries=1)
    t0 = time.perf_counter()
    res = evaluate(model, run, cfg=cfg, progress=False)
    wall = time.perf_counter() - t0
    t = res.timings
    assert list(t.stages()) == ["prepare", "locate", "scored_rows", "pcr_editing", "free_form", "neuron_prediction",
                                "ground_truth"]
    assert t.symbol_binding is None  # a cloze run has no letters to re-letter
    assert all(v >= 0 for v in t.to_dict().values() if v is not None)
    assert sum(t.stages().values()) <= t.total + 1e-6 and t.total <= wall
    assert len(calls) == 3 and 0.15 <= t.free_form_greedy <= t.free_form  # clean, qrnca, random
    assert t.neuron_prediction >= 0.2
    # The locators' own seconds (costs) are inside the locate stage.
    assert sum(c.seconds for c in res.costs.values()) <= t.locate + 1e-6
    assert res.table().splitlines()[-1] == t.line()
    back = EvaluationResult.load(res.save(tmp_path))
    assert back.timings == t and back.timings.to_dict() == t.to_dict()


def test_a_stage_that_does_not_run_has_no_seconds(setup):
    model, tok, queries, run = setup
    t = evaluate(model, run, cfg=_light(methods=("qrnca", "random")), progress=False).timings
    assert list(t.stages()) == ["prepare", "locate", "scored_rows", "pcr_editing"]
    assert (t.free_form, t.free_form_greedy, t.neuron_prediction, t.ground_truth) == (None, None, None, None)
    assert sum(t.stages().values()) <= t.total + 1e-6
