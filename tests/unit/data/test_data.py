"""Tests for qrnca_lens.data.queries: the built-in sets, every loader, their error messages and load_data dispatch."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qrnca_lens.data.queries import (
    Query,
    builtin_names,
    groups_of,
    load_authors_json,
    load_data,
    load_jsonl,
    load_mmlu_csv,
)
from qrnca_lens.errors import DataError, QrncaError


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------- built-in sets


DOMAIN_GROUPS = ["biology", "physics", "chemistry", "mathematics", "computer_science", "geography"]
FACT_GROUPS = ["capital", "language", "continent", "landmark_country", "color"]


def test_builtin_names():
    assert builtin_names() == ("domains", "facts", "languages")


def test_builtin_domains_shape():
    qs = load_data("builtin:domains")
    assert len(qs) == 120
    groups = groups_of(qs)
    assert list(groups) == DOMAIN_GROUPS
    assert all(len(v) == 20 for v in groups.values())
    for q in qs:
        assert q.options is not None and len(q.options) == 4
        assert len(set(q.options)) == 4
        assert q.answer in q.options
        assert q.prompts is None
    assert len({q.id for q in qs}) == len(qs)
    first = qs[0]
    assert (first.id, first.group, first.answer) == ("biology-01", "biology", "Heart")
    assert first.options == ("Liver", "Heart", "Lungs", "Kidney")


def test_builtin_facts_shape():
    qs = load_data("builtin:facts")
    groups = groups_of(qs)
    assert len(groups) >= 5
    assert list(groups)[:5] == FACT_GROUPS
    assert all(len(v) == 20 for v in groups.values())
    assert len({q.id for q in qs}) == len(qs)
    # facts carry no options of their own: distractors come from the group
    assert all(q.options is None for q in qs)
    assert (qs[0].group, qs[0].answer, qs[0].subject) == ("capital", "Paris", "France")
    slot = [q for q in qs if q.has_slot]
    assert slot, "the built-in facts should include [Y]-slot cloze questions"
    assert next(q for q in qs if q.id == "capital-04").question == "The capital of Italy is [Y] ."


LANGUAGES = ["en", "fr", "es", "de", "ru", "zh", "ja"]


@pytest.fixture(scope="module")
def languages():
    return load_data("builtin:languages")


def test_builtin_languages_shape(languages):
    qs = languages
    assert len(qs) == len(LANGUAGES) * len(FACT_GROUPS) * 20
    assert len({q.id for q in qs}) == len(qs)
    groups = groups_of(qs)
    assert list(groups) == [f"{r}-{lang}" for lang in LANGUAGES for r in FACT_GROUPS]
    for name, items in groups.items():
        rel, lang = name.rsplit("-", 1)
        assert len(items) == 20
        # a group is one relation in one language: prompts draw examples and distractors from it
        assert {(q.relation, q.language) for q in items} == {(rel, lang)}
        assert [q.id for q in items] == [f"{rel}-{lang}-{n:02d}" for n in range(1, 21)]
        assert all(q.subject and q.options is None for q in items)


def test_builtin_languages_groups_have_enough_distinct_answers(languages):
    for name, items in groups_of(languages).items():
        distinct = {" ".join(q.answer.lower().split()) for q in items}
        assert len(distinct) >= 4, (name, sorted(distinct))


def test_builtin_languages_english_rows_are_the_facts_set(languages):
    facts = {q.id: q for q in load_data("builtin:facts")}
    en = [q for q in languages if q.language == "en"]
    assert len(en) == 100
    for q in en:
        f = facts[q.id.replace("-en-", "-")]
        assert (q.question, q.answer, q.subject) == (f.question, f.answer, f.subject)


def test_builtin_languages_are_parallel(languages):
    """Row nn is the same fact in every language: facts sharing an answer in a language share it in English
    (a language may split one English answer, as Russian does for the sky's and blueberries' blue, but never
    merge two), and apart from colours the answers repeat exactly where the English ones do."""
    by = {(q.relation, q.language, q.id.rsplit("-", 1)[1]): q for q in languages}
    for rel in FACT_GROUPS:
        en = [by[(rel, "en", f"{n:02d}")].answer for n in range(1, 21)]
        for lang in LANGUAGES:
            ans = [by[(rel, lang, f"{n:02d}")].answer for n in range(1, 21)]
            same = {(i, j) for i in range(20) for j in range(20) if ans[i] == ans[j]}
            same_en = {(i, j) for i in range(20) for j in range(20) if en[i] == en[j]}
            assert same <= same_en, (rel, lang)
            if rel != "color":
                assert same == same_en, (rel, lang)


def test_builtin_languages_cjk_rows_glue_the_answer(languages):
    """Chinese and Japanese write no spaces: every question has a [Y] slot right after text, so the cloze
    proxy joins the answer without a space (Query.answer_sep)."""
    for q in languages:
        if q.language in ("zh", "ja"):
            assert " " not in q.question and " " not in q.answer, q.id
            assert q.has_slot and q.answer_sep == "", q.id
        else:
            assert q.answer_sep == " ", q.id


@pytest.mark.parametrize(("question", "sep"), [
    ("The capital of Italy is [Y] .", " "), ("The capital of Italy is", " "), ("法国的首都是[Y]。", ""),
    ("Il parle l'[Y] .", ""), ("[Y] is the capital of Italy .", " "), ("Rome is\t[Y]", " "),
])
def test_query_answer_sep(question, sep):
    assert Query("q", "g", question, "x").answer_sep == sep


def test_builtin_languages_cloze_prompts_build_for_every_group(languages, tiny_tokenizer):
    from qrnca_lens.data.prompts import ProxyConfig, build_all_prompts

    cfg = ProxyConfig("cloze")
    prompts = build_all_prompts(languages, cfg, tiny_tokenizer)
    assert set(prompts) == {q.id for q in languages}
    for q in languages:
        ps = prompts[q.id]
        assert len(ps) == cfg.n_prompts
        for p in ps:
            assert len(p.examples) == cfg.shots
            # examples come from the query's own group: one relation in one language
            assert all(e.rsplit("-", 1)[0] == q.group for e in p.examples)
            assert tiny_tokenizer.decode(list(p.tokens) + list(p.target)).endswith(q.answer_sep + q.answer)
            assert p.distractors is not None and len(p.distractors) == cfg.n_options - 1


@pytest.mark.parametrize("name", ["domains", "facts"])
@pytest.mark.parametrize("n", [1, 3])
def test_limit_keeps_first_n_of_every_group_in_file_order(name, n):
    full = load_data(f"builtin:{name}")
    limited = load_data(f"builtin:{name}", limit=n)
    expected = [q for g in groups_of(full).values() for q in g[:n]]
    order = {q.id: i for i, q in enumerate(full)}
    expected.sort(key=lambda q: order[q.id])
    assert [q.id for q in limited] == [q.id for q in expected]
    assert len(limited) == n * len(groups_of(full))
    assert all(len(v) == n for v in groups_of(limited).values())


def test_limit_on_interleaved_file_keeps_file_order(tmp_path):
    rows = [
        {"id": "a1", "group": "a", "question": "qa1", "answer": "x"},
        {"id": "b1", "group": "b", "question": "qb1", "answer": "x"},
        {"id": "a2", "group": "a", "question": "qa2", "answer": "x"},
        {"id": "b2", "group": "b", "question": "qb2", "answer": "x"},
        {"id": "a3", "group": "a", "question": "qa3", "answer": "x"},
        {"id": "b3", "group": "b", "question": "qb3", "answer": "x"},
    ]
    p = _jsonl(tmp_path / "q.jsonl", rows)
    assert [q.id for q in load_data(p, limit=2)] == ["a1", "b1", "a2", "b2"]
    assert [q.id for q in load_data(p, limit=10)] == ["a1", "b1", "a2", "b2", "a3", "b3"]


def test_limit_below_one_is_an_error():
    with pytest.raises(DataError, match="limit must be at least 1, got 0"):
        load_data("builtin:facts", limit=0)


def test_unknown_builtin_name():
    with pytest.raises(DataError, match=r"unknown built-in data set 'nope'.*builtin:domains.*builtin:facts"):
        load_data("builtin:nope")


def test_data_error_is_a_value_error():
    assert issubclass(DataError, QrncaError) and issubclass(DataError, ValueError)


# ---------------------------------------------------------------- our JSONL


def test_jsonl_with_and_without_options_and_language(tmp_path):
    rows = [
        {"id": "q1", "group": "geo", "question": "Capital of France?", "answer": "Paris",
         "options": ["Lyon", "Paris", "Nice"], "language": "en"},
        {"id": "q2", "group": "geo", "question": "Capital of Spain?", "answer": "Madrid", "subject": "Spain"},
        {"id": 3, "group": "bio", "question": "Organ that pumps blood?", "answer": "Heart", "language": "de"},
    ]
    p = _jsonl(tmp_path / "ours.jsonl", rows)
    qs = load_jsonl(p)
    assert qs == [
        Query("q1", "geo", "Capital of France?", "Paris", options=("Lyon", "Paris", "Nice"), language="en"),
        Query("q2", "geo", "Capital of Spain?", "Madrid", subject="Spain"),
        Query("3", "bio", "Organ that pumps blood?", "Heart", language="de"),
    ]
    assert isinstance(qs[0].options, tuple)
    assert qs[1].options is None and qs[1].language is None
    assert qs[2].id == "3"  # numeric ids become strings
    assert load_data(p) == qs


def test_jsonl_skips_blank_lines(tmp_path):
    p = _write(tmp_path / "b.jsonl",
               '\n{"id": "a", "group": "g", "question": "q?", "answer": "x"}\n   \n'
               '{"id": "b", "group": "g", "question": "r?", "answer": "y"}\n\n')
    assert [q.id for q in load_jsonl(p)] == ["a", "b"]


@pytest.mark.parametrize(
    "q",
    [
        Query("q1", "geo", "Capital of France?", "Paris", options=("Lyon", "Paris", "Nice"), language="en"),
        Query("f1", "capital", "The capital of Italy is [Y] .", "Rome", subject="Italy", meta={"relation": "P36"}),
        Query("p1", "rel", "Q... Answer: ", "B", prompts=("Q... Answer: ", "R... Answer: "), prompt_letters=("B", "C")),
    ],
)
def test_query_dict_round_trip(q):
    d = q.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain JSON types only
    assert all(v is not None for v in d.values())
    back = Query.from_dict(d)
    assert back == q
    assert back.meta == q.meta
    assert back.to_dict() == d


def test_query_to_dict_drops_unset_fields():
    d = Query("q1", "geo", "Capital?", "Paris", options=("Lyon", "Paris")).to_dict()
    assert d == {"id": "q1", "group": "geo", "question": "Capital?", "answer": "Paris", "options": ["Lyon", "Paris"]}


def test_query_validation():
    with pytest.raises(DataError, match="empty question"):
        Query("q", "g", "  ", "x")
    with pytest.raises(DataError, match="empty answer"):
        Query("q", "g", "question?", " ")
    with pytest.raises(DataError, match="field 'group' must be a non-empty string"):
        Query("q", "", "question?", "x")
    with pytest.raises(DataError, match="options repeat"):
        Query("q", "g", "question?", "x", options=("x", "y", "x"))
    with pytest.raises(DataError, match="at least 2 options"):
        Query("q", "g", "question?", "x", options=("x",))


# ---------------------------------------------------------------- MMLU CSV


MMLU_ROWS = (
    'What is 2+2?,3,4,5,6,B\n'
    '"Which, with a comma, is first?",alpha,beta,gamma,delta,A\n'
    'Largest planet?,Mars,Venus,Earth,Jupiter,d\n'
)


@pytest.mark.parametrize("header", [False, True])
def test_mmlu_csv_maps_letters_to_options(tmp_path, header):
    text = ("question,A,B,C,D,answer\n" if header else "") + MMLU_ROWS
    p = _write(tmp_path / "high_school_math_test.csv", text)
    qs = load_mmlu_csv(p)
    assert [q.question for q in qs] == ["What is 2+2?", "Which, with a comma, is first?", "Largest planet?"]
    assert [q.answer for q in qs] == ["4", "alpha", "Jupiter"]
    assert qs[0].options == ("3", "4", "5", "6")
    assert qs[1].options == ("alpha", "beta", "gamma", "delta")
    assert {q.group for q in qs} == {"high_school_math"}
    first_line = 2 if header else 1
    assert [q.id for q in qs] == [f"high_school_math-{first_line + i}" for i in range(3)]
    assert load_data(p) == qs


@pytest.mark.parametrize("stem,group", [("anatomy_test", "anatomy"), ("anatomy_dev", "anatomy"),
                                        ("anatomy_val", "anatomy"), ("anatomy", "anatomy"),
                                        ("test_anatomy", "test_anatomy")])
def test_mmlu_group_from_file_stem(tmp_path, stem, group):
    p = _write(tmp_path / f"{stem}.csv", "Q?,a,b,c,d,C\n")
    (q,) = load_data(p)
    assert q.group == group
    assert q.answer == "c"


def test_mmlu_explicit_group_wins(tmp_path):
    p = _write(tmp_path / "anatomy_test.csv", "Q?,a,b,c,d,C\n")
    assert load_data(p, group="medicine")[0].group == "medicine"


def test_mmlu_unknown_letter(tmp_path):
    p = _write(tmp_path / "x_test.csv", "Q1?,a,b,c,d,A\nQ2?,a,b,c,d,E\n")
    with pytest.raises(DataError, match=re.escape(f"{p}:2") + r": unknown answer letter 'E'"):
        load_mmlu_csv(p)


def test_mmlu_wrong_column_count(tmp_path):
    p = _write(tmp_path / "x_test.csv", "Q1?,a,b,c,d,A\nQ2?,a,b,c,D\nQ3?,a,b,c,d,A\n")
    with pytest.raises(DataError, match=re.escape(f"{p}:2") + r": expected 6 columns .* got 5"):
        load_mmlu_csv(p)


def test_mmlu_empty_and_header_only(tmp_path):
    p = _write(tmp_path / "x_test.csv", "")
    with pytest.raises(DataError, match=re.escape(str(p)) + ".*empty"):
        load_mmlu_csv(p)
    p2 = _write(tmp_path / "y_test.csv", "question,A,B,C,D,answer\n")
    with pytest.raises(DataError, match="empty"):
        load_mmlu_csv(p2)


def test_mmlu_multiline_quoted_question_keeps_newline(tmp_path):
    p = _write(tmp_path / "cs_test.csv", '"What does this print?\nprint(1)",0,1,2,3,B\n')
    (q,) = load_mmlu_csv(p)
    assert q.question == "What does this print?\nprint(1)" and q.answer == "1"


def test_mmlu_error_line_after_multiline_record(tmp_path):
    p = _write(tmp_path / "cs_test.csv", '"What does this print?\nprint(1)",0,1,2,3,B\nQ2?,a,b,c,d,E\n')
    with pytest.raises(DataError, match=re.escape(f"{p}:3") + r": unknown answer letter 'E'"):
        load_mmlu_csv(p)


def test_jsonl_raw_line_separator_inside_string(tmp_path):
    row = {"id": "a", "group": "g", "question": "Line one\u2028line two?", "answer": "x"}
    p = _write(tmp_path / "ls.jsonl", json.dumps(row, ensure_ascii=False) + "\n")
    (q,) = load_jsonl(p)
    assert q.question == "Line one\u2028line two?"


def test_authors_json(tmp_path):
    data = {
        "q1": {"sentences": ["Question: 2+2?\nA. 3\nB. 4\nAnswer: ", "Q: 2+2? (A) 3 (B) 4\nA:"],
               "obj_label": ["B", "A"], "relation_name": "math"},
        "q2": {"sentences": ["Where is Paris? A. France B. Peru\nAnswer:"], "obj_label": ["A"], "relation_name": "geo"},
        "q3": {"sentences": ["x Answer:"], "obj_label": ["C"]},
    }
    p = _write(tmp_path / "authors.json", json.dumps(data))
    qs = load_authors_json(p)
    assert [q.id for q in qs] == ["q1", "q2", "q3"]
    q1, q2, q3 = qs
    assert q1.prompts == ("Question: 2+2?\nA. 3\nB. 4\nAnswer: ", "Q: 2+2? (A) 3 (B) 4\nA:")  # trailing space kept
    assert q1.prompt_letters == ("B", "A")
    assert (q1.group, q1.answer, q1.question) == ("math", "B", "Question: 2+2?\nA. 3\nB. 4\nAnswer: ")
    assert q2.prompt_letters == ("A",) and q2.answer == "A" and q2.group == "geo"
    assert q3.group == "default"
    assert load_data(p) == qs


def test_authors_json_single_label_broadcast(tmp_path):
    data = {"7": {"sentences": ["one Answer: ", "two Answer: ", "three Answer: "], "obj_label": "D",
                  "relation_name": "r"}}
    p = _write(tmp_path / "a.json", json.dumps(data))
    (q,) = load_authors_json(p)
    assert q.id == "7"
    assert q.prompt_letters == ("D", "D", "D")
    assert len(q.prompts) == 3


@pytest.mark.parametrize("label", ["1", "AB", "", "?"])
def test_authors_json_non_letter_label(tmp_path, label):
    data = {"ok": {"sentences": ["a"], "obj_label": ["A"]}, "bad-rec": {"sentences": ["s1", "s2"], "obj_label": ["A", label]}}
    p = _write(tmp_path / "a.json", json.dumps(data))
    with pytest.raises(DataError, match=re.escape(f"{p} (record 'bad-rec')") + ".*unknown answer letter"):
        load_authors_json(p)


def test_authors_json_invalid_json(tmp_path):
    p = _write(tmp_path / "a.json", '{\n  "q1": {"sentences": ["x"], "obj_label": ["A"]},,\n}\n')
    with pytest.raises(DataError, match=re.escape(f"{p}:2") + ": not valid JSON"):
        load_authors_json(p)
    with pytest.raises(DataError, match="not valid JSON"):
        load_data(p)


def test_authors_json_structure_errors(tmp_path):
    p = _write(tmp_path / "list.json", json.dumps([1, 2]))
    with pytest.raises(DataError, match="expected a JSON object mapping ids to records, got list"):
        load_authors_json(p)
    p = _write(tmp_path / "miss.json", json.dumps({"r1": {"sentences": ["x"]}}))
    with pytest.raises(DataError, match=r"\(record 'r1'\): missing field\(s\) \['obj_label'\]"):
        load_authors_json(p)
    p = _write(tmp_path / "len.json", json.dumps({"r1": {"sentences": ["x", "y"], "obj_label": ["A"]}}))
    with pytest.raises(DataError, match=r"\(record 'r1'\): 'sentences' and 'obj_label' must be lists of equal length"):
        load_authors_json(p)
    p = _write(tmp_path / "nosent.json", json.dumps({"r1": {"sentences": [], "obj_label": []}}))
    with pytest.raises(DataError, match=r"\(record 'r1'\).*'sentences' is empty"):
        load_authors_json(p)
    p = _write(tmp_path / "empty.json", "  \n")
    with pytest.raises(DataError, match="empty"):
        load_authors_json(p)


# ---------------------------------------------------------------- errors with file and line


def test_jsonl_missing_field(tmp_path):
    p = _write(tmp_path / "m.jsonl",
               '{"id": "a", "group": "g", "question": "q?", "answer": "x"}\n'
               '\n'
               '{"id": "b", "group": "g", "question": "r?"}\n')
    with pytest.raises(DataError, match=re.escape(f"{p}:3") + r": missing field\(s\) \['answer'\]"):
        load_data(p)


def test_jsonl_empty_string_counts_as_missing(tmp_path):
    p = _jsonl(tmp_path / "m.jsonl", [{"id": "a", "group": "", "question": "q?", "answer": "x"}])
    with pytest.raises(DataError, match=re.escape(f"{p}:1") + r": missing field\(s\) \['group'\]"):
        load_jsonl(p)


def test_jsonl_invalid_json_line(tmp_path):
    p = _write(tmp_path / "m.jsonl",
               '{"id": "a", "group": "g", "question": "q?", "answer": "x"}\n'
               '{"id": "b", "group": "g", "question": "r?", "answer": \n')
    with pytest.raises(DataError, match=re.escape(f"{p}:2") + ": not valid JSON"):
        load_data(p)


def test_jsonl_non_object_line(tmp_path):
    p = _write(tmp_path / "m.jsonl", '["id", "a"]\n')
    with pytest.raises(DataError, match=re.escape(f"{p}:1") + ": expected a JSON object, got list"):
        load_jsonl(p)


def test_jsonl_bad_options_type(tmp_path):
    p = _jsonl(tmp_path / "m.jsonl", [{"id": "a", "group": "g", "question": "q?", "answer": "x", "options": "x,y"}])
    with pytest.raises(DataError, match=re.escape(f"{p}:1") + ": 'options' must be a list of strings"):
        load_jsonl(p)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_jsonl_empty_file(tmp_path, text):
    p = _write(tmp_path / "e.jsonl", text)
    with pytest.raises(DataError, match=re.escape(str(p)) + ".*empty"):
        load_data(p)


def test_jsonl_duplicate_ids(tmp_path):
    rows = [{"id": "dup", "group": "g", "question": "q?", "answer": "x"},
            {"id": "ok", "group": "g", "question": "r?", "answer": "y"},
            {"id": "dup", "group": "h", "question": "s?", "answer": "z"}]
    p = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=re.escape(str(p)) + r": query ids repeat: \['dup'\]"):
        load_data(p)


def test_jsonl_answer_not_among_options(tmp_path):
    rows = [{"id": "a", "group": "g", "question": "q?", "answer": "x", "options": ["x", "y"]},
            {"id": "b", "group": "g", "question": "r?", "answer": "z", "options": ["x", "y"]}]
    p = _jsonl(tmp_path / "o.jsonl", rows)
    with pytest.raises(DataError, match=re.escape(f"{p}:2") + ".*the answer 'z' is not among the options"):
        load_data(p)


def test_nonexistent_path(tmp_path):
    p = tmp_path / "missing.jsonl"
    with pytest.raises(DataError, match=re.escape(str(p)) + ": no such file"):
        load_data(p)
    with pytest.raises(DataError, match="no such file"):
        load_data(str(p))


@pytest.mark.parametrize("name", ["queries.txt", "queries.tsv", "queries"])
def test_unknown_extension(tmp_path, name):
    p = _write(tmp_path / name, '{"id": "a", "group": "g", "question": "q?", "answer": "x"}\n')
    with pytest.raises(DataError, match=re.escape(str(p)) + ": unknown format"):
        load_data(p)




def test_dispatch_csv_and_json(tmp_path):
    csv_p = _write(tmp_path / "astronomy_test.csv", "Nearest star?,Sun,Sirius,Vega,Rigel,A\n")
    (c,) = load_data(csv_p)
    assert (c.group, c.answer, c.prompts) == ("astronomy", "Sun", None)

    json_p = _write(tmp_path / "pre.json", json.dumps({"x": {"sentences": ["P Answer: "], "obj_label": ["C"]}}))
    (j,) = load_data(json_p)
    assert (j.id, j.prompts, j.prompt_letters) == ("x", ("P Answer: ",), ("C",))
