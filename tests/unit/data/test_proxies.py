"""Tests for qrnca_lens.data.prompts: prompt texts, target tokens, distractors, examples, configs and their errors."""

from __future__ import annotations

import json
import random
import string

import pytest

from qrnca_lens.data.queries import Query, groups_of, load_data
from qrnca_lens.errors import ProxyError
from qrnca_lens.data.prompts import (
    TEMPLATES,
    Prompt,
    ProxyConfig,
    Template,
    build_all_prompts,
    build_prompts,
    cloze_chance,
    encode,
    tokenizer_identity,
)

LETTERS = "ABCD"


@pytest.fixture(scope="module")
def facts() -> list[Query]:
    return load_data("builtin:facts")


@pytest.fixture(scope="module")
def domains() -> list[Query]:
    return load_data("builtin:domains")


def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _space_letter_id(tok, letter: str) -> int:
    (tid,) = _ids(tok, " " + letter)
    return tid


def _cue(t: Template) -> str:
    """The template's answer cue: the text of ``item`` after its last field."""
    return t.item.rsplit("}", 1)[1]


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def _filled(q: Query) -> str:
    """A fact with its answer, computed by hand for the built-in shapes ('... [Y] .' or a bare prefix)."""
    if q.question.endswith(" [Y] ."):
        return q.question[: -len(" [Y] .")] + f" {q.answer}."
    assert "[Y]" not in q.question
    return f"{q.question} {q.answer}."


def _by_id(qs, qid):
    return next(q for q in qs if q.id == qid)


# ---------------------------------------------------------------- mcqa-letter


def test_letter_tokens_of_tiny_tokenizer(tiny_tokenizer):
    # the premise of the fixture: " A".." D" are single tokens that decode back
    for letter in LETTERS:
        ids = _ids(tiny_tokenizer, " " + letter)
        assert len(ids) == 1
        assert tiny_tokenizer.decode(ids) == " " + letter


@pytest.mark.parametrize("prepend_bos", [False, True])
def test_mcqa_letter_prompts_zero_shot_exact_text(domains, tiny_tokenizer, prepend_bos):
    cfg = ProxyConfig("mcqa-letter", n_shots=0)
    for qs in groups_of(domains).values():
        q = qs[0]
        prompts = build_prompts(q, cfg, tiny_tokenizer, pool=domains, prepend_bos=prepend_bos)
        assert len(prompts) == cfg.n_prompts == 3
        assert [p.template for p in prompts] == [0, 1, 2]
        for p in prompts:
            t = TEMPLATES["mcqa-letter"][p.template]
            opts = p.meta["options"]
            assert sorted(opts) == sorted(q.options)
            assert opts[p.correct] == q.answer
            rendered = t.option_sep.join(t.option_format.format(letter=LETTERS[i], text=o) for i, o in enumerate(opts))
            assert p.text == t.instruction + t.item.format(question=q.question, options=rendered)
            assert p.text.endswith(_cue(t))
            assert (p.query_id, p.group) == (q.id, q.group)
            # option tokens: the four space-letters, one token each
            assert p.options == tuple((_space_letter_id(tiny_tokenizer, L),) for L in LETTERS)
            assert all(len(o) == 1 for o in p.options)
            assert p.target == p.options[p.correct]
            assert tiny_tokenizer.decode(list(p.target)) == " " + LETTERS[p.correct]
            assert list(p.tokens) == encode(tiny_tokenizer, p.text, prepend_bos=prepend_bos)
            assert p.target_position == len(p.tokens) - 1
            assert p.meta["prepend_bos"] is prepend_bos
            if prepend_bos:
                assert p.tokens[0] == tiny_tokenizer.bos_token_id
                assert list(p.tokens[1:]) == _ids(tiny_tokenizer, p.text)
            else:
                assert p.tokens[0] != tiny_tokenizer.bos_token_id
                assert list(p.tokens) == _ids(tiny_tokenizer, p.text)


def test_mcqa_letter_the_model_would_emit_the_target(domains, tiny_tokenizer):
    # the prompt ends right before the letter: prompt + " X" tokenises to prompt tokens + the target
    cfg = ProxyConfig("mcqa-letter")
    for p in build_all_prompts(domains[:6], cfg, tiny_tokenizer, pool=domains)["biology-01"]:
        full = encode(tiny_tokenizer, p.text + " " + LETTERS[p.correct], prepend_bos=False)
        assert full == list(p.tokens) + list(p.target)
        assert not p.text.endswith(" ")


def test_mcqa_letter_default_shots_end_with_cue(domains, tiny_tokenizer):
    cfg = ProxyConfig("mcqa-letter")
    assert cfg.shots == 3
    prompts = build_prompts(domains[0], cfg, tiny_tokenizer, pool=domains)
    for p in prompts:
        t = TEMPLATES["mcqa-letter"][p.template]
        assert p.text.startswith(t.instruction)
        assert p.text.endswith(_cue(t))
        assert p.text.count(domains[0].question) == 1


def test_cfg_prepend_bos_overrides_argument(domains, tiny_tokenizer):
    q = domains[0]
    on = build_prompts(q, ProxyConfig("mcqa-letter", n_shots=0, prepend_bos=True), tiny_tokenizer, pool=domains,
                       prepend_bos=False)
    off = build_prompts(q, ProxyConfig("mcqa-letter", n_shots=0, prepend_bos=False), tiny_tokenizer, pool=domains,
                        prepend_bos=True)
    bos = tiny_tokenizer.bos_token_id
    assert all(p.tokens[0] == bos and p.meta["prepend_bos"] is True for p in on)
    assert all(bos not in p.tokens and p.meta["prepend_bos"] is False for p in off)
    for a, b in zip(on, off):
        assert a.text == b.text
        assert a.tokens == (bos,) + b.tokens
        assert a.target == b.target


def test_n_prompts_cycles_templates(domains, tiny_tokenizer):
    cfg = ProxyConfig("mcqa-letter", n_prompts=5, n_shots=0)
    prompts = build_prompts(domains[0], cfg, tiny_tokenizer, pool=domains)
    assert len(prompts) == 5
    temps = TEMPLATES["mcqa-letter"]
    for j, p in enumerate(prompts):
        t = temps[j % 3]
        assert p.text.startswith(t.instruction + t.item.split("{", 1)[0])
        assert p.text.endswith(_cue(t))


# ---------------------------------------------------------------- distractors and determinism


def test_fact_distractors_come_from_same_group(facts, tiny_tokenizer):
    cfg = ProxyConfig("mcqa-letter", n_shots=0)
    answers_by_group = {g: {q.answer for q in qs} for g, qs in groups_of(facts).items()}
    built = build_all_prompts(facts, cfg, tiny_tokenizer)
    assert list(built) == [q.id for q in facts]
    for q in facts:
        for p in built[q.id]:
            opts = p.meta["options"]
            assert len(opts) == 4
            assert len({_norm(o) for o in opts}) == 4  # distinct, even up to case and spaces
            assert opts[p.correct] == q.answer
            assert opts.count(q.answer) == 1
            for i, o in enumerate(opts):
                assert o in answers_by_group[q.group]
                if i != p.correct:
                    assert _norm(o) != _norm(q.answer)


def test_repeated_answers_never_become_distractors(facts, tiny_tokenizer):
    # continent has only 5 distinct answers for 20 queries: distractors must still be distinct and != answer
    cont = [q for q in facts if q.group == "continent"]
    cfg = ProxyConfig("mcqa-letter", n_shots=0)
    for q in cont:
        for p in build_prompts(q, cfg, tiny_tokenizer, pool=facts):
            assert set(p.meta["options"]) <= {"Europe", "Asia", "Africa", "South America", "North America"}
            assert len(set(p.meta["options"])) == 4
            assert p.meta["options"][p.correct] == q.answer


def test_prompts_are_deterministic_and_seeded(facts, tiny_tokenizer):
    cfg = ProxyConfig("mcqa-letter", seed=0)
    qs = facts[:20]
    a = build_all_prompts(qs, cfg, tiny_tokenizer, pool=facts)
    random.seed(12345)  # the global RNG must not matter
    b = build_all_prompts(qs, cfg, tiny_tokenizer, pool=facts)
    assert a == b
    assert [p.meta for v in a.values() for p in v] == [p.meta for v in b.values() for p in v]
    c = build_all_prompts(qs, cfg.with_(seed=1), tiny_tokenizer, pool=facts)
    texts_a = [p.text for v in a.values() for p in v]
    texts_c = [p.text for v in c.values() for p in v]
    assert texts_a != texts_c
    opts_a = [tuple(p.meta["options"]) for v in a.values() for p in v]
    opts_c = [tuple(p.meta["options"]) for v in c.values() for p in v]
    assert opts_a != opts_c


def test_building_prompts_uses_no_global_random_function(facts, domains, tiny_tokenizer, monkeypatch):
    # any draw through the module-level functions (the global RNG) fails the test
    def forbidden(*args, **kwargs):
        raise AssertionError("proxies drew from the global random module")

    for name in ("random", "shuffle", "sample", "choice", "choices", "randint", "randrange", "seed", "setstate"):
        monkeypatch.setattr(random, name, forbidden)
    for kind in ("mcqa-letter", "mcqa-text", "cloze"):
        built = build_all_prompts(facts[:10], ProxyConfig(kind), tiny_tokenizer, pool=facts)
        assert len(built) == 10
        build_all_prompts(domains[:5], ProxyConfig(kind, n_shots=2), tiny_tokenizer, pool=domains)


_STATE_SCRIPT = """
import random, sys
from transformers import AutoTokenizer
from qrnca_lens.data import load_data
from qrnca_lens.data.prompts import ProxyConfig, build_all_prompts
tok = AutoTokenizer.from_pretrained(sys.argv[1])
facts, domains = load_data("builtin:facts"), load_data("builtin:domains")
random.seed(123)
before = random.getstate()
n = 0
for kind in ("mcqa-letter", "mcqa-text", "cloze"):
    n += len(build_all_prompts(facts[:10], ProxyConfig(kind), tok, pool=facts))
    n += len(build_all_prompts(domains[:5], ProxyConfig(kind, n_shots=2), tok, pool=domains))
print(n, random.getstate() == before)
"""


def test_building_prompts_leaves_global_random_state_unchanged(tiny_tokenizer):
    # In-process, beartype's runtime checks (the pytest import hook) sample containers with the global
    # random.getrandbits, so random.getstate() is compared in a plain interpreter without the hook.
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]  # the repository: tests/unit/data/this file
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", _STATE_SCRIPT, tiny_tokenizer.name_or_path], cwd=root,
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["45", "True"]


def test_too_few_distractors_names_the_group(tiny_tokenizer):
    pool = [
        Query("t1", "tiny", "The first thing is", "Red"),
        Query("t2", "tiny", "The second thing is", "Blue"),
        Query("t3", "tiny", "The third thing is", "red"),
        Query("o1", "other", "Another is", "Green"),
        Query("o2", "other", "Yet another is", "Pink"),
    ]
    with pytest.raises(ProxyError, match=r"group 'tiny' has only 1 answers other than 'Red', not enough for 3"):
        build_prompts(pool[0], ProxyConfig("mcqa-letter", n_shots=0), tiny_tokenizer, pool=pool)
    # with n_options=2 the single distinct other answer is enough
    (p,) = build_prompts(pool[0], ProxyConfig("mcqa-letter", n_shots=0, n_options=2, n_prompts=1), tiny_tokenizer,
                         pool=pool)
    assert sorted(p.meta["options"]) == ["Blue", "Red"]
    assert len(p.options) == 2


# ---------------------------------------------------------------- in-context examples


@pytest.mark.parametrize("k", [1, 3])
def test_mcqa_letter_examples_are_filled_in_from_same_group(domains, tiny_tokenizer, k):
    cfg = ProxyConfig("mcqa-letter", n_shots=k, n_prompts=1)  # template 0
    by_question = {q.question: q for q in domains}
    for qs in groups_of(domains).values():
        for q in qs[:3]:
            (p,) = build_prompts(q, cfg, tiny_tokenizer, pool=domains)
            blocks = p.text.split("\n\n")
            assert blocks[0] == TEMPLATES["mcqa-letter"][0].instruction.rstrip("\n")
            examples, last = blocks[1:-1], blocks[-1]
            assert len(examples) == k
            assert last.startswith(f"Question: {q.question}\n")
            seen = set()
            for block in examples:
                lines = block.split("\n")
                assert len(lines) == 6
                ex = by_question[lines[0].removeprefix("Question: ")]
                assert ex.group == q.group and ex.id != q.id
                assert _norm(ex.answer) != _norm(q.answer)
                opts = []
                for i, line in enumerate(lines[1:5]):
                    assert line.startswith(f"{LETTERS[i]}. ")
                    opts.append(line[3:])
                assert sorted(opts) == sorted(ex.options)
                assert lines[5].startswith("Answer: ")
                letter = lines[5].removeprefix("Answer: ")
                assert opts[LETTERS.index(letter)] == ex.answer  # the example is answered correctly
                seen.add(ex.id)
            assert len(seen) == k


def test_cloze_examples_are_filled_facts_from_same_group(facts, tiny_tokenizer):
    cfg = ProxyConfig("cloze", n_prompts=1)  # template 0: facts joined by "\n", no instruction
    assert cfg.shots == 4
    filled = {_filled(q): q for q in facts}
    for q in facts:
        (p,) = build_prompts(q, cfg, tiny_tokenizer, pool=facts)
        lines = p.text.split("\n")
        assert len(lines) == 5
        prefix = q.question[: -len(" [Y] .")] if q.has_slot else q.question
        assert lines[-1] == prefix
        ids = []
        for line in lines[:-1]:
            ex = filled[line]  # KeyError if an example is not a correctly filled-in fact
            assert ex.group == q.group and ex.id != q.id and _norm(ex.answer) != _norm(q.answer)
            ids.append(ex.id)
        assert len(set(ids)) == 4


def test_examples_never_include_query_or_same_answer(tiny_tokenizer):
    q = Query("q", "g", "The alpha city is", "Paris")
    pool = [
        q,
        Query("dup1", "g", "The beta city is", "paris"),
        Query("dup2", "g", "The gamma city is", "  PARIS "),
        Query("o1", "g", "The delta city is", "Rome"),
        Query("o2", "g", "The epsilon city is", "Oslo"),
        Query("o3", "g", "The zeta city is", "Lima"),
        Query("x1", "h", "The eta city is", "Bern"),
    ]
    for seed in range(8):
        for kind in ("cloze", "mcqa-text"):
            cfg = ProxyConfig(kind, n_shots=3, n_prompts=3, seed=seed)
            for p in build_prompts(q, cfg, tiny_tokenizer, pool=pool):
                assert "beta" not in p.text and "gamma" not in p.text
                assert "The eta city" not in p.text  # other group
                assert p.text.count("The alpha city is") == 1
                for other in ("delta", "epsilon", "zeta"):  # exactly the 3 usable examples
                    assert f"The {other} city is" in p.text
    with pytest.raises(ProxyError, match=r"query 'q': group 'g' has 3 usable in-context examples, fewer than n_shots=4"):
        build_prompts(q, ProxyConfig("cloze", n_shots=4), tiny_tokenizer, pool=pool)


def test_too_few_examples_without_pool(tiny_tokenizer):
    q = Query("solo", "g", "The lone city is", "Paris")
    with pytest.raises(ProxyError, match="n_shots=1"):
        build_prompts(q, ProxyConfig("cloze", n_shots=1), tiny_tokenizer)
    (p,) = build_prompts(q, ProxyConfig("cloze", n_shots=0, n_prompts=1), tiny_tokenizer)
    assert p.text == "The lone city is"


# ---------------------------------------------------------------- cloze


def test_cloze_target_is_answer_tokens(facts, tiny_tokenizer):
    built = build_all_prompts(facts, ProxyConfig("cloze"), tiny_tokenizer)
    multi = 0
    for q in facts:
        expected = tuple(_ids(tiny_tokenizer, " " + q.answer))
        for p in built[q.id]:
            assert p.target == expected
            assert p.options is None and p.correct is None
            assert list(p.tokens) + list(p.target) == _ids(tiny_tokenizer, p.text + " " + q.answer)
        multi += len(expected) > 1
    assert multi > 0  # multi-token answers are kept whole


def test_cloze_chance_is_the_share_of_other_answers_starting_with_the_target_token(facts, tiny_tokenizer):
    """Oracle: tokenise prompt text + each other answer of the group in one piece and read the token after the
    prompt; count those equal to the target's first token."""
    from dataclasses import replace

    group = groups_of(facts)["continent"]  # continents repeat: guessing is often right
    for q in group[:3]:
        p = build_prompts(q, ProxyConfig("cloze", n_prompts=1), tiny_tokenizer, pool=facts)[0]
        others = [o for o in group if o.id != q.id]
        firsts = [_ids(tiny_tokenizer, p.text + o.answer_sep + o.answer)[len(p.tokens)] for o in others]
        want = sum(f == p.target[0] for f in firsts) / len(others)
        assert cloze_chance(p, others, tiny_tokenizer, bos=False) == pytest.approx(want)
        assert 0 < want < 1  # both kinds of other answer occur in this group
    q = group[0]
    p = build_prompts(q, ProxyConfig("cloze", n_prompts=1), tiny_tokenizer, pool=facts)[0]
    assert cloze_chance(p, [replace(q, id="twin")], tiny_tokenizer, bos=False) == 1.0  # the same answer
    assert cloze_chance(p, [], tiny_tokenizer, bos=False) is None


def test_cloze_slot_query_prompt_ends_before_slot(facts, tiny_tokenizer):
    q = _by_id(facts, "capital-04")
    assert q.question == "The capital of Italy is [Y] ."
    for p in build_prompts(q, ProxyConfig("cloze"), tiny_tokenizer, pool=facts):
        assert p.text.endswith("The capital of Italy is")
        assert "[Y]" not in p.text
        assert p.target == tuple(_ids(tiny_tokenizer, " Rome"))
    # zero-shot, template by template
    texts = [p.text for p in build_prompts(q, ProxyConfig("cloze", n_shots=0), tiny_tokenizer, pool=facts)]
    assert texts == [
        "The capital of Italy is",
        "Complete each sentence with the correct word.\n\nThe capital of Italy is",
        "Facts:\n- The capital of Italy is",
    ]


def test_cloze_slot_example_is_rendered_filled_in(facts, tiny_tokenizer):
    q = _by_id(facts, "capital-01")
    pool = [q, _by_id(facts, "capital-04")]
    prompts = build_prompts(q, ProxyConfig("cloze", n_shots=1), tiny_tokenizer, pool=pool)
    assert [p.text for p in prompts] == [
        "The capital of Italy is Rome.\nThe capital city of France is",
        "Complete each sentence with the correct word.\n\nThe capital of Italy is Rome.\nThe capital city of France is",
        "Facts:\n- The capital of Italy is Rome.\n- The capital city of France is",
    ]
    # a plain prefix fact as an example: "<question> <answer>."
    prompts = build_prompts(pool[1], ProxyConfig("cloze", n_shots=1, n_prompts=1), tiny_tokenizer, pool=pool)
    assert prompts[0].text == "The capital city of France is Paris.\nThe capital of Italy is"


def test_cloze_slot_at_start_is_an_error(tiny_tokenizer):
    q = Query("s", "g", "[Y] is the capital of Italy .", "Rome")
    with pytest.raises(ProxyError, match=r"query 's': the answer slot \[Y\] starts the sentence"):
        build_prompts(q, ProxyConfig("cloze", n_shots=0), tiny_tokenizer)
    q2 = Query("s2", "g", "   [Y] is the capital of Italy .", "Rome")
    with pytest.raises(ProxyError, match="starts the sentence"):
        build_prompts(q2, ProxyConfig("cloze", n_shots=0), tiny_tokenizer)


def test_cloze_glued_slot_takes_no_space(tiny_tokenizer):
    """Chinese writes no spaces: a [Y] glued to the text before it joins the answer (and its distractors)
    without one, in the examples and in the target alike."""
    pool = [Query("c1", "g", "法国的首都是[Y]。", "巴黎"), Query("c2", "g", "德国的首都是[Y]。", "柏林"),
            Query("c3", "g", "日本的首都是[Y]。", "东京"), Query("c4", "g", "英国的首都是[Y]。", "伦敦")]
    prompts = build_prompts(pool[0], ProxyConfig("cloze", n_shots=1), tiny_tokenizer, pool=pool)
    for p in prompts:
        (ex,) = p.examples
        ex_q = _by_id(pool, ex)
        filled = ex_q.question.replace("[Y]", ex_q.answer)
        t = TEMPLATES["cloze"][p.template]
        assert p.text == t.instruction + t.item.format(fact=filled) + t.example_sep + t.item.format(fact="法国的首都是")
        assert p.target == tuple(_ids(tiny_tokenizer, p.text + "巴黎")[len(p.tokens):])
        assert tiny_tokenizer.decode(list(p.target)) == "巴黎"
        others = sorted(tiny_tokenizer.decode(list(d)) for d in p.distractors)
        assert others == sorted(q.answer for q in pool[1:])


# ---------------------------------------------------------------- mcqa-text


def test_mcqa_text_targets_and_options_shown(domains, tiny_tokenizer):
    q = domains[0]  # Heart among Liver/Heart/Lungs/Kidney
    prompts = build_prompts(q, ProxyConfig("mcqa-text"), tiny_tokenizer, pool=domains)
    assert ProxyConfig("mcqa-text").shots == 0
    t0 = TEMPLATES["mcqa-text"][0]
    for p in prompts:
        opts = p.meta["options"]
        assert sorted(opts) == sorted(q.options) and opts[p.correct] == q.answer
        assert p.options == tuple(tuple(_ids(tiny_tokenizer, " " + o)) for o in opts)
        assert p.target == p.options[p.correct] == tuple(_ids(tiny_tokenizer, " Heart"))
        assert len(p.target) > 1  # multi-token target allowed
        assert tiny_tokenizer.decode(list(p.target)) == " Heart"
        for o in q.options:
            assert o in p.text
    assert prompts[0].text == (t0.instruction + f"Question: {q.question}\n"
                               + "".join(f"- {o}\n" for o in prompts[0].meta["options"]) + "Answer:")


def test_mcqa_text_without_options(domains, tiny_tokenizer):
    q = domains[0]
    prompts = build_prompts(q, ProxyConfig("mcqa-text", show_options=False), tiny_tokenizer, pool=domains)
    assert [p.text for p in prompts] == [
        f"Answer each question.\n\nQuestion: {q.question}\nAnswer:",
        f"Q: {q.question}\nA:",
        f"Short answers only.\n\n{q.question}\nThe answer is",
    ]
    for p in prompts:
        for o in q.options:
            assert o not in p.text
        assert p.target == tuple(_ids(tiny_tokenizer, " Heart"))


def test_mcqa_text_examples_are_answered_with_text(domains, tiny_tokenizer):
    q = domains[0]
    (p,) = build_prompts(q, ProxyConfig("mcqa-text", n_shots=1, n_prompts=1, show_options=False), tiny_tokenizer,
                         pool=domains)
    blocks = p.text.split("\n\n")
    assert len(blocks) == 3
    lines = blocks[1].split("\n")
    ex = next(e for e in domains if e.question == lines[0].removeprefix("Question: "))
    assert ex.group == q.group and ex.id != q.id
    assert lines[1] == f"Answer: {ex.answer}"




def test_multi_token_space_letter_is_an_error(domains, tiny_tokenizer):
    multi = [L for L in string.ascii_uppercase if len(_ids(tiny_tokenizer, " " + L)) > 1]
    if not multi:
        pytest.skip("every ' X' letter is a single token for this tokenizer")
    cfg = ProxyConfig("mcqa-letter", letters=multi[0] + "ABCDEFGHI", n_shots=0)
    with pytest.raises(ProxyError, match=rf"the option letter ' {multi[0]}' is 2 tokens.*single token"):
        build_prompts(domains[0], cfg, tiny_tokenizer, pool=domains)


def test_bare_letter_not_in_vocabulary_is_an_error(domains, tiny_tokenizer):
    odd = "\u03a9"  # Omega: two UTF-8 bytes, outside the byte-level alphabet, so no token by itself
    if tiny_tokenizer.convert_tokens_to_ids(odd) not in (None, tiny_tokenizer.unk_token_id):
        pytest.skip("this tokenizer has the letter as a token")
    cfg = ProxyConfig("mcqa-letter", letters=odd + "ABC", letter_style="bare", n_shots=0)
    with pytest.raises(ProxyError, match="is not a token of this vocabulary"):
        build_prompts(domains[0], cfg, tiny_tokenizer, pool=domains)


# ---------------------------------------------------------------- pre-built (authors') prompts


PREBUILT = Query(
    "pb", "math", "Question: 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: ", "B",
    prompts=("Question: 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: ", "Q: 1+5? A) 3 B) 4 C) 5 D) 6\nA:"),
    prompt_letters=("B", "D"),
)


@pytest.mark.parametrize("prepend_bos", [False, True])
def test_prebuilt_prompts_used_verbatim_space_style(tiny_tokenizer, prepend_bos):
    prompts = build_prompts(PREBUILT, ProxyConfig("mcqa-letter"), tiny_tokenizer, prepend_bos=prepend_bos)
    assert [p.text for p in prompts] == ["Question: 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:",  # trailing space folded
                                         "Q: 1+5? A) 3 B) 4 C) 5 D) 6\nA:"]
    assert [p.correct for p in prompts] == [1, 3]
    assert [p.target for p in prompts] == [(_space_letter_id(tiny_tokenizer, "B"),),
                                           (_space_letter_id(tiny_tokenizer, "D"),)]
    for p in prompts:
        assert p.options == tuple((_space_letter_id(tiny_tokenizer, L),) for L in LETTERS)
        assert list(p.tokens) == encode(tiny_tokenizer, p.text, prepend_bos=prepend_bos)
        assert p.meta["prebuilt"] is True and p.meta["prepend_bos"] is prepend_bos
        assert (p.query_id, p.group) == ("pb", "math")


def test_prebuilt_prompts_bare_style_keep_trailing_space(tiny_tokenizer):
    prompts = build_prompts(PREBUILT, ProxyConfig("mcqa-letter", letter_style="bare"), tiny_tokenizer)
    assert [p.text for p in prompts] == list(PREBUILT.prompts)
    assert prompts[0].text.endswith("Answer: ")
    assert [p.target for p in prompts] == [(tiny_tokenizer.convert_tokens_to_ids("B"),),
                                           (tiny_tokenizer.convert_tokens_to_ids("D"),)]


def test_prebuilt_from_authors_json(tmp_path, tiny_tokenizer):
    path = tmp_path / "authors.json"
    path.write_text(json.dumps({"r1": {"sentences": ["Pick one.\nA. x\nB. y\nC. z\nD. w\nAnswer: "],
                                       "obj_label": "C", "relation_name": "rel"}}))
    (q,) = load_data(path)
    (p,) = build_all_prompts([q], ProxyConfig("mcqa-letter"), tiny_tokenizer)["r1"]
    assert p.text == "Pick one.\nA. x\nB. y\nC. z\nD. w\nAnswer:"
    assert p.target == (_space_letter_id(tiny_tokenizer, "C"),) and p.correct == 2


@pytest.mark.parametrize("kind", ["mcqa-text", "cloze"])
def test_prebuilt_with_other_proxy_is_an_error(tiny_tokenizer, kind):
    with pytest.raises(ProxyError, match="query 'pb' holds pre-built letter prompts; use the 'mcqa-letter' proxy"):
        build_prompts(PREBUILT, ProxyConfig(kind), tiny_tokenizer)


def test_prebuilt_letter_beyond_n_options_is_an_error(tiny_tokenizer):
    q = Query("pe", "g", "P Answer:", "E", prompts=("P Answer:",), prompt_letters=("E",))
    with pytest.raises(ProxyError, match="answer letter 'E' is not among 'ABCD'"):
        build_prompts(q, ProxyConfig("mcqa-letter"), tiny_tokenizer)
    (p,) = build_prompts(q, ProxyConfig("mcqa-letter", n_options=5), tiny_tokenizer)
    assert p.correct == 4 and p.target == (_space_letter_id(tiny_tokenizer, "E"),)


    with pytest.raises(ProxyError):
        build_prompts(q, ProxyConfig("mcqa-letter"), tiny_tokenizer)


# ---------------------------------------------------------------- custom templates


def test_custom_template_used_for_all_prompts(domains, tiny_tokenizer):
    t = Template("Answer these.\n", "Q) {question}\n{options}\nAns:", option_format="[{letter}] {text}", option_sep="; ")
    cfg = ProxyConfig("mcqa-letter", templates=(t,), n_shots=0)
    q = domains[0]
    prompts = build_prompts(q, cfg, tiny_tokenizer, pool=domains)
    assert len(prompts) == 3
    for p in prompts:
        opts = p.meta["options"]
        rendered = "; ".join(f"[{LETTERS[i]}] {o}" for i, o in enumerate(opts))
        assert p.text == f"Answer these.\nQ) {q.question}\n{rendered}\nAns:"
        assert p.target == (_space_letter_id(tiny_tokenizer, LETTERS[p.correct]),)


def test_custom_cloze_template_with_examples(facts, tiny_tokenizer):
    t = Template("", "Fact: {fact}", example_sep=" | ")
    q, ex = _by_id(facts, "capital-01"), _by_id(facts, "capital-04")
    prompts = build_prompts(q, ProxyConfig("cloze", templates=(t,), n_shots=1, n_prompts=2), tiny_tokenizer, pool=[q, ex])
    assert [p.text for p in prompts] == ["Fact: The capital of Italy is Rome. | Fact: The capital city of France is"] * 2
    assert all(p.target == tuple(_ids(tiny_tokenizer, " Paris")) for p in prompts)


# ---------------------------------------------------------------- ProxyConfig


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kind": "mcq"}, "unknown proxy 'mcq'"),
        ({"n_prompts": 0}, r"n_prompts \(\|Q\|\) must be at least 1, got 0"),
        ({"letter_style": "paren"}, "letter_style must be 'space' or 'bare', got 'paren'"),
        ({"n_shots": -1}, "n_shots must be >= 0, got -1"),
        ({"n_options": 1}, "n_options must be between 2 and 10, got 1"),
        ({"n_options": 5, "letters": "ABCD"}, "n_options must be between 2 and 4, got 5"),
        ({"templates": ()}, "at least one Template"),
    ],
)
def test_proxy_config_validation(kwargs, match):
    with pytest.raises(ProxyError, match=match):
        ProxyConfig(**kwargs)


def test_proxy_config_defaults():
    cfg = ProxyConfig()
    assert (cfg.kind, cfg.n_prompts, cfg.n_options, cfg.letter_style, cfg.seed) == ("mcqa-letter", 3, 4, "space", 0)
    assert [ProxyConfig(k).shots for k in ("mcqa-letter", "mcqa-text", "cloze")] == [3, 0, 4]
    assert ProxyConfig("cloze", n_shots=0).shots == 0
    assert ProxyConfig("cloze").template_list() == TEMPLATES["cloze"]


def test_proxy_config_round_trip():
    custom = (Template("Go.\n", "{question}\n{options}\nAns:", option_format="<{letter}> {text}", option_sep=" ",
                       example_sep="\n---\n"),
              Template("", "{fact}"))
    for cfg in (ProxyConfig(),
                ProxyConfig("cloze", n_prompts=2, n_shots=1, prepend_bos=True, seed=7),
                ProxyConfig("mcqa-text", show_options=False, letter_style="bare", letters="WXYZ", templates=custom)):
        d = cfg.to_dict()
        d2 = json.loads(json.dumps(d))
        back = ProxyConfig.from_dict(d2)
        assert back == cfg
        assert back.to_dict() == d
    d = ProxyConfig(templates=custom).to_dict()
    assert d["templates"][0] == {"instruction": "Go.\n", "item": "{question}\n{options}\nAns:",
                                 "option_format": "<{letter}> {text}", "options_end": "", "option_sep": " ", "example_sep": "\n---\n"}
    assert ProxyConfig.from_dict(d).templates == custom
    assert ProxyConfig().to_dict()["templates"] is None


def test_with_changes_one_field():
    cfg = ProxyConfig("cloze", seed=1)
    assert cfg.with_(seed=2) == ProxyConfig("cloze", seed=2)
    with pytest.raises(ProxyError):
        cfg.with_(n_prompts=0)


def test_encode(tiny_tokenizer):
    assert encode(tiny_tokenizer, " A", prepend_bos=False) == [_space_letter_id(tiny_tokenizer, "A")]
    assert encode(tiny_tokenizer, " A", prepend_bos=True) == [tiny_tokenizer.bos_token_id,
                                                              _space_letter_id(tiny_tokenizer, "A")]


def test_mcqa_text_template1_cue_on_its_own_line(domains, tiny_tokenizer):
    q = next(q for q in domains if q.id == "biology-01")
    for show in (True, False):
        prompts = build_prompts(q, ProxyConfig("mcqa-text", n_prompts=2, n_shots=0, show_options=show), tiny_tokenizer)
        text = prompts[1].text
        assert text.endswith("\nA:"), text
        assert ("\n\nA:" in text) is False
        assert all(o in text for o in q.options) is show


@pytest.mark.parametrize("letter", ["BC", ""])
def test_prebuilt_non_single_letter_is_an_error(tiny_tokenizer, letter):
    q = Query("pz", "g", "P Answer:", "B", prompts=("P Answer:",), prompt_letters=(letter,))
    with pytest.raises(ProxyError, match="answer letter"):
        build_prompts(q, ProxyConfig("mcqa-letter"), tiny_tokenizer)


def test_slot_facts_show_a_blank_in_mcqa_stems(facts, tiny_tokenizer):
    q = next(q for q in facts if q.has_slot)
    for kind in ("mcqa-letter", "mcqa-text"):
        for pr in build_prompts(q, ProxyConfig(kind, n_shots=2), tiny_tokenizer, pool=facts):
            assert "[Y]" not in pr.text and "___" in pr.text


def test_prompt_records_template_and_position(domains, tiny_tokenizer):
    prompts = build_prompts(domains[0], ProxyConfig("mcqa-letter", n_prompts=5, n_shots=0), tiny_tokenizer)
    assert [p.template for p in prompts] == [0, 1, 2, 0, 1]
    assert [p.index for p in prompts] == [0, 1, 2, 3, 4]


def test_examples_never_offer_the_querys_answer(facts, tiny_tokenizer):
    """An in-context example's options must not include the real query's answer (it would hint at it)."""
    for q in [f for f in facts if f.group == "capital"][:8]:
        for pr in build_prompts(q, ProxyConfig("mcqa-letter", n_shots=3), tiny_tokenizer, pool=facts):
            examples, final = pr.text.rsplit("Q", 1) if pr.template == 2 else pr.text.rsplit("\n\n", 1)
            assert q.answer not in examples, (q.id, pr.template)


def test_a_prompt_without_tokens_or_target_is_refused_when_built():
    """Before: the fast IG path failed deep in the model, the reference path scored every neuron 0."""
    with pytest.raises(ProxyError, match="query 'q' has no target token"):
        Prompt("q", "g", 0, "x", (5, 6), ())
    with pytest.raises(ProxyError, match="query 'q' has no tokens"):
        Prompt("q", "g", 0, "", (), (5,))
    assert Prompt("q", "g", 0, "x", (5, 6), (7,)).target_position == 1


# ---------------------------------------------------------------- what a run stores


@pytest.mark.parametrize("kind", ["mcqa-letter", "mcqa-text", "cloze"])
def test_prompt_round_trips_through_json(facts, tiny_tokenizer, kind):
    """A run stores prompts as JSON; reading them back must give the very same prompts."""
    prompts = build_prompts(facts[0], ProxyConfig(kind, n_shots=2), tiny_tokenizer, pool=facts)
    for p in prompts:
        back = Prompt.from_dict(json.loads(json.dumps(p.to_dict())))
        assert back == p and back.meta == p.meta
        assert isinstance(back.tokens, tuple) and isinstance(back.target, tuple)
        assert back.options is None or all(isinstance(o, tuple) for o in back.options)


def test_prompts_record_their_examples_and_cloze_distractors(facts, tiny_tokenizer):
    q = facts[0]
    by_id = {f.id: f for f in facts}
    group_answers = {_norm(f.answer) for f in facts if f.group == q.group}
    for p in build_prompts(q, ProxyConfig("cloze", n_shots=2), tiny_tokenizer, pool=facts):
        assert len(p.examples) == 2
        for e in p.examples:
            assert by_id[e].group == q.group and _filled(by_id[e]) in p.text
        assert p.distractors is not None and len(p.distractors) == 3  # n_options - 1
        words = {_norm(tiny_tokenizer.decode(list(d))) for d in p.distractors}
        assert words <= group_answers - {_norm(q.answer)} and len(words) == 3
    # Too few answers in the group for distractors: None, not an error (only neuron prediction needs them).
    small = [Query("a", "g", "The alpha city is", "Paris"), Query("b", "g", "The beta city is", "Rome")]
    (p,) = build_prompts(small[0], ProxyConfig("cloze", n_shots=1, n_prompts=1), tiny_tokenizer, pool=small)
    assert p.distractors is None and p.examples == ("b",)


def test_too_few_examples_or_distractors_point_at_pool(tiny_tokenizer):
    small = [Query(f"q{i}", "employer", f"Person {i} works for", f"Firm{i}") for i in range(4)]
    with pytest.raises(ProxyError, match=r"3 usable in-context examples, fewer than n_shots=4.*--pool PATH"):
        build_prompts(small[0], ProxyConfig("cloze", n_shots=4), tiny_tokenizer, pool=small)
    with pytest.raises(ProxyError, match=r"not enough for 4 distractors.*--pool PATH"):
        build_prompts(small[0], ProxyConfig("mcqa-text", n_options=5), tiny_tokenizer, pool=small)


def test_tokenizer_identity_tells_vocabularies_apart(tiny_tokenizer):
    import copy

    a = tokenizer_identity(tiny_tokenizer)
    assert a == tokenizer_identity(tiny_tokenizer) and a["vocab_size"] == len(tiny_tokenizer.get_vocab())
    other = copy.deepcopy(tiny_tokenizer)  # the session fixture stays untouched
    other.add_tokens(["<qrnca-test-extra>"])
    assert tokenizer_identity(other)["vocab_sha256"] != a["vocab_sha256"]
