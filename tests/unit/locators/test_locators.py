"""One locator shape: the registry, ``locate(..., method=NAME)`` for every built-in, ``RankedResult`` on disk."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import qrnca_lens as ql
from qrnca_lens.qrnca.ig import IGConfig
from qrnca_lens.data.queries import limit_per_group, load_data
from qrnca_lens.errors import QrncaError, StoreError
from qrnca_lens.locators.first_order import atp_scores, dla_scores
from qrnca_lens.lens import LensConfig, lens_locate, neuron_scores
from qrnca_lens.qrnca.locate import LocateConfig, LocateResult, locate
from qrnca_lens.located import Located, RankedResult
from qrnca_lens.locators.registry import (
    LOCATORS,
    TOP,
    ContextLocator,
    Locator,
    LogprobConfig,
    RandomConfig,
    RankConfig,
    coerce_config,
    register_locator,
)
from qrnca_lens.model.access import d_mlp, model_name, n_layers
from qrnca_lens.data.prompts import ProxyConfig, build_all_prompts
from qrnca_lens.qrnca.selection import SelectionConfig

PROXY = ProxyConfig("cloze", n_prompts=2, n_shots=1)
CFG = LocateConfig(PROXY, IGConfig(steps=2))
BUILTINS = ("qrnca", "no-ica", "with-common", "kn", "activation", "atp", "dla", "logprob", "random")


@pytest.fixture(scope="module")
def facts():
    return load_data("builtin:facts")


@pytest.fixture(scope="module")
def queries(facts):
    return limit_per_group(facts, 1)  # five groups: enough for ICA and common neurons


@pytest.fixture(scope="module")
def run(tiny_llama, queries, facts):
    return locate(tiny_llama, queries, CFG, pool=facts, progress=False)


# ---------------------------------------------------------------- the registry


def test_the_registry_refuses_a_duplicate_name_unless_replace(tiny_llama, queries, run):
    def first(ctx):
        return {q.id: [(0, i, 1.0) for i in range(3)] for q in ctx.queries}

    def second(ctx):
        return {q.id: [(1, i, 2.0) for i in range(2)] for q in ctx.queries}

    register_locator("test-dup", first)
    try:
        with pytest.raises(QrncaError, match=r"'test-dup' is already registered; .*replace=True"):
            register_locator("test-dup", second)
        with pytest.raises(QrncaError, match="already registered"):
            LOCATORS["test-dup"] = ContextLocator("test-dup", second)  # the mapping refuses too
        assert LOCATORS["test-dup"].fn is first
        assert register_locator("test-dup", second, replace=True) is second
        assert LOCATORS["test-dup"].fn is second
        # The old fn(ctx) form goes through the one shape: a RankedResult from ql.locate.
        res = ql.locate(tiny_llama, queries, RankConfig(PROXY), method="test-dup", run=run, progress=False)
        assert isinstance(res, RankedResult) and res.locator == "test-dup"
        assert all(res.qr_neurons(q.id).to_list() == [[1, 0, 2.0], [1, 1, 2.0]] for q in queries)
    finally:
        LOCATORS.pop("test-dup")
    with pytest.raises(QrncaError, match="already registered"):
        register_locator("atp", first)  # a built-in is protected the same way


def test_a_locator_object_registers_under_its_own_name(tiny_llama, queries, run):
    class Everything:
        name = "test-object"
        config_class = RankConfig

        def locate(self, model, queries, cfg=None, *, prompts=None, run=None, progress=True, seed=0):
            return ContextLocator(self.name, lambda ctx: {q.id: [(2, 5)] for q in ctx.queries}).locate(
                model, queries, cfg, prompts=prompts, run=run, progress=progress, seed=seed)

    obj = Everything()
    assert isinstance(obj, Locator)
    with pytest.raises(QrncaError, match="differs from the name"):
        register_locator("other-name", obj)
    register_locator("test-object", obj)
    try:
        from qrnca_lens.locators.registry import LocatorContext, neuron_sets

        # evaluate's context reaches an object's own locate, on the context's prompts.
        sets = neuron_sets(["test-object"], LocatorContext(tiny_llama, queries, run.stored_prompts(), run), cut=False)
        assert all(sets["test-object"][q.id].pairs() == [(2, 5)] for q in queries)
    finally:
        LOCATORS.pop("test-object")


def test_configs_are_coerced_or_refused():
    atp = LOCATORS["atp"]
    got = coerce_config(atp, LocateConfig(PROXY, layers=(1,)))
    assert got == RankConfig(PROXY, layers=(1,))  # proxy and layers lent, top_k the method's own default
    assert coerce_config(LOCATORS["random"], RankConfig(PROXY, top_k=7)) == RandomConfig(PROXY, top_k=7)
    assert coerce_config(LOCATORS["logprob"], RankConfig(PROXY)).top_k == 20  # RankConfig's default is not "set"
    assert coerce_config(LOCATORS["logprob"], LensConfig(mode="exact")).lens.mode == "exact"
    assert coerce_config(LOCATORS["qrnca"], RankConfig(PROXY, layers=(0, 2))) == LocateConfig(PROXY, layers=(0, 2))
    with pytest.raises(QrncaError, match="method 'atp' takes a RankConfig"):
        coerce_config(atp, IGConfig())
    with pytest.raises(QrncaError, match="top_k must be at least 1"):
        RankConfig(top_k=0)


# ---------------------------------------------------------------- every built-in through ql.locate


@pytest.mark.parametrize("method", BUILTINS)
def test_every_builtin_returns_a_located_through_locate(tiny_llama, queries, facts, run, method, tmp_path):
    cfg = RandomConfig(PROXY, top_k=4) if method == "random" else (CFG if method in ("qrnca", "no-ica", "with-common",
                                                                                       "kn") else RankConfig(PROXY))
    res = ql.locate(tiny_llama, queries, cfg, method=method, pool=facts, progress=False, out=tmp_path / "out")
    assert isinstance(res, Located)
    assert res.query_ids == [q.id for q in queries] and res.locator_name() == method
    built = build_all_prompts(queries, run.config.proxy, tiny_llama.tokenizer,
                              pool=facts)
    assert res.stored_prompts() == built  # the exact prompts used, kept for evaluate
    if method == "qrnca":
        assert isinstance(res, LocateResult) and res.neurons_json()["queries"] == run.neurons_json()["queries"]
        return
    assert isinstance(res, RankedResult) and res.locator == method
    assert res.costs["seconds"] > 0 and "passes" in res.costs
    assert (res.dtype, res.device, res.model) == ("float32", "cpu", model_name(tiny_llama))
    assert RankedResult.load(tmp_path / "out").neurons == res.neurons  # written to out=


@pytest.mark.parametrize("method,scorer", [("atp", atp_scores), ("dla", dla_scores)])
def test_atp_and_dla_rank_the_top_of_the_mean_score_on_the_layers_asked(tiny_llama, queries, facts, method, scorer):
    for layers, k in ((None, 5), ((1, 2), 7)):
        res = ql.locate(tiny_llama, queries, RankConfig(PROXY, layers=layers, top_k=k), method=method, pool=facts,
                        progress=False)
        chosen = list(layers) if layers else list(range(n_layers(tiny_llama)))
        assert res.layers == chosen
        for q in queries:
            mean = scorer(tiny_llama, res.prompts[q.id], chosen).mean(0)  # computed directly, on the stored prompts
            vals, idx = torch.sort(mean.flatten(), descending=True, stable=True)
            width = mean.shape[1]
            want = [(chosen[int(i) // width], int(i) % width) for i in idx[:k]]
            got = res.qr_neurons(q.id)
            assert got.pairs() == want
            assert list(got.scores) == pytest.approx(vals[:k].tolist(), rel=1e-6)


def test_the_default_top_k_and_layers(tiny_llama, queries, facts):
    res = ql.locate(tiny_llama, queries, RankConfig(PROXY), method="activation", pool=facts, progress=False)
    assert all(len(res.qr_neurons(q.id)) == min(TOP, n_layers(tiny_llama) * d_mlp(tiny_llama)) for q in queries)
    part = ql.locate(tiny_llama, queries, RankConfig(PROXY, layers=(2,), top_k=None), method="activation",
                     pool=facts, progress=False)
    assert all(set(part.qr_neurons(q.id).layers) == {2} and len(part.qr_neurons(q.id)) == d_mlp(tiny_llama)
               for q in queries)


def test_random_is_seeded_repeatable_and_needs_a_count(tiny_llama, queries, facts, run):
    state = torch.get_rng_state()
    a = ql.locate(tiny_llama, queries, RandomConfig(PROXY, top_k=6), method="random", pool=facts, progress=False)
    b = ql.locate(tiny_llama, queries, RandomConfig(PROXY, top_k=6), method="random", pool=facts, progress=False)
    c = ql.locate(tiny_llama, queries, RandomConfig(PROXY, top_k=6), method="random", pool=facts, progress=False,
                  seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert a.neurons == b.neurons and a.neurons != c.neurons
    L, width = n_layers(tiny_llama), d_mlp(tiny_llama)
    for q in queries:  # the draw, independently: a generator seeded from (seed, query id)
        g = torch.Generator().manual_seed(int(hashlib.sha256(f"0|random|{q.id}".encode()).hexdigest()[:15], 16))
        pick = torch.randperm(L * width, generator=g)[:6]
        assert a.qr_neurons(q.id).pairs() == [(int(i) // width, int(i) % width) for i in pick]
    with pytest.raises(QrncaError, match=r"random needs a count per query: give RandomConfig\(top_k=K\), or run="):
        ql.locate(tiny_llama, queries, RandomConfig(PROXY), method="random", pool=facts, progress=False)
    with_run = ql.locate(tiny_llama, queries, RandomConfig(PROXY), method="random", run=run, progress=False)
    assert {q: len(v) for q, v in with_run.neurons.items()} == {q.id: len(run.qr_neurons(q.id)) for q in queries}


def test_ig_based_methods_locate_qrnca_first_or_reuse_the_run(tiny_llama, queries, facts, run):
    for method, selection in (("no-ica", SelectionConfig(use_ica=False)),
                              ("with-common", SelectionConfig(remove_common=False))):
        alone = ql.locate(tiny_llama, queries, CFG, method=method, pool=facts, progress=False)
        reused = ql.locate(tiny_llama, queries, CFG, method=method, run=run, progress=False)
        want = run.reselect(selection)
        for res in (alone, reused):
            assert res.neurons == {q.id: want.qr_neurons(q.id) for q in queries}
            assert res.layers == run.layers
        assert alone.meta["qrnca_run"] == "computed in memory"
    kn = ql.locate(tiny_llama, queries, CFG, method="kn", pool=facts, progress=False)
    assert kn.neurons == ql.locate(tiny_llama, queries, CFG, method="kn", run=run, progress=False).neurons
    assert kn.costs["passes"] == 0 and kn.costs["stored_attribution_seconds"] > 0
    with pytest.raises(QrncaError, match="the run given holds no queries"):
        ql.locate(tiny_llama, facts[-1:], CFG, method="kn", run=run, progress=False)


def test_logprob_is_the_lens_and_honours_layers(tiny_llama, queries, facts):
    res = ql.locate(tiny_llama, queries, LogprobConfig(PROXY, top_k=5), method="logprob", pool=facts, progress=False)
    direct = lens_locate(tiny_llama, queries, PROXY, pool=facts, top_k=5, progress=False)
    assert res.neurons == direct.neurons and res.costs["certified_share"] == 1.0
    part = ql.locate(tiny_llama, queries, LogprobConfig(PROXY, top_k=4, layers=(1,)), method="logprob", pool=facts,
                     progress=False)
    for q in queries:  # the exact scores of layer 1, mean over the prompts, computed in full
        mean = neuron_scores(tiny_llama, part.prompts[q.id])[:, 1].mean(0)
        top = torch.topk(mean, 4)
        assert part.qr_neurons(q.id).pairs() == [(1, int(i)) for i in top.indices]
        assert list(part.qr_neurons(q.id).scores) == pytest.approx(top.values.tolist(), rel=1e-4, abs=1e-6)


def test_unknown_method_and_qrnca_only_options(tiny_llama, queries):
    with pytest.raises(QrncaError, match=r"unknown method\(s\) \['nope'\]; registered locators"):
        ql.locate(tiny_llama, queries, CFG, method="nope", progress=False)
    with pytest.raises(QrncaError, match="shard= and executor= apply to QRNCA's attribution only"):
        ql.locate(tiny_llama, queries, CFG, method="atp", shard=(0, 2), progress=False)


# ---------------------------------------------------------------- RankedResult on disk


def test_ranked_result_saves_and_loads_back_equal(tiny_llama, queries, facts, run, tmp_path):
    res = ql.locate(tiny_llama, queries, RankConfig(PROXY, layers=(0, 2), top_k=6), method="atp", pool=facts,
                    progress=False, name="tiny", data="builtin:facts")
    out = res.save(tmp_path / "atp")
    assert res.run_dir == out
    back = RankedResult.load(out)
    assert back.neurons == res.neurons and back.prompts == res.prompts and back.query_records == res.query_records
    assert (back.locator, back.layers, back.proxy, back.config, back.model, back.data) == (
        "atp", [0, 2], res.proxy, res.config, "tiny", "builtin:facts")
    assert back.costs == res.costs and (back.dtype, back.device) == (res.dtype, res.device)
    assert back.neurons_json() == json.loads((out / "neurons.json").read_text())
    # The shared neurons.json schema: what analysis and the report read.
    doc = json.loads((out / "neurons.json").read_text())
    assert doc["common_neurons"] == [] and doc["method"] == "atp"
    assert doc["queries"][queries[0].id]["qr_neurons"] == res.qr_neurons(queries[0].id).to_list()
    run.save(tmp_path / "qrnca")
    with pytest.raises(StoreError, match="holds a QRNCA run"):
        res.save(tmp_path / "qrnca")
    with pytest.raises(StoreError, match=r"is a QRNCA run \(load it with LocateResult.load\)"):
        RankedResult.load(tmp_path / "qrnca")
    with pytest.raises(StoreError, match="does not exist"):
        RankedResult.load(tmp_path / "nowhere")


def test_saving_other_neurons_over_an_evaluated_result_warns(tiny_llama, queries, facts, tmp_path):
    a = ql.locate(tiny_llama, queries, RandomConfig(PROXY, top_k=3), method="random", pool=facts, progress=False)
    a.save(tmp_path / "r")
    (tmp_path / "r" / "evaluation.json").write_text("{}")
    a.save(tmp_path / "r")  # the same neurons: nothing to say
    b = ql.locate(tiny_llama, queries, RandomConfig(PROXY, top_k=3), method="random", pool=facts, progress=False,
                  seed=5)
    with pytest.warns(UserWarning, match="judged the neurons this save replaces"):
        b.save(tmp_path / "r")
