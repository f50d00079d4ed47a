"""grouping.py and competence.py: regrouping, group-specific neurons and at-chance marks against hand-made runs."""

from __future__ import annotations

import json
import math

import pytest

from qrnca_lens.render import analysis as A
from qrnca_lens.render.competence import at_chance, chance_margin, competence_record, group_competence
from qrnca_lens.data.queries import Query
from qrnca_lens.errors import QrncaError
from qrnca_lens.render.analysis import group_specificity
from qrnca_lens.data.grouping import GROUP_BY, group_key, regroup

# Two relations x two languages, one query each; each query group (relation-language) is one language.
# By language, pooled: en = {(0,1), (1,2), (2,3)}, fr = {(0,1), (2,5), (1,7)}; (0,1) is in both.
LANG_DOC = {
    "model": "hand", "data": "hand", "layers": [0, 1, 2], "group_by": "language",
    "config": {"proxy": {"kind": "mcqa-letter"}},
    "common_neurons": [],
    "queries": {
        "q1": {"group": "capital-en", "language": "en", "relation": "capital", "qr_neurons": [[0, 1, 1.0], [1, 2, 0.5]]},
        "q2": {"group": "color-en", "language": "en", "relation": "color", "qr_neurons": [[0, 1, 0.5], [2, 3, 0.5]]},
        "q3": {"group": "capital-fr", "language": "fr", "relation": "capital", "qr_neurons": [[0, 1, 1.0], [2, 5, 0.5]]},
        "q4": {"group": "color-fr", "language": "fr", "relation": "color", "qr_neurons": [[1, 7, 1.0]]},
    },
}
# Competence per query group. en: (0.2*10 + 0.3*10) / 20 = 0.25 over 20 prompts, at chance 0.25 (the margin is
# 2 * sqrt(0.25 * 0.75 / 20) = 0.194); fr: (0.9*10 + 0.7*30) / 40 = 0.75, far above.
RECORD = {"model": "hand", "runs": [
    {"data": "other", "proxy": "mcqa-letter", "accuracy": 0.0, "chance": 0.25, "n": 4,
     "per_group": {"capital-en": {"accuracy": 0.0, "n": 4}}},
    {"data": "hand", "proxy": "mcqa-letter", "accuracy": 0.6, "chance": 0.25, "n": 60,
     "per_group": {"capital-en": {"accuracy": 0.2, "mean_target_prob": 0.2, "n": 10},
                   "color-en": {"accuracy": 0.3, "mean_target_prob": 0.3, "n": 10},
                   "capital-fr": {"accuracy": 0.9, "mean_target_prob": 0.8, "n": 10},
                   "color-fr": {"accuracy": 0.7, "mean_target_prob": 0.6, "n": 30}}},
]}


def _q(i: str, group: str, **kw) -> Query:
    return Query(i, group, "The answer is [Y].", "x", **kw)


def test_regroup_queries_relabels_and_keeps_the_original_group():
    qs = [_q("a", "capital-en", language="en", relation="capital"), _q("b", "color-fr", language="fr", relation="color")]
    assert [q.group for q in regroup(qs, "language")] == ["en", "fr"]
    assert [q.group for q in regroup(qs, "relation")] == ["capital", "color"]
    assert regroup(qs, "group") == qs
    assert [q.meta["query_group"] for q in regroup(qs, "language")] == ["capital-en", "color-fr"]
    assert [q.group for q in qs] == ["capital-en", "color-fr"]  # the input is left alone
    assert GROUP_BY == ("group", "language", "relation")


def test_regroup_names_the_queries_without_the_field_and_the_fix():
    qs = [_q("a", "g", language="en")] + [_q(f"n{i}", "g") for i in range(7)]
    with pytest.raises(QrncaError, match=r"cannot group by 'language': 7 of 8 queries .*'n0'.*and 2 more.*"
                                         r"add a 'language' field.*--group-by group"):
        regroup(qs, "language")
    doc = {"queries": {"a": {"group": "g", "qr_neurons": []}}}
    with pytest.raises(QrncaError, match=r"1 of 1 queries have no 'relation' field \('a'\).*qrnca-lens reduce"):
        regroup(doc, "relation")
    with pytest.raises(QrncaError, match="group_by must be one of"):
        regroup(qs, "subject")


def test_regroup_doc_feeds_every_map():
    doc = regroup(LANG_DOC, "language")
    assert doc["group_by"] == "language" and A.groups(doc) == ["en", "fr"]
    assert A.group_neurons(doc) == {"en": {(0, 1), (1, 2), (2, 3)}, "fr": {(0, 1), (2, 5), (1, 7)}}
    names, m = A.overlap_matrix(doc)
    assert names == ["en", "fr"] and m[0, 1] == pytest.approx(1 / 5)
    assert [r["mean_qr_neurons"] for r in A.group_summaries(doc)] == [2.0, 1.5]  # Table 3
    assert [e["query_group"] for e in doc["queries"].values()] == ["capital-en", "color-en", "capital-fr", "color-fr"]
    assert A.groups(regroup(LANG_DOC, "relation")) == ["capital", "color"]
    assert group_key(LANG_DOC["queries"]["q1"], "relation") == "capital"


def test_group_specificity_by_hand():
    spec = group_specificity(regroup(LANG_DOC, "language"))
    assert spec["en"] == {"pooled": 3, "specific": 2, "shared_all": 1, "share_specific": 2 / 3,
                          "share_shared_all": 1 / 3}
    assert spec["fr"] == spec["en"]
    assert spec["all groups"] == {"pooled": 5, "specific": 4, "shared_all": 1, "share_specific": 0.8,
                                  "share_shared_all": 0.2}
    # By relation: capital = {(0,1), (1,2), (2,5)}, color = {(0,1), (2,3), (1,7)}.
    rel = group_specificity(regroup(LANG_DOC, "relation"))
    assert (rel["capital"]["specific"], rel["capital"]["shared_all"]) == (2, 1)
    # A group without neurons has no shares; by query group every neuron but (0,1) is specific.
    empty = {"queries": {**LANG_DOC["queries"], "q5": {"group": "none", "qr_neurons": []}}}
    s = group_specificity(empty)
    assert s["none"]["share_specific"] is None and s["all groups"]["shared_all"] == 0


def test_at_chance_rule():
    assert chance_margin(0.25, 20) == pytest.approx(2 * math.sqrt(0.25 * 0.75 / 20))
    assert at_chance(0.25 + chance_margin(0.25, 20), 0.25, 20)
    assert not at_chance(0.25 + chance_margin(0.25, 20) + 1e-9, 0.25, 20)
    assert at_chance(0.0, 0.0, 5) and not at_chance(0.2, 0.0, 5)  # cloze: chance 0, only "never right" is marked


def test_group_competence_aggregates_by_prompts_and_skips_split_groups(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "accuracy.json").write_text(json.dumps(RECORD))  # the demo's layout: the parent directory
    rec = competence_record(run, LANG_DOC)
    assert rec is not None and rec["data"] == "hand" and rec["source"].endswith("accuracy.json")
    comp = group_competence(rec, regroup(LANG_DOC, "language"))
    assert comp["en"]["accuracy"] == pytest.approx(0.25) and comp["en"]["n"] == 20 and comp["en"]["at_chance"]
    assert comp["fr"]["accuracy"] == pytest.approx(0.75) and comp["fr"]["n"] == 40 and not comp["fr"]["at_chance"]
    by_rel = group_competence(rec, regroup(LANG_DOC, "relation"))
    assert by_rel["capital"]["accuracy"] == pytest.approx(0.55) and not by_rel["capital"]["at_chance"]
    # A query group spread over two languages cannot be split: those languages get no competence.
    mixed = {"queries": {"a": {"group": "capital", "language": "en"}, "b": {"group": "capital", "language": "fr"}}}
    per = {"per_group": {"capital": {"accuracy": 0.5, "n": 10}}, "chance": 0.25}
    assert group_competence(per, regroup(mixed, "language")) == {}
    assert group_competence(None, LANG_DOC) == {}


def test_group_competence_uses_each_groups_own_chance_weighted_by_prompts():
    """A cloze record carries chance per query group (guessing a group's answer): a language's chance is the
    prompt-weighted mean of its groups', and the at-chance mark uses it."""
    rec = {"chance": 0.1, "per_group": {
        "capital-en": {"accuracy": 0.6, "n": 10, "chance": 0.5},   # answers share a first token: 0.6 is guessing
        "color-en": {"accuracy": 0.6, "n": 30, "chance": 0.5},
        "capital-fr": {"accuracy": 0.6, "n": 10, "chance": 0.1},
        "color-fr": {"accuracy": 0.6, "n": 30, "chance": 0.02}}}
    comp = group_competence(rec, regroup(LANG_DOC, "language"))
    assert comp["en"]["chance"] == pytest.approx(0.5) and comp["en"]["at_chance"]  # 0.6 <= 0.5 + 0.158
    assert comp["fr"]["chance"] == pytest.approx((0.1 * 10 + 0.02 * 30) / 40) and not comp["fr"]["at_chance"]
    assert comp["fr"]["margin"] == pytest.approx(chance_margin(0.04, 40))
    # One group without its own chance: the record's chance for the whole language.
    del rec["per_group"]["color-fr"]["chance"]
    assert group_competence(rec, regroup(LANG_DOC, "language"))["fr"]["chance"] == 0.1


def test_competence_record_must_match_the_run(tmp_path):
    assert competence_record(tmp_path, LANG_DOC) is None
    # In the run directory, a bare AccuracyResult of the same proxy kind is the run's.
    bare = {"accuracy": 0.5, "chance": None, "n": 4, "proxy": {"kind": "cloze"}, "per_group": {"g": {"accuracy": 0.0, "n": 4}}}
    (tmp_path / "accuracy.json").write_text(json.dumps(bare))
    assert competence_record(tmp_path, LANG_DOC) is None  # another proxy kind
    cloze = {**LANG_DOC, "config": {"proxy": {"kind": "cloze"}}}
    assert competence_record(tmp_path, cloze)["chance"] == 0.0  # cloze: top-1 over the vocabulary
    # In the parent directory an entry must name the run's data.
    run = tmp_path / "run"
    run.mkdir()
    assert competence_record(run, cloze) is None
