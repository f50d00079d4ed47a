"""analysis.py: every map against values worked out by hand on small hand-written neurons.json dicts."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from qrnca_lens.render import analysis as A
from qrnca_lens.errors import QrncaError

# Groups A (2 queries), B (1), C (1, no QR neuron). Pooled: A = {(0,1), (1,2), (2,3)}, B = {(0,1), (2,4)}, C = {}.
DOC = {
    "model": "hand",
    "data": "hand",
    "layers": [0, 1, 2],
    "common_neurons": [[2, 5]],
    "queries": {
        "a1": {"group": "A", "qr_neurons": [[0, 1, 0.5], [1, 2, 0.25]], "target_prob": 0.8, "accuracy": 1.0},
        "a2": {"group": "A", "qr_neurons": [[0, 1, 1.0], [2, 3, 0.5]], "target_prob": 0.4, "accuracy": 0.0},
        "b1": {"group": "B", "qr_neurons": [[0, 1, 2.0], [2, 4, 1.0]], "target_prob": None, "accuracy": None},
        "c1": {"group": "C", "qr_neurons": []},
    },
}


def test_groups_and_pooled_neurons():
    assert A.groups(DOC) == ["A", "B", "C"]
    assert A.group_neurons(DOC) == {"A": {(0, 1), (1, 2), (2, 3)}, "B": {(0, 1), (2, 4)}, "C": set()}


def test_pairs_without_naica_weigh_one():
    doc = {"layers": [0], "queries": {"q": {"group": "g", "qr_neurons": [[0, 3]]}}}
    assert A.query_neurons(doc["queries"]["q"]) == [(0, 3, 1.0)]
    assert A.heatmap(doc, 1, 4).tolist() == [[0.0, 0.0, 0.0, 1.0]]


def test_not_a_neurons_json_is_a_clear_error():
    with pytest.raises(QrncaError, match="neurons.json"):
        A.group_neurons({"config": {}})


def test_overlap_rate_is_jaccard():
    assert A.overlap_rate({(0, 1), (1, 2), (2, 3)}, {(0, 1), (2, 4)}) == 1 / 4
    assert A.overlap_rate({(0, 1)}, set()) == 0.0
    assert math.isnan(A.overlap_rate(set(), set()))


def test_overlap_matrix_by_hand():
    names, m = A.overlap_matrix(DOC)
    assert names == ["A", "B", "C"]
    # A∩B = {(0,1)}, A∪B has 4 neurons; C is empty: 0 against the others, undefined against itself.
    expected = np.array([[1.0, 0.25, 0.0], [0.25, 1.0, 0.0], [0.0, 0.0, np.nan]])
    np.testing.assert_array_equal(m, expected)
    assert np.allclose(m[:2, :2], m[:2, :2].T)


def test_layer_distribution_pooled_and_occurrences():
    d = A.layer_distribution(DOC, 3)
    assert {g: v.tolist() for g, v in d.items()} == {"A": [1, 1, 1], "B": [1, 0, 1], "C": [0, 0, 0]}
    occ = A.layer_distribution(DOC, 3, pooled=False)
    assert occ["A"].tolist() == [2, 1, 1]  # (0, 1) is a QR neuron of both a1 and a2
    share = A.layer_distribution(DOC, 3, normalize=True)
    np.testing.assert_allclose(share["A"], [1 / 3] * 3)
    np.testing.assert_allclose(share["B"], [0.5, 0.0, 0.5])
    assert share["C"].tolist() == [0.0, 0.0, 0.0]
    assert A.layer_distribution(DOC)["A"].shape == (3,)  # n_layers inferred from doc["layers"]


def test_layer_outside_the_map_is_an_error():
    with pytest.raises(QrncaError, match="layer 2"):
        A.layer_distribution(DOC, 2)


def test_heatmap_accumulates_naica():
    m = A.heatmap(DOC, 3, 6)
    expected = np.zeros((3, 6))
    expected[0, 1] = 0.5 + 1.0 + 2.0
    expected[1, 2] = 0.25
    expected[2, 3] = 0.5
    expected[2, 4] = 1.0
    np.testing.assert_allclose(m, expected)
    a = A.heatmap(DOC, 3, 6, group="A")
    assert a[0, 1] == 1.5 and a[2, 4] == 0.0 and a.sum() == 2.25
    assert A.heatmap(DOC, 3, 6, group="C").sum() == 0.0
    with pytest.raises(QrncaError, match="d_mlp"):
        A.heatmap(DOC, 3, 4)


def test_bin_columns_sums_neighbours():
    m = np.array([[1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 0.0, 0.0, 0.0, 7.0]])
    # w = ceil(5 / 2) = 3: bins [0, 3) and [3, 5)
    assert A.bin_columns(m, 2).tolist() == [[6.0, 9.0], [0.0, 7.0]]
    assert A.bin_columns(m, 5).tolist() == m.tolist()
    big = np.zeros((30, 1536))
    big[3, 1535] = 0.7
    b = A.bin_columns(big, 192)
    assert b.shape == (30, 192) and b[3, 191] == 0.7 and b.sum() == pytest.approx(0.7)


def test_most_shared_neurons():
    assert A.most_shared_neurons(DOC, 2) == [((0, 1), 2, 3), ((1, 2), 1, 1)]
    assert A.most_shared_neurons(DOC, 10, min_groups=2) == [((0, 1), 2, 3)]
    assert len(A.most_shared_neurons(DOC, 10)) == 4


def test_top_group_neurons():
    assert A.top_group_neurons(DOC, "A", 2) == [((0, 1), 1.5), ((2, 3), 0.5)]
    assert A.top_group_neurons(DOC, None, 1) == [((0, 1), 3.5)]
    assert A.top_group_neurons(DOC, "C") == []


def test_top_pooled_is_the_group_neurons_of_both_the_report_and_the_evaluation():
    """One computation (neurons.top_pooled) behind analysis.top_group_neurons and the evaluation's group
    neurons, against a plain sum-and-sort; ties (equal sums) go (layer, neuron) ascending."""
    import random

    from qrnca_lens.neurons import NeuronSet, top_pooled

    rng = random.Random(0)
    sets = [NeuronSet([(rng.randrange(3), rng.randrange(4), rng.choice([0.25, 0.5, 1.0])) for _ in range(6)])
            for _ in range(5)]
    plain: dict = {}
    for ns in sets:
        for layer, n, x in ns:
            plain[(layer, n)] = plain.get((layer, n), 0.0) + x
    want = sorted(plain.items(), key=lambda kv: (-kv[1], kv[0]))[:7]
    assert [((a, b), x) for a, b, x in top_pooled(sets, 7)] == want
    assert any(want[i][1] == want[i + 1][1] for i in range(len(want) - 1))  # the draw has ties to order
    doc = {"queries": {f"q{i}": {"group": "G", "qr_neurons": ns.to_list()} for i, ns in enumerate(sets)}}
    assert A.top_group_neurons(doc, "G", 7) == want


def test_group_summaries_by_hand():
    rows = {r["group"]: r for r in A.group_summaries(DOC)}
    assert rows["A"] == {"group": "A", "n_queries": 2, "mean_qr_neurons": 2.0, "empty_queries": 0,
                         "pooled_neurons": 3, "peak_layer": 0, "mean_target_prob": pytest.approx(0.6),
                         "accuracy": 0.5}
    assert rows["B"]["mean_target_prob"] is None and rows["B"]["accuracy"] is None
    assert rows["C"]["empty_queries"] == 1 and rows["C"]["peak_layer"] is None and rows["C"]["pooled_neurons"] == 0


def test_run_summary_recomputed_and_from_locate():
    s = A.run_summary(DOC)
    assert s == {"n_queries": 4, "n_groups": 3, "mean_qr_neurons": 1.5, "empty_queries": 1, "n_common_neurons": 1,
                 "mean_target_prob": pytest.approx(0.6), "accuracy": 0.5}
    given = {**DOC, "summary": {"accuracy": 0.75, "mean_target_prob": 0.5, "mean_qr_neurons": 1.5}}
    assert A.run_summary(given)["accuracy"] == 0.75  # locate's prompt-weighted figure wins


def test_infer_n_layers_sees_every_neuron():
    assert A.infer_n_layers(DOC) == 3
    doc = {"layers": [0, 1], "queries": {"q": {"group": "g", "qr_neurons": [[5, 0, 1.0]]}}}
    assert A.infer_n_layers(doc) == 6


# ---------------------------------------------------------------- vocabulary projection

VOCAB = ["a", " the", ",", "X", "Y"]


class _Tok:
    def decode(self, ids):
        return "".join(VOCAB[i] for i in ids)


class _FakeModel(types.SimpleNamespace):
    """Stands in for a HookedModel (the protocol's surface); only its weights are read, nothing runs."""

    hook_dict: dict = {}

    def __call__(self, *args, **kwargs):
        raise AssertionError("the vocabulary projection must not run the model")

    run_with_hooks = to_tokens = hooks = __call__

    def parameters(self, recurse=True):
        return iter(())

    def modules(self):
        return iter(())


def _fake_model(norm_type="RMS", g=None, as_module=False):
    """W_U columns: a=[1,0], the=[0,1], ","=[1,1], X=[-1,0], Y=[0,-1]; W_out[1, 2] = [2, 1]."""
    w_out = torch.zeros(2, 3, 2)
    w_out[1, 2] = torch.tensor([2.0, 1.0])
    w_out[0, 0] = torch.tensor([-1.0, 0.0])
    w_u = torch.tensor([[1.0, 0.0, 1.0, -1.0, 0.0], [0.0, 1.0, 1.0, 0.0, -1.0]])
    ln = None
    if g is not None:
        if as_module:  # a bridge keeps the HF norm's weight as a parameter
            ln = torch.nn.Module()
            ln.weight = torch.nn.Parameter(torch.tensor(g))
        else:  # a HookedTransformer exposes ln_final.w
            ln = types.SimpleNamespace(w=torch.tensor(g))
    blocks = [types.SimpleNamespace(), types.SimpleNamespace()]  # two layers, no post-MLP norms
    return _FakeModel(W_out=w_out, W_U=w_u, tokenizer=_Tok(), ln_final=ln, blocks=blocks,
                      cfg=types.SimpleNamespace(d_model=2, normalization_type=norm_type))


def test_vocab_projection_without_norm_by_hand():
    p = A.vocab_projection(_fake_model(), 1, 2, k=2, through_norm=False)
    # [2, 1] @ W_U = [2, 1, 3, -2, -1]
    assert p.tokens == (",", "a") and p.logits == (3.0, 2.0)
    assert p.bottom_tokens == ("X", "Y") and p.bottom_logits == (-2.0, -1.0)
    assert p.name == "L1.N2" and not p.through_norm


@pytest.mark.parametrize("as_module", [False, True])
def test_vocab_projection_through_rms_weight(as_module):
    p = A.vocab_projection(_fake_model(g=[0.5, 2.0], as_module=as_module), 1, 2, k=2)
    # [2, 1] * [0.5, 2] = [1, 2] -> logits [1, 2, 3, -1, -2]
    assert p.tokens == (",", " the") and p.logits == (3.0, 2.0) and p.through_norm
    assert p.bottom_tokens == ("Y", "X")


def test_vocab_projection_through_layernorm_centres_first():
    p = A.vocab_projection(_fake_model(norm_type="LN", g=[1.0, 2.0]), 1, 2, k=2)
    # centred [0.5, -0.5] * [1, 2] = [0.5, -1] -> logits [0.5, -1, -0.5, -0.5, 1]
    assert p.tokens == ("Y", "a") and p.logits == (1.0, 0.5)


def test_vocab_projection_with_norm_folded_away():
    p = A.vocab_projection(_fake_model(g=None), 1, 2, k=1)
    assert p.tokens == (",",) and not p.through_norm


def test_project_neurons_keeps_the_order_asked():
    ps = A.project_neurons(_fake_model(), [(1, 2), (0, 0)], k=1, through_norm=False)
    assert [(p.layer, p.neuron) for p in ps] == [(1, 2), (0, 0)]
    assert ps[1].tokens == ("X",)  # [-1, 0] @ W_U = [-1, 0, -1, 1, 0]
    assert A.project_neurons(_fake_model(), [], k=3) == []


def test_project_neurons_on_a_tiny_model_matches_the_matrix_product(tiny_gated):
    from qrnca_lens.model.access import W_U, W_out

    neurons = [(2, 7), (0, 3), (2, 40)]
    ps = A.project_neurons(tiny_gated, neurons, k=4)
    g = A._final_norm(tiny_gated)[0]
    assert g is not None  # the tiny Llama bridge keeps its final RMSNorm weight
    for (layer, n), p in zip(neurons, ps):
        logits = (W_out(tiny_gated, layer)[n] * g) @ W_U(tiny_gated)
        top = logits.topk(4)
        assert p.tokens == tuple(tiny_gated.tokenizer.decode([int(t)]) for t in top.indices)
        np.testing.assert_allclose(p.logits, top.values.tolist(), rtol=1e-5)
        assert p.through_norm
    raw = A.project_neurons(tiny_gated, neurons[:1], k=4, through_norm=False)[0]
    expected = (W_out(tiny_gated, 2)[7] @ W_U(tiny_gated)).topk(4).values.tolist()
    np.testing.assert_allclose(raw.logits, expected, rtol=1e-5)


def test_projections_go_through_gemmas_own_final_norm(tiny_tokenizer):
    """Gemma's RMSNorm scales by 1 + w: the projection must equal the model's own post-feedforward norm and
    final norm applied in turn, not w alone."""
    from builders import tiny_gemma3_bridge
    from qrnca_lens.model.access import W_U, W_out

    model = tiny_gemma3_bridge(tiny_tokenizer)
    neurons = [(0, 5), (1, 30)]
    ps = A.project_neurons(model, neurons, k=4)
    for (layer, n), p in zip(neurons, ps):
        row = W_out(model, layer)[n].detach().float()
        big = row * 1e3  # eps of the norms is negligible at this scale
        with torch.no_grad():  # each norm's positive 1/rms undone: row ⊙ post gain ⊙ final gain
            written = model.blocks[layer].ln2_post(big[None, None])[0, 0].float() * big.pow(2).mean().sqrt()
            normed = model.ln_final(written[None, None])[0, 0].float()
        direction = normed * written.pow(2).mean().sqrt() / 1e3
        top = (direction @ W_U(model).detach().float()).topk(4)
        np.testing.assert_allclose(p.logits, top.values.tolist(), rtol=1e-4)
        assert p.tokens == tuple(model.tokenizer.decode([int(t)]) for t in top.indices)
