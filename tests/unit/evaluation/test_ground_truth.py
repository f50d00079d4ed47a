"""Ground truth for single neurons: effects against a plain hooked forward, candidates, agreement metrics."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from qrnca_lens.errors import QrncaError
from qrnca_lens.evaluation.ground_truth import (
    GroundTruthResult,
    candidate_neurons,
    exhaustive_effects,
    ground_truth,
    neuron_effects,
)
from qrnca_lens.model.hooks import active_hook_count, hooked
from qrnca_lens.evaluation.metrics import false_negative_rate, precision_at_k, rankdata, recall_at_k, spearman
from qrnca_lens.model.access import d_mlp, mlp_hook_name, n_layers
from qrnca_lens.neurons import NeuronSet
from qrnca_lens.data.prompts import Prompt


def _prompts(model, lengths=(7, 11), seed=0):
    rnd = random.Random(seed)
    vocab = int(model.cfg.d_vocab)
    return [Prompt(query_id="q", group="g", template=i, text="", tokens=tuple(rnd.randrange(5, vocab) for _ in range(n)),
                   target=(rnd.randrange(5, vocab), rnd.randrange(5, vocab)), index=i)
            for i, n in enumerate(lengths)]


def _oracle(model, prompt, layer, neuron, factor):
    """log p(first target token) at the last position with one neuron scaled there: a plain full forward."""
    P = len(prompt.tokens) - 1

    def h(act, hook):
        out = act.clone()
        out[0, P, neuron] = act[0, P, neuron] * factor
        return out

    hooks = [] if layer is None else [(mlp_hook_name(model, layer), h)]
    with torch.no_grad(), hooked(model, fwd=hooks):
        logits = model(torch.tensor([list(prompt.tokens)]), return_type="logits")
    return float(torch.log_softmax(logits[0, P].double(), -1)[prompt.target[0]])


def _oracle_effect(model, prompts, layer, neuron, factor, clean=None):
    clean = clean or [_oracle(model, p, None, 0, 1.0) for p in prompts]
    return float(np.mean([_oracle(model, p, layer, neuron, factor) - c for p, c in zip(prompts, clean)]))


# ---------------------------------------------------------------- effects


def test_effects_equal_a_plain_hooked_forward(tiny_model):
    model = tiny_model
    prompts = _prompts(model)
    L, W = n_layers(model), d_mlp(model)
    cands = [(0, 3), (L - 1, W - 1), (1, 17), (0, 3), (L - 1, 0)]  # a repeat is measured once
    before = active_hook_count(model)
    eff = neuron_effects(model, prompts, cands, (0.0, 2.0))
    assert active_hook_count(model) == before
    assert eff.neurons == ((0, 3), (L - 1, W - 1), (1, 17), (L - 1, 0))
    assert eff.per_prompt.shape == (2, 4, 2) and eff.effects.shape == (2, 4)
    clean = [_oracle(model, p, None, 0, 1.0) for p in prompts]
    assert eff.clean.tolist() == pytest.approx(clean, abs=2e-4)
    for fi, f in enumerate((0.0, 2.0)):
        for ni, (layer, n) in enumerate(eff.neurons):
            ref = [_oracle(model, p, layer, n, f) - c for p, c in zip(prompts, clean)]
            assert eff.per_prompt[fi, ni].tolist() == pytest.approx(ref, abs=2e-4)
            assert float(eff.of(f)[ni]) == pytest.approx(float(np.mean(ref)), abs=2e-4)
    # the effects are not trivially zero: some neuron moves the target
    assert float(eff.effects.abs().max()) > 1e-3
    with pytest.raises(QrncaError, match="not measured"):
        eff.of(3.0)


def test_exhaustive_effects_equal_the_oracle_for_every_neuron_of_a_layer(tiny_model):
    model = tiny_model
    p = _prompts(model, lengths=(9,))[0]
    W = d_mlp(model)
    got = exhaustive_effects(model, p, layers=[1], factor=0.0)
    assert got.shape == (1, W)
    clean = [_oracle(model, p, None, 0, 1.0)]
    ref = torch.tensor([_oracle_effect(model, [p], 1, i, 0.0, clean) for i in range(W)], dtype=torch.float64)
    assert torch.allclose(got[0], ref, atol=2e-4)
    assert float(ref.abs().max()) > 1e-3


def test_exhaustive_effects_default_layers_and_refusals(tiny_llama, capsys):
    p = _prompts(tiny_llama, lengths=(6,))[0]
    got = exhaustive_effects(tiny_llama, p)  # the tiny model has fewer layers than the default subset
    assert got.shape == (n_layers(tiny_llama), d_mlp(tiny_llama))
    assert capsys.readouterr().out == ""  # prints nothing
    assert torch.allclose(got[2:3], exhaustive_effects(tiny_llama, p, layers=[2]))
    with pytest.raises(QrncaError, match="no layers"):
        exhaustive_effects(tiny_llama, p, layers=[])
    with pytest.raises(QrncaError, match="out of range"):
        neuron_effects(tiny_llama, [p], [(99, 0)])
    with pytest.raises(QrncaError, match="no prompts"):
        neuron_effects(tiny_llama, [], [(0, 0)])


# ---------------------------------------------------------------- candidates


def _rng_state():
    # Python's global random state is not compared: under the test suite's beartype hook, the runtime type
    # checks themselves sample containers with random.getrandbits. Its draw functions are forbidden instead.
    return np.random.get_state()[1].copy(), torch.get_rng_state().clone()


@pytest.fixture
def no_global_random(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("drew from the global random module")

    for name in ("random", "shuffle", "sample", "choice", "choices", "randint", "randrange", "seed", "setstate"):
        monkeypatch.setattr(random, name, forbidden)


def test_candidates_are_the_union_of_top_k_plus_as_many_seeded_random_neurons(no_global_random):
    sets = {"a": NeuronSet([(2, 5, 0.9), (2, 6, 0.5), (3, 1, 0.4), (3, 2, 0.1)]),
            "b": [(3, 1), (2, 5), (0, 7), (2, 5), (1, 1)],  # repeats count once; (1, 1) is beyond k
            "c": NeuronSet([])}
    state = _rng_state()
    cands, n = candidate_neurons(sets, "q1", k=3, layers=[1, 2, 3], width=10, seed=4)
    after = _rng_state()
    assert np.array_equal(state[0], after[0]) and torch.equal(state[1], after[1])
    pairs = cands.pairs()
    assert pairs[:n] == [(2, 5), (2, 6), (3, 1), (0, 7)] and n == 4
    rand = pairs[n:]
    assert len(rand) == n and len(set(pairs)) == len(pairs)  # equal size, nothing twice, none from the union
    assert all(layer in (1, 2, 3) and 0 <= i < 10 for layer, i in rand)
    # deterministic per (seed, query); another seed or query draws other neurons
    assert candidate_neurons(sets, "q1", k=3, layers=[1, 2, 3], width=10, seed=4)[0] == cands
    others = {tuple(candidate_neurons(sets, q, k=3, layers=[1, 2, 3], width=10, seed=s)[0].pairs()[n:])
              for q, s in (("q1", 5), ("q2", 4), ("q1", 6))}
    assert tuple(rand) not in others
    # a pool smaller than the union: every remaining neuron, no more
    small, m = candidate_neurons(sets, "q1", k=3, layers=[3], width=3, seed=0)
    assert m == 4 and sorted(small.pairs()[m:]) == [(3, 0), (3, 2)]


def test_random_part_is_drawn_uniformly_from_the_pool():
    # Over many queries every pool neuron outside the union is drawn, and none inside it.
    seen: set[tuple[int, int]] = set()
    for i in range(60):
        cands, n = candidate_neurons({"a": [(0, 0), (0, 1)]}, f"q{i}", k=2, layers=[0, 1], width=4)
        seen.update(cands.pairs()[n:])
    assert seen == {(a, b) for a in (0, 1) for b in range(4)} - {(0, 0), (0, 1)}


# ---------------------------------------------------------------- pure metrics


def test_precision_and_recall_by_hand():
    truth = {"a", "b", "c", "d"}
    assert precision_at_k(["a", "x", "b", "c"], truth, 2) == 0.5
    assert recall_at_k(["a", "x", "b", "c"], truth, 2) == 0.25
    assert precision_at_k(["a", "x", "b", "c"], truth, 4) == 0.75 and recall_at_k(["a", "x", "b", "c"], truth, 4) == 0.75
    # a ranking cut shorter than k is judged on what it named; recall still over the whole truth
    assert precision_at_k(["a", "b"], truth, 4) == 1.0 and recall_at_k(["a", "b"], truth, 4) == 0.5
    assert precision_at_k(["a", "a", "x"], truth, 2) == 0.5  # a repeat is one item
    assert precision_at_k(["d", "c", "b", "a"], truth, 4) == 1.0  # order inside the top-k does not matter
    assert precision_at_k([], truth, 3) is None and recall_at_k(["a"], set(), 3) is None
    with pytest.raises(QrncaError, match="k must"):
        precision_at_k(["a"], truth, 0)


def test_rankdata_averages_ties():
    assert rankdata([10.0, 20.0, 10.0, 5.0]).tolist() == [2.5, 4.0, 2.5, 1.0]
    assert rankdata([3.0, 3.0, 3.0]).tolist() == [2.0, 2.0, 2.0]
    assert rankdata([]).tolist() == []


def test_spearman_by_hand_perfect_reversed_and_ties():
    assert spearman([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 400.0]) == pytest.approx(1.0)
    assert spearman([1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, -1.0]) == pytest.approx(-1.0)
    assert spearman([1.0, 2.0, 3.0], [10.0, 30.0, 20.0]) == pytest.approx(0.5)
    # ties: x ranks [1, 2.5, 2.5, 4], y ranks [1, 2, 3, 4]; centred dot 4.5 over sqrt(4.5 * 5)
    assert spearman([1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # a constant side: undefined
    assert math.isnan(spearman([1.0], [2.0]))
    with pytest.raises(QrncaError, match="finite"):
        spearman([1.0, float("nan")], [1.0, 2.0])


def test_spearman_agrees_with_pandas_ranks_and_scipy_on_random_data_with_ties():
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(3)
    for _ in range(20):
        x = rng.integers(0, 5, size=30).astype(float)  # many ties
        y = x * 0.5 + rng.normal(size=30).round(1)
        # pandas' own average ranks (an implementation independent of rankdata), then Pearson
        rx, ry = pd.Series(x).rank(method="average"), pd.Series(y).rank(method="average")
        assert rankdata(x).tolist() == rx.tolist()
        assert spearman(x, y) == pytest.approx(float(np.corrcoef(rx, ry)[0, 1]), abs=1e-12)
    try:
        from scipy.stats import spearmanr
    except ImportError:
        return  # scipy is not installed here; where it is, it must agree too
    assert spearman(x, y) == pytest.approx(float(spearmanr(x, y)[0]), abs=1e-12)


def test_false_negative_rate_by_hand():
    scores = {"a": -2.0, "b": 0.019, "c": 0.021, "d": 1.0}  # max |score| 2: near zero is below 0.02
    assert false_negative_rate(scores, ["a", "b", "c", "e"]) == 0.5  # b near zero, e never ranked
    assert false_negative_rate(scores, ["a", "d"]) == 0.0
    assert false_negative_rate({"a": 0.0, "b": 0.0}, ["a", "b"]) == 1.0  # no scores at all: nothing detected
    assert false_negative_rate(scores, ["b"], rel=0.005) == 0.0
    assert false_negative_rate(scores, []) is None


# ---------------------------------------------------------------- ground_truth end to end


def _clear_gap(imp, k):
    """The k-th and (k+1)-th largest importances differ by more than float noise: the true top-k is defined."""
    top = np.sort(imp)[::-1]
    assert top[k - 1] - top[k] > 1e-4


@pytest.fixture(scope="module")
def truth(tiny_llama):
    """Every neuron's zero-ablation effect, mean over two prompts (neuron_effects is checked against the oracle)."""
    model = tiny_llama
    prompts = _prompts(model)
    allp = [(layer, i) for layer in range(n_layers(model)) for i in range(d_mlp(model))]
    eff = neuron_effects(model, prompts, allp, (0.0,))
    return prompts, allp, eff.of(0.0).abs().numpy()


def test_ground_truth_scores_a_perfect_a_reversed_and_a_scoreless_locator(tiny_llama, truth):
    prompts, allp, imp = truth
    order = np.argsort(-imp, kind="stable")
    _clear_gap(imp, 5)
    perfect = NeuronSet([(*allp[i], float(imp[i])) for i in order])
    rev = NeuronSet([(*allp[i], float(imp.max() - imp[i] + 1.0)) for i in order[::-1]])
    blank = NeuronSet([(*allp[i], 0.0) for i in order[50:55]])  # named by no other top-5
    sets = {"perfect": {"q": perfect}, "reversed": {"q": rev}, "blank": {"q": blank}}
    state = _rng_state()
    res = ground_truth(tiny_llama, ["q"], {"q": prompts}, sets, k=5, seed=1)
    after = _rng_state()
    assert np.array_equal(state[0], after[0]) and torch.equal(state[1], after[1])
    q = res.queries["q"]
    assert len(q["neurons"]) == 2 * q["n_union"] and q["n_union"] == 15
    # the measured effects are the truth's, neuron by neuron
    idx = {p: i for i, p in enumerate(allp)}
    assert np.allclose([abs(q["effects"][0][j]) for j in range(len(q["neurons"]))],
                       [imp[idx[tuple(p)]] for p in q["neurons"]], atol=1e-4)
    assert [tuple(p) for p in q["true_top"]] == perfect.pairs()[:5]
    m = q["metrics"]
    # Spearman up to a swap of near-tied neurons (the effects are re-measured in other batches: float noise)
    assert m["perfect"] == {"precision": 1.0, "recall": 1.0, "spearman": pytest.approx(1.0, abs=2e-3),
                            "false_negative_rate": 0.0, "n_ranked": 5}
    assert m["reversed"]["precision"] == 0.0 and m["reversed"]["spearman"] == pytest.approx(-1.0, abs=2e-3)
    assert m["reversed"]["false_negative_rate"] == 0.0  # it scores everything, just the wrong way round
    assert m["blank"]["spearman"] is None and m["blank"]["false_negative_rate"] == 1.0
    assert res.methods["perfect"]["precision"] == 1.0 and res.methods["blank"]["n_queries"]["spearman"] == 0
    df = res.to_dataframe()
    assert list(df["method"]) == ["perfect", "reversed", "blank"] and "false_negative_rate" in df
    assert len(res.to_dataframe(per_query=True)) == 3
    back = GroundTruthResult.from_dict(res.to_dict())
    assert back == res and back.factors == (0.0, 2.0)


def test_ground_truth_exhaustive_ranks_among_every_neuron(tiny_llama, truth):
    prompts, allp, imp = truth
    some = NeuronSet([allp[i] for i in (3, 50, 100)])  # pair entries score 1.0
    res = ground_truth(tiny_llama, ["q"], {"q": prompts}, {"few": {"q": some}}, k=4, factors=(0.0,), exhaustive=True,
                       layers=[0, 2])
    q = res.queries["q"]
    assert [tuple(p) for p in q["neurons"]] == [p for p in allp if p[0] in (0, 2)]
    kept = [i for i, p in enumerate(allp) if p[0] in (0, 2)]
    _clear_gap(imp[kept], 4)
    best = sorted(kept, key=lambda i: -imp[i])[:4]
    assert [tuple(p) for p in q["true_top"]] == [allp[i] for i in best]
    hits = len({allp[i] for i in best} & set(some.pairs()))
    assert q["metrics"]["few"]["precision"] == pytest.approx(hits / 3)
    assert q["metrics"]["few"]["recall"] == pytest.approx(hits / 4)


def test_ground_truth_refuses_what_it_cannot_judge(tiny_llama, truth):
    prompts = truth[0]
    with pytest.raises(QrncaError, match="lack 0.0"):
        ground_truth(tiny_llama, ["q"], {"q": prompts}, {"a": {"q": [(0, 1)]}}, factors=(2.0,))
    with pytest.raises(QrncaError, match="no neurons for queries"):
        ground_truth(tiny_llama, ["q", "r"], {"q": prompts, "r": prompts}, {"a": {"q": [(0, 1)]}})
    with pytest.raises(QrncaError, match="no prompts"):
        ground_truth(tiny_llama, ["q"], {}, {"a": {"q": [(0, 1)]}})


def test_docstring_examples_run():
    import doctest

    from qrnca_lens.evaluation import ground_truth as gt
    from qrnca_lens.evaluation import metrics

    for mod in (gt, metrics):
        res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert res.failed == 0 and res.attempted > 0


def test_ground_truth_shows_a_bar_over_its_queries_and_an_exhaustive_one_over_layers(tiny_llama, truth, capsys):
    prompts = truth[0]
    sets = {"a": {"q": [(0, 1), (2, 3)], "r": [(1, 4)]}}
    quiet = ground_truth(tiny_llama, ["q", "r"], {"q": prompts, "r": prompts}, sets, k=2, progress=False)
    assert "ground truth" not in capsys.readouterr().err
    shown = ground_truth(tiny_llama, ["q", "r"], {"q": prompts, "r": prompts}, sets, k=2)  # progress by default
    err = capsys.readouterr().err
    assert "ground truth (single-neuron ablations): 100%" in err and "2/2" in err and shown == quiet
    ground_truth(tiny_llama, ["q"], {"q": prompts}, sets, k=2)  # one query: one step, no bar
    assert "ground truth" not in capsys.readouterr().err
    ground_truth(tiny_llama, ["q"], {"q": prompts}, sets, k=2, factors=(0.0,), exhaustive=True, layers=[0, 1, 2])
    err = capsys.readouterr().err  # an inner bar (leave=False): shown while it runs, cleared when done
    assert "single-neuron ablations:" in err and "/3 [" in err
