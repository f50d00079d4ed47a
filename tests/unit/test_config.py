"""Every config and result class on the ``Config`` base: round trips, unknown keys, the version key, validation."""

from __future__ import annotations

import json

import pytest
import torch

from qrnca_lens import __version__
from qrnca_lens.qrnca.ig import IGConfig
from qrnca_lens.config import VERSION_KEY, Config
from qrnca_lens.data.queries import Query
from qrnca_lens.errors import ProxyError, QrncaError
from qrnca_lens.evaluation.judge import EvalConfig
from qrnca_lens.evaluation.result import EvaluationResult
from qrnca_lens.qrnca.locate import LocateConfig
from qrnca_lens.data.prompts import Prompt, ProxyConfig, Template
from qrnca_lens.engine.scoring import AccuracyResult
from qrnca_lens.qrnca.selection import Cluster, SelectionConfig

TEMPLATE = Template("Go.\n", "{question}\n{options}\nAns:", option_format="<{letter}> {text}", option_sep=" ")
PROMPT = Prompt("q1", "geo", 1, "Q: capital?\nA:", (1, 5, 9), (7,), options=((7,), (8,), (4, 2)), correct=0,
                meta={"letters": ["A", "B", "C"]}, index=1, examples=("q2", "q3"), distractors=None)

INSTANCES = [
    IGConfig(steps=8, alpha_schedule="linspace", method="auto", max_batch_rows=12, require_gated=True,
             memory_budget_mb=64),
    ProxyConfig("mcqa-text", n_prompts=2, n_shots=1, letter_style="bare", prepend_bos=False, templates=(TEMPLATE,),
                seed=3),
    TEMPLATE,
    PROMPT,
    Prompt("q2", "geo", 0, "The capital of France is", (1, 2), (3, 4), distractors=((5,), (6, 7))),
    SelectionConfig(t=0.1, u=0.5, v=3, cluster_mode="sum", use_ica=False, remove_common=False),
    Cluster(torch.tensor([[0, 1], [1, 0]]), torch.tensor([0.5, 1 / 3]), (2, 3)),
    LocateConfig(ProxyConfig("cloze"), IGConfig(steps=4), SelectionConfig(v=5), layers=(0, 2)),
    LocateConfig(),
    EvalConfig(methods=("qrnca", "random"), seed=2, every_position=True, n_boot=20, batch_size=2, engine=False),
    EvaluationResult({"qrnca": {"boost": 1.5, "boost_ci": [1.0, 2.0]}}, {"qrnca": {"boost": 0.5}},
                     {"geo": {"n": 2}}, meta={"n_queries": 2}),
    AccuracyResult(0.5, 0.25, 12, 4, 0.25, ProxyConfig().to_dict(), True, {"geo": {"accuracy": 0.5}}),
    Query("q1", "geo", "Capital of France?", "Paris", options=("Lyon", "Paris"), meta={"relation": "P36"}),
]
IDS = [type(x).__name__ for x in INSTANCES]


@pytest.mark.parametrize("obj", INSTANCES, ids=IDS)
def test_round_trip_through_json(obj):
    assert isinstance(obj, Config)
    d = json.loads(json.dumps(obj.to_dict()))
    back = type(obj).from_dict(d)
    assert back == obj
    assert back.to_dict() == obj.to_dict()


@pytest.mark.parametrize("obj", INSTANCES, ids=IDS)
def test_unknown_keys_are_refused_with_the_valid_names(obj):
    cls = type(obj)
    with pytest.raises(QrncaError, match=rf"unknown {cls.__name__} keys \['zz_typo'\]; expected a subset of \[.*"):
        cls.from_dict({**obj.to_dict(), "zz_typo": 1})
    # Under the test suite's jaxtyping hook the parameter's type check fails first (a TypeError); without it, ours.
    with pytest.raises((QrncaError, TypeError), match="needs a mapping|Mapping"):
        cls.from_dict([1, 2])


@pytest.mark.parametrize("obj", INSTANCES, ids=IDS)
def test_the_version_key_is_accepted(obj):
    record = obj.to_record()
    assert record[VERSION_KEY] == __version__
    assert type(obj).from_dict(record) == obj


def test_stored_prompt_format_is_unchanged():
    """Run files store prompts: the dict must stay what earlier versions wrote (and read back)."""
    stored = {"query_id": "q1", "group": "geo", "template": 1, "text": "Q: capital?\nA:", "tokens": [1, 5, 9],
              "target": [7], "options": [[7], [8], [4, 2]], "correct": 0, "meta": {"letters": ["A", "B", "C"]},
              "index": 1, "examples": ["q2", "q3"], "distractors": None}
    assert PROMPT.to_dict() == stored
    assert list(PROMPT.to_dict()) == list(stored)  # same key order in the files
    back = Prompt.from_dict(stored)
    assert back == PROMPT and isinstance(back.options[2], tuple)
    # Files written before prompts recorded their index, examples and distractors.
    old = {k: v for k, v in stored.items() if k not in ("index", "examples", "distractors")}
    assert Prompt.from_dict(old).examples == () and Prompt.from_dict(old).distractors is None


def test_stored_config_formats_are_unchanged():
    assert LocateConfig(layers=(0, 2)).to_dict()["layers"] == [0, 2]
    assert set(LocateConfig().to_dict()) == {"proxy", "ig", "selection", "layers"}
    assert ProxyConfig(templates=(TEMPLATE,)).to_dict()["templates"] == [TEMPLATE.to_dict()]
    assert EvalConfig(methods=("qrnca",)).to_dict()["methods"] == ["qrnca"]
    assert Query("q", "g", "Q?", "A").to_dict() == {"id": "q", "group": "g", "question": "Q?", "answer": "A"}
    assert SelectionConfig().to_dict() == {"t": 0.2, "u": 0.3, "v": 20, "cluster_mode": "union", "use_ica": True,
                                           "remove_common": True}


@pytest.mark.parametrize("cls, kw, error, message", [
    (IGConfig, {"method": "slow"}, QrncaError, "method must be 'fast', 'reference' or 'auto', got 'slow'"),
    (IGConfig, {"alpha_schedule": "trapezoid"}, QrncaError,
     r"alpha_schedule must be 'riemann' \(k/m\) or 'linspace' \(authors'\), got 'trapezoid'"),
    (ProxyConfig, {"kind": "essay"}, ProxyError,
     r"unknown proxy 'essay'; choose one of \['mcqa-letter', 'mcqa-text', 'cloze'\]"),
    (ProxyConfig, {"letter_style": "paren"}, ProxyError, "letter_style must be 'space' or 'bare', got 'paren'"),
    (SelectionConfig, {"cluster_mode": "max"}, QrncaError,
     r"cluster_mode must be 'union' \(authors' code\) or 'sum' \(paper\), got 'max'"),
])
def test_literal_fields_keep_their_messages(cls, kw, error, message):
    with pytest.raises(error, match=message):
        cls(**kw)
    with pytest.raises(error, match=message):
        cls.from_dict({**cls().to_dict(), **kw})


def test_field_help_comes_from_the_metadata():
    assert IGConfig.field_help("steps") == "m, integration steps"
    assert IGConfig.field_help("require_gated") == ""
    with pytest.raises(QrncaError, match="no field 'stepz'"):
        IGConfig.field_help("stepz")


def test_cluster_from_dict_still_names_missing_keys():
    with pytest.raises(QrncaError, match="lacks keys.*'shape'"):
        Cluster.from_dict({"indices": [], "raw": []})


def test_every_memory_budget_default_is_the_one_constant():
    """IG, the row engine and scoring plan their passes with one default budget (``plan.DEFAULT_MEMORY_BUDGET_MB``)."""
    import inspect

    from qrnca_lens.engine import run_rows
    from qrnca_lens.engine.plan import DEFAULT_MEMORY_BUDGET_MB
    from qrnca_lens.engine.scoring import score_items

    assert IGConfig().memory_budget_mb == DEFAULT_MEMORY_BUDGET_MB
    for fn in (run_rows, score_items):
        assert inspect.signature(fn).parameters["memory_budget_mb"].default == DEFAULT_MEMORY_BUDGET_MB
    # A stored IG config of before keeps its meaning: the same fields, the same default.
    stored = {"steps": 16, "alpha_schedule": "riemann", "method": "fast", "max_batch_rows": 240,
              "require_gated": False, "memory_budget_mb": 1024}
    assert IGConfig.from_dict(stored) == IGConfig() and IGConfig().to_dict() == stored
