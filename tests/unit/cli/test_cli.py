"""The CLI: accuracy on every loader's format, JSON output, and clear errors for bad files."""

from __future__ import annotations

import json
import re

import pytest

import qrnca_lens.model.access as access
from qrnca_lens import cli
from qrnca_lens.qrnca.store import dtype_refusal


@pytest.fixture
def cli_model(monkeypatch, tiny_gated):
    """Run the CLI in-process on a tiny model instead of loading SmolLM2."""
    import qrnca_lens.model.loading as models

    monkeypatch.setattr(models, "load_model", lambda name, **kw: tiny_gated)
    return tiny_gated


def _last_json(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_accuracy_json_on_builtin(cli_model, capsys):
    assert cli.main(["accuracy", "--data", "builtin:facts", "--proxy", "cloze", "--limit", "2", "--json"]) == 0
    res = _last_json(capsys)
    assert set(res) >= {"accuracy", "mean_target_prob", "n"}
    assert res["n"] == 5 * 2 * 3 and 0 <= res["accuracy"] <= 1 and 0 < res["mean_target_prob"] < 1


def test_accuracy_on_each_format(cli_model, capsys, tmp_path):
    ours = "\n".join(json.dumps({"id": f"q{i}", "group": "g", "question": f"Is {i} even?", "answer": a,
                                 "options": ["yes", "no", "maybe", "never"]}) for i, a in enumerate(["yes", "no", "no"]))
    mmlu = "What is 2+2?,3,4,5,6,B\nWhat is 3+3?,6,7,8,9,A\n"
    mlama = "\n".join(json.dumps({"subject": s, "relation": "capital", "object": o, "template": "The capital of [X] is [Y] ."})
                      for s, o in [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Peru", "Lima")])
    authors = json.dumps({"a1": {"sentences": ["Q: 2+2?\nA. 4\nB. 5\nAnswer:"] * 2, "obj_label": ["A", "A"], "relation_name": "math"}})
    cases = [
        (_write(tmp_path, "ours.jsonl", ours), "mcqa-letter", 3 * 3),
        (_write(tmp_path, "math_test.csv", mmlu), "mcqa-letter", 2 * 3),
        (_write(tmp_path, "facts.jsonl", mlama), "cloze", 5 * 3),
        (_write(tmp_path, "authors.json", authors), "mcqa-letter", 2),
    ]
    for path, proxy, n in cases:
        assert cli.main(["accuracy", "--data", path, "--proxy", proxy, "--shots", "0", "--json"]) == 0, path
        assert _last_json(capsys)["n"] == n, path


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("missing.jsonl", '{"id": "a", "group": "g", "question": "Q?"}\n', r"missing.jsonl:1: missing field\(s\) \['answer'\]"),
        ("letters.csv", "Q one?,1,2,3,4,A\nQ two?,1,2,3,4,E\n", r"letters.csv:2: unknown answer letter 'E'"),
        ("empty.jsonl", "", r"empty.jsonl: no queries in the file \(it is empty\)"),
        ("bad.json", '{"x": {"sentences": ["s"], "obj_label": ["7"]}}', r"bad.json \(record 'x'\): unknown answer letter"),
    ],
)
def test_bad_files_give_a_clear_error(cli_model, capsys, tmp_path, name, text, message):
    path = _write(tmp_path, name, text)
    assert cli.main(["accuracy", "--data", path, "--proxy", "mcqa-letter"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err
    import re

    assert re.search(message, err), err


@pytest.mark.slow
def test_accuracy_cli_on_smollm2_process(tmp_path):
    """The installed console script, end to end on the real model."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "qrnca-lens"
    out = subprocess.run([str(script), "accuracy", "--model", "smollm2", "--data", "builtin:facts", "--proxy", "cloze",
                          "--limit", "3", "--json"], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["n"] == 5 * 3 * 3
    # The model knows these easy facts with in-context examples: far above zero (measured 0.77 on the full set).
    assert res["accuracy"] > 0.3


def test_demo_runs_end_to_end_on_a_tiny_model(cli_model, capsys, tmp_path):
    """The main job, start to finish: competence, locate, evaluate (with the lens), report."""
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--limit", "2", "--methods", "qrnca,random,logprob"]) == 0
    text = capsys.readouterr().out
    assert "report:" in text and (out / "facts-cloze" / "report.html").exists()
    ev = json.loads((out / "facts-cloze" / "evaluation.json").read_text())
    assert set(ev["pcr"]) == {"qrnca", "random", "logprob"}
    # Ground truth on one query per relation (the demo's default), for every compared locator.
    assert set(ev["ground_truth"]["methods"]) == {"qrnca", "random", "logprob"}
    assert len(ev["ground_truth"]["queries"]) == 5 and "GT P@k" in text
    acc = json.loads((out / "accuracy.json").read_text())["runs"][0]
    assert acc["proxy"] == "cloze" and acc["n_queries"] == 3 * 5  # 3 queries of each of the 5 relations
    timings = json.loads((out / "timings.json").read_text())
    assert timings["competence_per_group"] == 3
    assert set(timings["seconds"]) == {"load model", "competence", "locate", "evaluate", "report", "total"}
    assert "demo finished in" in text and "locate " in text.split("demo finished in")[1]


def test_languages_demo_maps_by_language_on_a_tiny_model(cli_model, capsys, tmp_path):
    """demo --languages: competence per language, locate on builtin:languages grouped by language, the maps."""
    out = tmp_path / "demo-languages"
    # Three of the seven languages keep this test at 15 queries; the full set differs only by the filter.
    assert cli.main(["demo", "--languages", "--langs", "zh,en,fr", "--out", str(out), "--limit", "1",
                     "--methods", "qrnca,random"]) == 0
    text = capsys.readouterr().out
    run = out / "languages-cloze"
    doc = json.loads((run / "neurons.json").read_text())
    assert doc["data"] == "builtin:languages" and len(doc["queries"]) == 15
    ev = json.loads((run / "evaluation.json").read_text())
    assert set(ev["per_group"]) == {"en", "fr", "zh"}  # judged by language
    html = (run / "report.html").read_text()
    assert "Language maps" in html and "languages demo finished in" in text
    acc = json.loads((out / "accuracy.json").read_text())["runs"][0]
    assert acc["data"] == "builtin:languages" and len(acc["per_group"]) == 15


@pytest.mark.parametrize("argv, msg", [
    (["--langs", "en,xx", "--languages"], r"unknown \['xx'\]; builtin:languages has en,fr,es,de,ru,zh,ja"),
    (["--langs", ",", "--languages"], "no language given"),
    (["--langs", "en"], "add --languages"),
])
def test_demo_langs_is_checked_before_the_model_loads(argv, msg, capsys, tmp_path, monkeypatch):
    from qrnca_lens.model import loading as models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --langs was checked")

    monkeypatch.setattr(models, "load_model", no_load)
    assert cli.main(["demo", "--out", str(tmp_path / "d"), *argv]) == 2
    assert re.search(msg, capsys.readouterr().err)


@pytest.mark.parametrize("command", ["locate", "accuracy"])
def test_ctrl_c_ends_with_a_line_not_a_traceback(command, capsys, tmp_path, monkeypatch):
    from qrnca_lens.cli import commands

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, f"cmd_{command}", interrupted)
    argv = [command, "--model", "smollm2", "--data", "builtin:facts"]
    assert cli.main(argv + (["--out", str(tmp_path / "run")] if command == "locate" else [])) == 130
    err = capsys.readouterr().err
    assert err.startswith(f"qrnca-lens {command}: interrupted") and "Traceback" not in err
    assert ("run the same command to resume" in err) == (command == "locate")


def test_exhaustive_prints_its_cost_and_the_largest_effects(cli_model, capsys, tmp_path):
    run = tmp_path / "run"
    assert cli.main(["locate", "--model", "smollm2", "--data", "builtin:facts", "--proxy", "cloze", "--limit", "1",
                     "--templates", "2", "--shots", "1", "--steps", "2", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["exhaustive", str(run), "--query", "capital-01", "--layers", "1,2", "--top", "5"]) == 0
    text = capsys.readouterr().out
    width = cli_model.cfg.d_mlp
    assert f"exhaustive: {2 * width} neurons (2 layers)" in text and "ms per neuron" in text
    doc = json.loads((run / "exhaustive-capital-01.json").read_text())
    assert doc["seconds"] > 0 and len(doc["effects"]) == 2 and len(doc["effects"][0]) == width
    flat = sorted((abs(e) for row in doc["effects"] for e in row), reverse=True)
    assert [abs(e) for _, _, e in doc["top"]] == pytest.approx(flat[:5])
    for layer, n, e in doc["top"]:
        assert doc["effects"][doc["layers"].index(layer)][n] == pytest.approx(e)


def test_examples_compile():
    """The examples stay valid Python (03 runs for real in the slow test below; 01 and 02 need a long run)."""
    import py_compile
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[3] / "examples").glob("*.py"))
    assert len(files) >= 3
    for f in files:
        py_compile.compile(str(f), doraise=True)


def _error_line(capsys) -> str:
    """The CLI's stderr on failure: exactly one line, "qrnca-lens CMD: error: ...", no traceback."""
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error:" in err and "Traceback" not in err, err
    return err


def _never_load(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model: these checks must come first."""
    import qrnca_lens.model.loading as models

    def load(*a, **kw):
        raise AssertionError("the model was loaded before the bad argument was reported")

    monkeypatch.setattr(models, "load_model", load)


@pytest.mark.parametrize("fmt", ["jsonl", "mlama", "csv", "json"])
def test_a_data_file_that_is_not_utf8_is_named(monkeypatch, capsys, tmp_path, fmt):
    _never_load(monkeypatch)
    name, text = {
        "jsonl": ("q.jsonl", '{"id": "a", "group": "g", "question": "Caf\u00e9?", "answer": "x"}\n'),
        "mlama": ("m.jsonl", '{"subject": "Caf\u00e9", "relation": "r", "object": "o", "template": "[X] [Y]"}\n'),
        "csv": ("q_test.csv", "Caf\u00e9?,1,2,3,4,A\n"),
        "json": ("a.json", '{"x": {"sentences": ["Caf\u00e9"], "obj_label": ["A"]}}'),
    }[fmt]
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1"))  # é as the single byte 0xe9
    assert cli.main(["accuracy", "--data", str(path)]) == 2
    assert re.search(rf"{re.escape(name)}: not UTF-8 text \(byte 0xe9.*save the file as UTF-8", _error_line(capsys))


def test_a_directory_given_as_data_is_named(monkeypatch, capsys, tmp_path):
    _never_load(monkeypatch)
    (tmp_path / "x.jsonl").mkdir()
    assert cli.main(["accuracy", "--data", str(tmp_path / "x.jsonl")]) == 2
    assert "x.jsonl: is a directory, not a data file" in _error_line(capsys)


def test_an_out_that_is_a_file_is_refused_before_the_model_loads(monkeypatch, capsys, tmp_path):
    _never_load(monkeypatch)
    (tmp_path / "f").write_text("")
    for out, message in ((tmp_path / "f", "is a file, not a directory"),
                         (tmp_path / "f" / "run", "f is a file, so the directory cannot be created")):
        assert cli.main(["locate", "--data", "builtin:facts", "--out", str(out)]) == 2
        assert message in _error_line(capsys)


def test_an_unwritable_out_is_refused_before_the_model_loads(monkeypatch, capsys, tmp_path):
    # The tests run as root, which may write anywhere: os.access stands in for a read-only directory.
    import os

    _never_load(monkeypatch)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(tmp_path) else real(p, mode, **kw))
    assert cli.main(["locate", "--data", "builtin:facts", "--out", str(tmp_path / "run")]) == 2
    assert f"{tmp_path} is not writable" in _error_line(capsys)


def test_a_model_directory_that_is_not_a_checkpoint_is_named(monkeypatch, capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    assert cli.main(["accuracy", "--data", "builtin:facts", "--model", str(tmp_path)]) == 2
    assert "is not a transformers checkpoint (no config.json)" in _error_line(capsys)


def test_a_broken_checkpoint_is_named(tmp_path):
    """config.json present but no weights: transformers' error becomes a ModelError naming the directory."""
    from qrnca_lens.errors import ModelError
    from qrnca_lens.model.loading import load_model

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelError, match=rf"{re.escape(str(tmp_path))} does not load as a transformers"):
        load_model(str(tmp_path))


# ---------------------------------------------------------------- a run keeps the prompts it attributed


def _facts_jsonl(path, groups=("capital", "language"), n=5, ids=None, answers=None):
    from qrnca_lens.data.queries import limit_per_group, load_data

    rows = [q for q in limit_per_group(load_data("builtin:facts"), n) if q.group in groups]
    with open(path, "w") as f:
        for q in rows:
            f.write(json.dumps({"id": (ids or {}).get(q.id, q.id), "group": q.group, "question": q.question,
                                "answer": (answers or {}).get(q.id, q.answer)}) + "\n")
    return str(path)


def _evaluate_json(run, capsys):
    assert cli.main(["evaluate", str(run), "--methods", "qrnca,random", "--bootstrap", "20", "--quiet"]) == 0
    capsys.readouterr()
    doc = json.loads((run / "evaluation.json").read_text())
    assert set(doc.pop("costs")) == {"qrnca", "random"}  # wall-clock seconds: measured, never the same twice
    assert doc.pop("timings")["total"] > 0  # the same: each stage's seconds
    return doc


def test_evaluate_judges_the_stored_prompts_whatever_happens_to_the_data_file(cli_model, capsys, tmp_path):
    data, run = tmp_path / "facts.jsonl", tmp_path / "run"
    _facts_jsonl(data)
    assert cli.main(["locate", "--data", str(data), "--proxy", "cloze", "--limit", "2", "--templates", "2",
                     "--shots", "2", "--steps", "4", "--out", str(run), "--quiet"]) == 0
    before = _evaluate_json(run, capsys)
    assert before["neuron_prediction"]["n"] > 0  # the cloze distractors come from the run too
    # Edit the file: other answers for attributed queries and for pool members, pool members gone.
    with open(data) as f:
        rows = [json.loads(line) for line in f]
    rows = [r for r in rows if not r["id"].endswith("-05")]
    for r in rows:
        r["answer"] = r["answer"][::-1]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _evaluate_json(run, capsys) == before
    data.unlink()
    assert _evaluate_json(run, capsys) == before


def test_pool_supplies_examples_for_a_small_file(cli_model, capsys, tmp_path):
    ids = {f"capital-0{i}": f"mine-capital-{i}" for i in range(1, 4)} | {f"language-0{i}": f"mine-lang-{i}" for i in range(1, 4)}
    data = _facts_jsonl(tmp_path / "small.jsonl", n=3, ids=ids)
    # 3 facts per group: 2 usable examples, fewer than the cloze default of 4; the error names --pool.
    assert cli.main(["accuracy", "--data", data, "--proxy", "cloze", "--json"]) == 2
    err = capsys.readouterr().err
    assert "fewer than n_shots=4" in err and "--pool" in err
    assert cli.main(["accuracy", "--data", data, "--pool", "builtin:facts", "--proxy", "cloze", "--json"]) == 0
    assert _last_json(capsys)["n_queries"] == 6
    lens = ["lens", "--data", data, "--proxy", "cloze", "--templates", "1", "--out", str(tmp_path / "lens"), "--quiet"]
    assert cli.main(lens) == 2 and "--pool" in capsys.readouterr().err
    assert cli.main(lens + ["--pool", "builtin:facts"]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    assert cli.main(["locate", "--data", data, "--pool", "builtin:facts", "--proxy", "cloze", "--templates", "2",
                     "--steps", "4", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["pool"] == "builtin:facts" and manifest["data"] == data
    from qrnca_lens.qrnca.locate import reduce

    prompts = reduce(run, write=False).stored_prompts()
    assert set(prompts) == set(ids.values())
    for ps in prompts.values():
        for p in ps:  # the examples are the pool's facts, not the file's own
            assert len(p.examples) == 4 and all(e.split("-")[0] in ("capital", "language") for e in p.examples)


# ---------------------------------------------------------------- options generated from the config dataclasses


def _subparsers():
    """command -> its parser (argparse has no public way to list them)."""
    parser = cli.build_parser()
    return next(a.choices for a in parser._actions if isinstance(a.choices, dict))


def test_every_config_option_takes_the_dataclass_default():
    """An option that mirrors a config field has the field's default (reduce: None, keeping the run's value)."""
    seen = set()
    for command, sub in _subparsers().items():
        for action in sub._actions:
            o = getattr(action, "config_option", None)
            if o is None:
                continue
            seen.add((o.cls.__name__, o.name))
            assert o.cls.field_help(o.name), f"{o.cls.__name__}.{o.name} has no help text"
            if command == "reduce" and not o.is_flag:
                assert action.default is None, (command, action.option_strings)
            else:
                assert o.parse(action.default) == o.default, (command, action.option_strings)
    # The fields that used to be copied by hand are all generated now.
    assert {("ProxyConfig", "kind"), ("ProxyConfig", "n_prompts"), ("ProxyConfig", "prepend_bos"),
            ("IGConfig", "steps"), ("IGConfig", "method"), ("IGConfig", "memory_budget_mb"),
            ("SelectionConfig", "t"), ("SelectionConfig", "use_ica"), ("EvalConfig", "methods"),
            ("EvalConfig", "n_boot")} <= seen


def test_the_options_build_the_dataclass_defaults():
    from qrnca_lens.qrnca.ig import IGConfig
    from qrnca_lens.cli.groups import eval_config, ig_config, proxy_config, selection_config
    from qrnca_lens.evaluation.judge import EvalConfig
    from qrnca_lens.data.prompts import ProxyConfig
    from qrnca_lens.qrnca.selection import SelectionConfig

    parser = cli.build_parser()
    loc = parser.parse_args(["locate", "--data", "d", "--out", "o"])
    assert (proxy_config(loc), ig_config(loc), selection_config(loc)) == (ProxyConfig(), IGConfig(), SelectionConfig())
    assert eval_config(parser.parse_args(["evaluate", "o"])) == EvalConfig()
    args = parser.parse_args(["locate", "--data", "d", "--out", "o", "--proxy", "cloze", "--templates", "2",
                              "--bos", "no", "--chat", "--ig-method", "auto", "--no-ica", "--cluster-mode", "sum"])
    assert proxy_config(args) == ProxyConfig("cloze", n_prompts=2, prepend_bos=False, chat_template=True)
    assert ig_config(args).method == "auto"
    assert selection_config(args) == SelectionConfig(cluster_mode="sum", use_ica=False)
    ev = parser.parse_args(["evaluate", "o", "--methods", "qrnca, random", "--bootstrap", "20"])
    assert eval_config(ev) == EvalConfig(methods=("qrnca", "random"), n_boot=20)
    # reduce: options left out keep the recorded selection, flags included.
    red = parser.parse_args(["reduce", "o", "--t", "0.3"])
    assert selection_config(red, SelectionConfig(v=3, use_ica=False)) == SelectionConfig(t=0.3, v=3, use_ica=False)


def test_method_offers_auto():
    # locate's --method names the locator (qrnca, atp, ...); the IG path moved to --ig-method.
    method = next(a for a in _subparsers()["locate"]._actions if "--ig-method" in a.option_strings)
    assert method.choices == ["fast", "reference", "auto"]


def test_an_ig_path_given_as_method_names_ig_method(monkeypatch, capsys, tmp_path):
    _never_load(monkeypatch)
    assert cli.main(["locate", "--data", "builtin:facts", "--out", str(tmp_path / "run"), "--method", "auto"]) == 2
    assert "the IG path is --ig-method auto" in _error_line(capsys)
    assert cli.main(["locate", "--data", "builtin:facts", "--out", str(tmp_path / "run"), "--method", "nope"]) == 2
    assert "'nope' is not a registered locator" in _error_line(capsys)


def test_a_bad_shard_names_the_option(monkeypatch, capsys, tmp_path):
    _never_load(monkeypatch)
    for bad in ("2/2", "a/b"):
        assert cli.main(["locate", "--data", "builtin:facts", "--out", str(tmp_path / "run"), "--shard", bad]) == 2
        assert "error: --shard: " in _error_line(capsys)


def test_group_by_is_generated_on_locate_evaluate_and_report():
    """--group-by comes from GroupingConfig / EvalConfig.group_by: choices and default by construction."""
    from qrnca_lens.cli.groups import eval_config, grouping_config
    from qrnca_lens.evaluation.judge import EvalConfig
    from qrnca_lens.data.grouping import GroupingConfig

    subs = _subparsers()
    for command, cls in (("locate", GroupingConfig), ("evaluate", EvalConfig), ("report", GroupingConfig)):
        action = next(a for a in subs[command]._actions if "--group-by" in a.option_strings)
        assert action.config_option.cls is cls and action.config_option.name == "group_by"
        assert action.choices == ["group", "language", "relation"]
        assert action.default == action.config_option.default == cls().group_by
    # None: the run's recorded choice (a new run records "group").
    assert GroupingConfig().group_by is None and EvalConfig().group_by is None
    parser = cli.build_parser()
    assert grouping_config(parser.parse_args(["locate", "--data", "d", "--out", "o"])) == GroupingConfig()
    loc = parser.parse_args(["locate", "--data", "d", "--out", "o", "--group-by", "language"])
    assert grouping_config(loc).group_by == "language"
    assert eval_config(parser.parse_args(["evaluate", "o", "--group-by", "relation"])).group_by == "relation"
    assert grouping_config(parser.parse_args(["report", "o", "--group-by", "language"])).group_by == "language"
    with pytest.raises(SystemExit):
        parser.parse_args(["report", "o", "--group-by", "subject"])


def test_accuracy_json_carries_per_group_competence(cli_model, capsys):
    """The last line of `accuracy --json` is a competence record the report reads (accuracy.json)."""
    assert cli.main(["accuracy", "--data", "builtin:facts", "--proxy", "mcqa-letter", "--limit", "1", "--json"]) == 0
    rec = _last_json(capsys)
    assert set(rec["per_group"]) == {"capital", "color", "continent", "landmark_country", "language"}
    assert all(set(v) >= {"accuracy", "n"} for v in rec["per_group"].values()) and rec["chance"] == 0.25


def test_locate_group_by_reaches_locate_and_fails_before_any_work(cli_model, capsys, tmp_path, monkeypatch):
    import qrnca_lens.qrnca.executors as executors

    monkeypatch.setattr(executors.SerialExecutor, "attribute", lambda *a, **k: pytest.fail("attributed"))
    assert cli.main(["locate", "--data", "builtin:facts", "--out", str(tmp_path / "run"), "--limit", "1",
                     "--group-by", "language"]) == 2
    assert "cannot group by 'language': 5 of 5 queries have no 'language' field" in _error_line(capsys)


# ---------------------------------------------------------------- --dtype / --device: how a run's model is held

# A minimal command line of every command; all but reduce load a model.
_ARGV = {
    "accuracy": ["--data", "d"], "locate": ["--data", "d", "--out", "o"], "lens": ["--data", "d", "--out", "o"],
    "evaluate": ["o"], "report": ["o"], "bench": [], "exhaustive": ["o", "--query", "q"], "demo": [],
}
_RUN_COMMANDS = ("evaluate", "report", "exhaustive")


def test_every_model_loading_command_takes_dtype_and_device():
    subs = _subparsers()
    with_dtype = {c for c, p in subs.items() if any("--dtype" in a.option_strings for a in p._actions)}
    assert with_dtype == set(subs) - {"reduce"} == set(_ARGV)  # a new command that loads a model needs them too
    parser = cli.build_parser()
    for command, argv in _ARGV.items():
        args = parser.parse_args([command, *argv, "--dtype", "bfloat16", "--device", "cuda:1"])
        assert (args.dtype, args.device) == ("bfloat16", "cuda:1"), command
        plain = parser.parse_args([command, *argv])
        assert (plain.dtype, plain.device) == (None, None), command  # None: float32, or the run's recorded dtype
        takes_allow = hasattr(parser.parse_args([command, *argv]), "allow_dtype_change")
        assert takes_allow == (command in (*_RUN_COMMANDS, "locate", "demo")), command
        with pytest.raises(SystemExit):
            parser.parse_args([command, *argv, "--dtype", "float64"])
    assert parser.parse_args(["evaluate", "o", "--allow-dtype-change"]).allow_dtype_change is True


@pytest.fixture
def dtype_model(monkeypatch, tiny_llama):
    """load_model on the tiny Llama in the asked dtype (a copy per dtype); records every call's dtype and device."""
    import copy

    import torch

    import qrnca_lens.model.loading as models

    copies = {"float32": tiny_llama}
    calls = []

    def load(name, *, dtype="float32", device=None, **kw):
        key = access.dtype_name(access.parse_dtype(dtype))
        calls.append((key, device))
        if key not in copies:
            copies[key] = copy.deepcopy(tiny_llama).to(getattr(torch, key))
        return copies[key]

    monkeypatch.setattr(models, "load_model", load)
    return calls


_LOCATE = ["locate", "--data", "builtin:facts", "--proxy", "cloze", "--limit", "1", "--templates", "2", "--shots", "1",
           "--steps", "2", "--quiet"]


def test_locate_records_dtype_and_device_and_resumes_in_the_recorded_dtype(dtype_model, capsys, tmp_path):
    run = tmp_path / "run"
    assert cli.main([*_LOCATE, "--out", str(run), "--dtype", "bfloat16", "--device", "cpu"]) == 0
    assert dtype_model == [("bfloat16", "cpu")]
    man = json.loads((run / "manifest.json").read_text())
    assert (man["dtype"], man["device"]) == ("bfloat16", "cpu")
    capsys.readouterr()
    assert cli.main([*_LOCATE, "--out", str(run)]) == 0  # the same run, no --dtype: its own dtype
    assert dtype_model[-1] == ("bfloat16", None)
    assert cli.main([*_LOCATE, "--out", str(run), "--dtype", "float32"]) == 2
    assert dtype_model[-1] == ("bfloat16", None)  # refused before the model loads
    assert _error_line(capsys) == f"qrnca-lens locate: error: {dtype_refusal(run, 'bfloat16', 'float32')}"
    assert cli.main([*_LOCATE, "--out", str(run), "--dtype", "float32", "--allow-dtype-change"]) == 0
    assert json.loads((run / "manifest.json").read_text())["dtype_changes"] == ["float32"]


def test_evaluate_report_and_exhaustive_load_the_model_in_the_recorded_dtype(dtype_model, capsys, tmp_path):
    run = tmp_path / "run"
    assert cli.main([*_LOCATE, "--out", str(run), "--dtype", "float16"]) == 0
    del dtype_model[:]
    assert cli.main(["evaluate", str(run), "--methods", "qrnca,random", "--bootstrap", "10", "--quiet",
                     "--no-symbol-binding"]) == 0
    ev = json.loads((run / "evaluation.json").read_text())["meta"]
    assert (ev["dtype"], ev["run_dtype"], ev["device"], ev["run_device"]) == ("float16", "float16", "cpu", "cpu")
    assert cli.main(["report", str(run), "--queries", "1"]) == 0
    assert cli.main(["exhaustive", str(run), "--query", "capital-01", "--layers", "2", "--top", "1"]) == 0
    assert dtype_model == [("float16", None)] * 3
    capsys.readouterr()
    for command in _RUN_COMMANDS:  # another dtype: one line, before the model loads
        argv = [command, str(run), "--dtype", "float32"] + (["--query", "capital-01"] if command == "exhaustive" else [])
        assert cli.main(argv) == 2, command
        assert _error_line(capsys) == f"qrnca-lens {command}: error: {dtype_refusal(run, 'float16', 'float32')}"
    assert dtype_model == [("float16", None)] * 3


def test_a_run_without_a_recorded_dtype_is_said_to_be_unknown_and_loads_in_float32(dtype_model, capsys, tmp_path):
    run = tmp_path / "run"
    assert cli.main([*_LOCATE, "--out", str(run)]) == 0
    for path in (run / "manifest.json", run / "neurons.json"):  # as a run made before dtypes were recorded
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items()
                                    if k not in ("dtype", "device")}))
    capsys.readouterr()
    assert cli.main(["report", str(run), "--queries", "1"]) == 0
    assert "does not record its dtype" in capsys.readouterr().out and dtype_model[-1] == ("float32", None)
    with pytest.warns(UserWarning, match="does not record its dtype"):
        assert cli.main(["evaluate", str(run), "--methods", "qrnca,random", "--bootstrap", "10", "--quiet",
                         "--dtype", "bfloat16"]) == 0
    assert dtype_model[-1] == ("bfloat16", None)


# ---------------------------------------------------------------- locate --method NAME, evaluate of its result


def _count_evaluation_writes(monkeypatch):
    """Every atomic write ends in os.replace: count the ones onto evaluation.json."""
    import os

    writes = []
    real = os.replace

    def replace(src, dst, *a, **kw):
        if str(dst).endswith("evaluation.json"):
            writes.append(str(dst))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    return writes


def test_locate_method_atp_then_evaluate_its_directory(cli_model, capsys, tmp_path, monkeypatch):
    from qrnca_lens.located import RankedResult

    out = tmp_path / "atp"
    assert cli.main(["locate", "--method", "atp", "--data", "builtin:facts", "--proxy", "cloze", "--limit", "2",
                     "--templates", "2", "--shots", "1", "--top", "4", "--layers", "1,2", "--out", str(out),
                     "--quiet"]) == 0
    assert "atp: 10 queries, 4.0 neurons per query on average" in capsys.readouterr().out
    res = RankedResult.load(out)
    assert res.locator == "atp" and res.layers == [1, 2] and res.data == "builtin:facts"
    assert all(len(v) == 4 and set(v.layers) <= {1, 2} for v in res.neurons.values())
    writes = _count_evaluation_writes(monkeypatch)
    assert cli.main(["evaluate", str(out), "--bootstrap", "20", "--budget", "3", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert writes == [str(out / "evaluation.json")]  # evaluate writes it; the command does not write it again
    doc = json.loads((out / "evaluation.json").read_text())
    assert doc["meta"]["located"] == "atp" and doc["meta"]["methods"] == ["atp", "random"]
    assert doc["meta"]["budget"] == 3 and doc["pcr"]["atp"]["mean_neurons"] == 3.0
    assert "neurons per query: every method cut to 3 neurons per query" in printed
    # A QRNCA run directory is not overwritten by another method's result.
    run = tmp_path / "run"
    assert cli.main(["locate", "--data", "builtin:facts", "--proxy", "cloze", "--limit", "1", "--templates", "2",
                     "--shots", "1", "--steps", "2", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["locate", "--method", "kn", "--data", "builtin:facts", "--out", str(run)]) == 2
    assert "holds a QRNCA run" in _error_line(capsys)
    writes.clear()
    assert cli.main(["evaluate", str(run), "--methods", "qrnca,random", "--bootstrap", "20", "--quiet"]) == 0
    assert writes == [str(run / "evaluation.json")]
    # kn reusing the run's stored IG through --run.
    assert cli.main(["locate", "--method", "kn", "--data", "builtin:facts", "--proxy", "cloze", "--limit", "1",
                     "--run", str(run), "--out", str(tmp_path / "kn"), "--quiet"]) == 0
    assert RankedResult.load(tmp_path / "kn").meta["qrnca_run"] == str(run)


def test_the_lens_command_is_an_alias_that_says_what_replaced_it(cli_model, capsys, tmp_path):
    from qrnca_lens.located import RankedResult

    out = tmp_path / "lens"
    assert cli.main(["lens", "--data", "builtin:facts", "--proxy", "cloze", "--limit", "1", "--templates", "2",
                     "--shots", "1", "--top", "3", "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    notices = [line for line in err if "locate --method logprob" in line]
    assert len(notices) == 1 and "is now" in notices[0]
    res = RankedResult.load(out)
    assert res.locator == "logprob" and all(len(v) == 3 for v in res.neurons.values())


def test_a_bad_budget_is_refused_before_the_model_loads(monkeypatch, capsys, tmp_path):
    _never_load(monkeypatch)
    assert cli.main(["evaluate", str(tmp_path), "--budget", "most"]) == 2
    assert "budget must be 'qrnca', 'own' or a number of neurons >= 1, got 'most'" in _error_line(capsys)


def test_evaluate_prints_each_stages_seconds_in_one_line_after_the_table(cli_model, capsys, tmp_path):
    from qrnca_lens.evaluation.result import EvaluationResult

    run = tmp_path / "run"
    assert cli.main(["locate", "--data", "builtin:facts", "--proxy", "cloze", "--limit", "1", "--templates", "2",
                     "--shots", "1", "--steps", "2", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", str(run), "--methods", "qrnca,random", "--bootstrap", "20", "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    timings = EvaluationResult.load(run).timings  # what evaluation.json holds is what was printed
    timed = [line for line in lines if line.startswith("seconds:")]
    assert timed == [timings.line()] and timings.total is not None
    assert timed[0].startswith("seconds: total ") and "free form" in timed[0] and "(greedy " in timed[0]
    last_row = max(i for i, line in enumerate(lines) if line.startswith(("qrnca ", "random ")))
    assert lines.index(timed[0]) > last_row  # after the table's rows
