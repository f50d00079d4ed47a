"""Inputs as users hold them: text or token prompts for attribution, dicts/DataFrames as queries, negative layers."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from qrnca_lens.qrnca.ig import IGConfig, attribute_prompt, attribute_prompts, resolve_layers
from qrnca_lens.data.queries import Query, as_queries, load_data
from qrnca_lens.errors import DataError, ProxyError, QrncaError
from qrnca_lens.locators.first_order import atp_scores
from qrnca_lens.evaluation.ground_truth import exhaustive_effects
from qrnca_lens.lens.locate import lens_locate
from qrnca_lens.qrnca.locate import LocateConfig, locate
from qrnca_lens.model.access import default_prepend_bos, n_layers
from qrnca_lens.data.prompts import Prompt, ProxyConfig, as_prompts, build_prompts
from qrnca_lens.engine.scoring import accuracy
from qrnca_lens.qrnca.selection import SelectionConfig

TEXT = "The capital city of France is"
IG = IGConfig(steps=3)
# Two queries are too few for ICA and common-neuron removal (locate warns so): select without them, so the
# runs compared here have QR neurons to compare.
SEL = SelectionConfig(use_ica=False, remove_common=False, v=5)


def _hand_built(model, text=TEXT, answer=" Paris"):
    """The Prompt a user would build by hand: the model's BOS, then the text; the answer tokenised alone."""
    tok = model.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if default_prepend_bos(model):
        ids = [tok.bos_token_id] + ids
    return Prompt("q", "g", 0, text, tuple(ids), tuple(tok(answer, add_special_tokens=False)["input_ids"]))


def _one_line(e):
    return "\n" not in str(e.value)


# ---------------------------------------------------------------- prompts


def test_text_and_target_attribute_as_the_hand_built_prompt(tiny_llama):
    hand = _hand_built(tiny_llama)
    got = Prompt.from_text(tiny_llama, TEXT, " Paris")
    assert (got.tokens, got.target) == (hand.tokens, hand.target)
    want = attribute_prompt(tiny_llama, hand, IG)
    assert want.abs().max() > 0
    assert torch.equal(attribute_prompt(tiny_llama, TEXT, IG, target=" Paris"), want)
    assert torch.equal(attribute_prompt(tiny_llama, TEXT, IG, target=list(hand.target)), want)


def test_text_prompts_tokenise_as_build_prompts_does(tiny_llama):
    q = load_data("builtin:facts")[0]
    bos = default_prepend_bos(tiny_llama)
    built = build_prompts(q, ProxyConfig("cloze", n_prompts=1, n_shots=0), tiny_llama.tokenizer, prepend_bos=bos)[0]
    got = Prompt.from_text(tiny_llama, built.text, q.answer_sep + q.answer)
    assert (got.tokens, got.target, got.meta["prepend_bos"]) == (built.tokens, built.target, bos)
    # A bare tokenizer has no model default: no BOS unless asked, as build_prompts' own default.
    assert Prompt.from_text(tiny_llama.tokenizer, built.text, [5]).tokens == built.tokens[1:]
    assert Prompt.from_text(tiny_llama.tokenizer, built.text, [5], prepend_bos=True).tokens == built.tokens


@pytest.mark.parametrize("shape", ["1d", "row", "list", "nested"])
def test_token_prompts_attribute_as_the_hand_built_prompt(tiny_llama, shape):
    hand = _hand_built(tiny_llama)
    ids = list(hand.tokens)
    tokens = {"1d": torch.tensor(ids), "row": torch.tensor([ids]), "list": ids, "nested": [ids]}[shape]
    want = attribute_prompt(tiny_llama, hand, IG)
    assert torch.equal(attribute_prompt(tiny_llama, tokens, IG, target=torch.tensor(hand.target)), want)
    # A text target after token ids: tokenised on its own, without BOS.
    assert torch.equal(attribute_prompt(tiny_llama, tokens, IG, target=" Paris"), want)


def test_token_prompts_are_taken_as_they_are(tiny_llama):
    p = Prompt.from_tokens(torch.tensor([[7, 8, 9]]), 10, tokenizer=tiny_llama.tokenizer)
    assert (p.tokens, p.target) == ((7, 8, 9), (10,))  # no BOS added
    assert p.text == tiny_llama.tokenizer.decode([7, 8, 9])
    assert Prompt.from_tokens([7, 8], [10]).text == ""
    np = pytest.importorskip("numpy")
    assert Prompt.from_tokens(np.array([7, 8]), [np.int64(10)]).tokens == (7, 8)  # numpy ids, not floats
    for bad in ([7, True], [7, 8.0], np.array([7.0])):
        with pytest.raises(ProxyError, match="integer|token ids"):
            Prompt.from_tokens(bad, [10])


def test_attribute_prompts_takes_a_mixed_list(tiny_llama):
    hand = _hand_built(tiny_llama)
    other = _hand_built(tiny_llama, "The capital city of Italy is", " Rome")
    want = attribute_prompts(tiny_llama, [hand, other], IG)
    got = attribute_prompts(tiny_llama, [TEXT, list(other.tokens)], IG, targets=[" Paris", list(other.target)])
    assert torch.equal(got, want)
    mixed = attribute_prompts(tiny_llama, [hand, "The capital city of Italy is"], IG, targets=[None, " Rome"])
    assert torch.equal(mixed, want)
    # One string target for all, and a [n, seq] tensor of prompts.
    both = torch.tensor([list(hand.tokens), list(hand.tokens)])
    assert torch.equal(attribute_prompts(tiny_llama, both, IG, targets=" Paris"), attribute_prompts(tiny_llama, [hand, hand], IG))
    # One token id for all prompts.
    assert [p.target for p in as_prompts(tiny_llama, [[1, 2], [3]], 7)] == [(7,), (7,)]


def test_a_missing_target_names_the_fix(tiny_llama):
    for prompt in (TEXT, [1, 2, 3], torch.tensor([1, 2, 3])):
        with pytest.raises(QrncaError, match='target=" Paris"') as e:
            attribute_prompt(tiny_llama, prompt)
        assert _one_line(e)
    with pytest.raises(ProxyError, match=r'prompts\[1\]: .*target=" Paris"'):
        attribute_prompts(tiny_llama, [_hand_built(tiny_llama), TEXT])
    # The target given where the IGConfig goes is named, not an AttributeError. (The test suite's type
    # checker refuses it first, so the function is called as users run it: unwrapped.)
    unchecked = getattr(attribute_prompt, "__wrapped__", attribute_prompt)
    with pytest.raises(QrncaError, match="third argument is the IGConfig.*target=") as e:
        unchecked(tiny_llama, TEXT, " Paris")
    assert _one_line(e)


def test_bad_prompts_and_targets_are_refused_in_one_line(tiny_llama):
    hand = _hand_built(tiny_llama)
    cases = [
        (dict(prompt=hand, target=" Paris"), "holds its own target"),
        (dict(prompt=3.5, target=[1]), "give a Prompt, a text"),
        (dict(prompt=torch.tensor([1.0, 2.0]), target=[1]), "integer token ids"),
        (dict(prompt=torch.tensor([[1, 2], [3, 4]]), target=[1]), r"1-D or \[1, seq\]"),
        (dict(prompt=[1, 2], target=[1.5]), "target must be token ids"),
        (dict(prompt=[1, 10**6], target=[1]), "outside the model's vocabulary"),
        (dict(prompt=TEXT, target=""), "the answer '' has no tokens"),
    ]
    for kw, msg in cases:
        with pytest.raises(ProxyError, match=msg) as e:
            attribute_prompt(tiny_llama, kw["prompt"], IG, target=kw["target"])
        assert _one_line(e), kw
    with pytest.raises(ProxyError, match="the prompt text '' has no tokens"):
        Prompt.from_text(tiny_llama.tokenizer, "", [1])
    with pytest.raises(ProxyError, match="text target needs the tokenizer"):
        Prompt.from_tokens([1, 2], " Paris")
    for prompts, targets, msg in (
        (TEXT, " Paris", "takes a list of prompts"),
        ([1, 2, 3], None, "one list of token ids"),
        (torch.tensor([1, 2, 3]), [1], r"\[n_prompts, seq\]"),
        ([TEXT, TEXT], [" Paris"], "1 entries for 2 prompts"),
        ([TEXT], {" Paris"}, "got set"),
    ):
        with pytest.raises(ProxyError, match=msg):
            as_prompts(tiny_llama, prompts, targets)


# ---------------------------------------------------------------- queries


ROWS = [
    {"id": "q1", "group": "capital", "question": "The capital city of France is", "answer": "Paris"},
    {"id": "q2", "group": "capital", "question": "The capital city of Italy is [Y].", "answer": "Rome",
     "language": "en", "subject": "Italy"},
    {"id": "q3", "group": "math", "question": "2 + 2 =", "answer": "4", "options": ["3", "4", "5"]},
]
BY_HAND = [
    Query(id="q1", group="capital", question="The capital city of France is", answer="Paris"),
    Query(id="q2", group="capital", question="The capital city of Italy is [Y].", answer="Rome", language="en",
          subject="Italy"),
    Query(id="q3", group="math", question="2 + 2 =", answer="4", options=("3", "4", "5")),
]


def test_as_queries_from_dicts_queries_and_one_record():
    assert as_queries(ROWS) == BY_HAND
    assert as_queries(tuple(ROWS)) == BY_HAND
    assert as_queries(iter(ROWS)) == BY_HAND
    assert as_queries([BY_HAND[0], ROWS[1], BY_HAND[2]]) == BY_HAND
    assert as_queries(ROWS[1]) == [BY_HAND[1]]
    assert as_queries(BY_HAND[2]) == [BY_HAND[2]]
    assert as_queries([]) == []
    # A JSON round trip (lists for tuples) and Query.to_dict's own records come back the same.
    assert as_queries(json.loads(json.dumps([q.to_dict() for q in BY_HAND]))) == BY_HAND


def test_as_queries_from_a_dataframe():
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(ROWS)  # q1 and q3 have holes (NaN) in language/subject, q1 and q2 in options
    assert frame["language"].isna().sum() == 2
    assert as_queries(frame) == BY_HAND
    got = as_queries(pd.DataFrame([dict(ROWS[2], options=pd.Series(["3", "4", "5"]).to_numpy())]))
    assert got == [BY_HAND[2]] and isinstance(got[0].options, tuple)
    with pytest.raises(DataError, match=r"queries\[1\] \(id 'q2'\): missing field\(s\) \['answer'\]"):
        as_queries(pd.DataFrame([ROWS[0], {k: v for k, v in ROWS[1].items() if k != "answer"}]))


@pytest.mark.parametrize("field, value", [("question", 7), ("answer", 4), ("id", 1), ("group", None),
                                          ("language", 3), ("options", "345"), ("options", ["4", 5])])
def test_a_bad_field_type_names_the_query_and_the_field(field, value):
    rows = [ROWS[0], dict(ROWS[2], **{field: value})]
    with pytest.raises(DataError, match=rf"queries\[1\].*{field}") as e:
        as_queries(rows)
    assert _one_line(e)
    if field != "id":
        assert "'q3'" in str(e.value)


def test_query_refuses_a_non_string_itself():
    with pytest.raises(DataError, match="field 'question' must be a string, got int 7"):
        Query(id="q", group="g", question=7, answer="a")


@pytest.mark.parametrize("obj, msg", [
    (5, "got int; give a Query, a dict"),
    ("builtin:facts", "load_data"),
    ([ROWS[0], "q2"], r"queries\[1\]: got str"),
    ([dict(ROWS[0], prompt="x")], r"unknown field\(s\) \['prompt'\]"),
    (torch.tensor([1, 2]), "got Tensor"),
])
def test_anything_else_names_what_is_accepted(obj, msg):
    with pytest.raises(DataError, match=msg) as e:
        as_queries(obj)
    assert _one_line(e)


def test_the_entry_points_take_dicts(tiny_llama):
    proxy = ProxyConfig("cloze", n_prompts=1, n_shots=0)
    rows, qs = ROWS[:2], BY_HAND[:2]
    assert accuracy(tiny_llama, rows, proxy).to_dict() == accuracy(tiny_llama, qs, proxy).to_dict()
    cfg = LocateConfig(proxy=proxy, ig=IGConfig(steps=2), selection=SEL)
    a = locate(tiny_llama, rows, cfg, progress=False, name="tiny")
    b = locate(tiny_llama, qs, cfg, progress=False, name="tiny")
    assert a.neurons_json()["queries"] == b.neurons_json()["queries"]
    assert all(torch.equal(a.scores[q.id], b.scores[q.id]) for q in qs) and len(a.qr_neurons("q1")) > 0
    got = lens_locate(tiny_llama, rows, proxy, top_k=3, progress=False).neurons_json()["queries"]
    assert got == lens_locate(tiny_llama, qs, proxy, top_k=3, progress=False).neurons_json()["queries"]
    with pytest.raises(DataError, match=r"queries\[0\].*'question'"):
        locate(tiny_llama, [dict(ROWS[0], question=1)], cfg, progress=False)


# ---------------------------------------------------------------- negative layers


def test_resolve_layers_counts_from_the_last():
    assert resolve_layers(3, [-1, 0, -2]) == [2, 0, 1]
    assert resolve_layers(3, None) == [0, 1, 2]
    assert resolve_layers(3, (torch.tensor(-1),)) == [2]
    for layers, msg in (([3], r"layer 3 is out of range for a 3-layer model: give 0\.\.2, or -3\.\.-1"),
                        ([-4], "layer -4 is out of range"), ([], "no layers"), ([1.0], "not an integer"),
                        ([True], "not an integer"), ([-1, 2], r"name layer\(s\) \[2\] twice"), ("01", "list")):
        with pytest.raises(QrncaError, match=msg):
            resolve_layers(3, layers)


def test_negative_layers_attribute_as_their_positive_twins(tiny_llama):
    L = n_layers(tiny_llama)
    hand = _hand_built(tiny_llama)
    assert torch.equal(attribute_prompt(tiny_llama, hand, IG, layers=[-1, 0]),
                       attribute_prompt(tiny_llama, hand, IG, layers=[L - 1, 0]))
    ref = IGConfig(steps=3, method="reference")
    assert torch.equal(attribute_prompt(tiny_llama, hand, ref, layers=[-2]),
                       attribute_prompt(tiny_llama, hand, ref, layers=[L - 2]))
    assert torch.equal(atp_scores(tiny_llama, [hand], [-1]), atp_scores(tiny_llama, [hand], [L - 1]))
    assert torch.equal(exhaustive_effects(tiny_llama, hand, layers=[-1]), exhaustive_effects(tiny_llama, hand, layers=[L - 1]))
    with pytest.raises(QrncaError, match=rf"out of range for a {L}-layer model: give 0\.\.{L - 1}, or -{L}\.\.-1") as e:
        attribute_prompt(tiny_llama, hand, IG, layers=[L])
    assert _one_line(e)


def test_a_run_records_negative_layers_as_the_models_numbers(tiny_llama, tmp_path):
    L = n_layers(tiny_llama)
    proxy = ProxyConfig("cloze", n_prompts=1, n_shots=0)
    neg_cfg = LocateConfig(proxy=proxy, ig=IG, selection=SEL, layers=(-1, 0))
    neg = locate(tiny_llama, ROWS[:2], neg_cfg, out=tmp_path / "neg", progress=False, name="tiny")
    pos = locate(tiny_llama, ROWS[:2], dataclasses.replace(neg_cfg, layers=(L - 1, 0)), progress=False, name="tiny")
    assert neg.layers == [L - 1, 0] and neg.config.layers == (L - 1, 0)
    manifest = json.loads((tmp_path / "neg" / "manifest.json").read_text())
    assert manifest["layers"] == [L - 1, 0]
    assert neg.neurons_json()["config"]["layers"] == [L - 1, 0]
    got = neg.neurons_json()["queries"]
    assert got == pos.neurons_json()["queries"]
    named = {layer for q in got.values() for layer, _, _ in q["qr_neurons"]}
    assert named and named <= {0, L - 1}
    # Resuming with the negative spelling finds the same run (its identity holds the resolved layers).
    again = locate(tiny_llama, ROWS[:2], neg_cfg, out=tmp_path / "neg", progress=False, name="tiny")
    assert again.neurons_json()["queries"] == got
    with pytest.raises(QrncaError, match="out of range") as e:
        locate(tiny_llama, ROWS[:2], LocateConfig(proxy=proxy, ig=IG, layers=(-L - 1,)), progress=False)
    assert _one_line(e)
