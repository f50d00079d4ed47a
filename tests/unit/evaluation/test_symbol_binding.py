"""Symbol-binding control: re-lettering checked character by character, the statistic's extremes, and the
control on a tiny Llama whose answer is wired to a LETTER by construction, against a plain boost loop."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from qrnca_lens.data.queries import Query, load_data
from qrnca_lens.errors import ProxyError, QrncaError
from qrnca_lens.model.hooks import hooked
from qrnca_lens.model.access import mlp_hook_name
from qrnca_lens.neurons import NeuronSet
from qrnca_lens.data.prompts import Prompt, ProxyConfig, build_all_prompts, build_prompts, encode
from qrnca_lens.evaluation.symbol_binding import (
    RELETTER_KEY,
    SymbolBindingResult,
    binding_summary,
    derangement,
    reletter,
    reletter_all,
    symbol_binding,
)

LETTERS = "ABCD"


@pytest.fixture(scope="module")
def domains():
    return load_data("builtin:domains")


@pytest.fixture(scope="module")
def letter_prompts(domains, tiny_tokenizer):
    """20 built-in domain queries' 3 mcqa-letter prompts (3 examples each, all three templates)."""
    return build_all_prompts(domains[:20], ProxyConfig("mcqa-letter"), tiny_tokenizer, pool=domains)


def _flat(by_q):
    return [p for ps in by_q.values() for p in ps]


def _letter_id(tok, letter):
    ids = tok(" " + letter, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1
    return ids[0]


# ---------------------------------------------------------------- reletter


def test_reletter_permutes_only_the_query_letters(letter_prompts, tiny_tokenizer):
    prompts = _flat(letter_prompts)[:30]
    assert {p.template for p in prompts} == {0, 1, 2}
    for p in prompts:
        r = reletter(p, None, tiny_tokenizer, seed=0)
        perm = r.meta[RELETTER_KEY]["permutation"]
        assert sorted(perm) == [0, 1, 2, 3] and all(perm[i] != i for i in range(4))  # a derangement
        # Same length (one-character letters): the texts differ exactly at the query's own 4 letters, the last
        # 4 letter positions of the text, each the old letter i replaced by letter perm[i], in listing order.
        assert len(r.text) == len(p.text)
        diff = [k for k, (a, b) in enumerate(zip(p.text, r.text)) if a != b]
        assert [(p.text[k], r.text[k]) for k in diff] == [(LETTERS[i], LETTERS[perm[i]]) for i in range(4)]
        last_example = p.text.rfind("\n\n")  # every template separates examples by a blank line
        assert all(k > last_example for k in diff)
        # Contents and their order unchanged; correct moved to the content's new letter.
        assert r.meta["options"] == p.meta["options"]
        assert r.correct == perm[p.correct] != p.correct
        assert r.meta[RELETTER_KEY]["original_letter"] == LETTERS[p.correct]
        assert r.meta[RELETTER_KEY]["new_letter"] == LETTERS[r.correct]
        assert r.meta[RELETTER_KEY]["original_target"] == list(p.target)
        # Tokens rebuilt; one continuation per letter in letter order; the target is what the model would emit.
        assert list(r.tokens) == encode(tiny_tokenizer, r.text, prepend_bos=False)
        assert r.options == tuple((_letter_id(tiny_tokenizer, L),) for L in LETTERS)
        assert r.target == r.options[r.correct] == (_letter_id(tiny_tokenizer, LETTERS[r.correct]),)
        full = encode(tiny_tokenizer, r.text + " " + LETTERS[r.correct], prepend_bos=False)
        assert tuple(full) == r.tokens + r.target
        # The content under the new correct letter is the query's answer.
        line = r.meta["options"][perm.index(r.correct)]
        assert line == next(q for q in load_data("builtin:domains") if q.id == p.query_id).answer
        assert (r.query_id, r.index, r.template, r.examples) == (p.query_id, p.index, p.template, p.examples)


def test_reletter_works_on_stored_prompts_with_bos(domains, tiny_tokenizer):
    q = domains[5]
    for p in build_prompts(q, ProxyConfig("mcqa-letter", n_shots=1), tiny_tokenizer, pool=domains, prepend_bos=True):
        stored = Prompt.from_dict(p.to_dict())  # what LocateResult.stored_prompts() gives back
        r = reletter(stored, None, tiny_tokenizer)
        assert r.tokens[0] == tiny_tokenizer.bos_token_id
        assert list(r.tokens) == encode(tiny_tokenizer, r.text, prepend_bos=True)
        assert r == Prompt.from_dict(reletter(p, None, tiny_tokenizer).to_dict())


def test_reletter_is_seeded_and_draws_from_no_global_rng(letter_prompts, tiny_tokenizer, monkeypatch):
    prompts = _flat(letter_prompts)[:30]

    def forbidden(*args, **kwargs):
        raise AssertionError("reletter drew from the global random module")

    for name in ("random", "shuffle", "sample", "choice", "choices", "randint", "randrange", "seed", "setstate"):
        monkeypatch.setattr(random, name, forbidden)
    state = (np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    a = [reletter(p, None, tiny_tokenizer, seed=3) for p in prompts]
    b = [reletter(p, None, tiny_tokenizer, seed=3) for p in prompts]
    c = [reletter(p, None, tiny_tokenizer, seed=4) for p in prompts]
    assert np.array_equal(np.random.get_state()[1], state[0]) and torch.equal(torch.get_rng_state(), state[1])
    assert [(x.text, x.tokens, x.correct) for x in a] == [(x.text, x.tokens, x.correct) for x in b]
    assert [x.meta[RELETTER_KEY]["permutation"] for x in a] != [x.meta[RELETTER_KEY]["permutation"] for x in c]
    # Each prompt draws its own permutation: not one permutation for all.
    assert len({tuple(x.meta[RELETTER_KEY]["permutation"]) for x in a}) > 1


_STATE_SCRIPT = """
import random, sys
from transformers import AutoTokenizer
from qrnca_lens.data import load_data
from qrnca_lens.data.prompts import ProxyConfig, build_all_prompts
from qrnca_lens.evaluation.symbol_binding import reletter_all
tok = AutoTokenizer.from_pretrained(sys.argv[1])
domains = load_data("builtin:domains")
prompts = build_all_prompts(domains[:10], ProxyConfig("mcqa-letter"), tok, pool=domains)
random.seed(123)
before = random.getstate()
n = sum(map(len, reletter_all(prompts, tok, seed=5).values()))
print(n, random.getstate() == before)
"""


def test_reletter_leaves_the_global_random_state_unchanged(tiny_tokenizer):
    # In-process, beartype's runtime checks (the pytest import hook) sample containers with the global
    # random.getrandbits, so random.getstate() is compared in a plain interpreter without the hook.
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]  # the repository: tests/unit/evaluation/this file
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", _STATE_SCRIPT, tiny_tokenizer.name_or_path], cwd=root,
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["30", "True"]


def test_derangements_have_no_fixed_point_and_cover_all():
    seen = {derangement(4, 0, "q", i) for i in range(300)}
    assert all(sorted(p) == [0, 1, 2, 3] and all(p[i] != i for i in range(4)) for p in seen)
    assert len(seen) == 9  # !4 = 9: every derangement of 4 is drawn
    with pytest.raises(QrncaError, match="at least 2"):
        derangement(1, 0)


def test_explicit_permutations(letter_prompts, tiny_tokenizer):
    p = _flat(letter_prompts)[0]
    c = p.correct
    perm = [(i + 1) % 4 for i in range(4)]
    r = reletter(p, perm, tiny_tokenizer)
    assert r.meta[RELETTER_KEY]["permutation"] == perm and r.correct == perm[c]
    fixed = list(range(4))
    fixed[c], fixed[(c + 1) % 4] = fixed[(c + 1) % 4], fixed[c]
    fixed[(c + 2) % 4], fixed[(c + 3) % 4] = fixed[(c + 3) % 4], fixed[(c + 2) % 4]
    assert reletter(p, fixed, tiny_tokenizer).correct == (c + 1) % 4  # correct moves, no full derangement needed
    keep = list(range(4))
    keep[(c + 1) % 4], keep[(c + 2) % 4] = keep[(c + 2) % 4], keep[(c + 1) % 4]
    with pytest.raises(QrncaError, match="correct content to change letter"):
        reletter(p, keep, tiny_tokenizer)
    with pytest.raises(QrncaError, match="not a permutation"):
        reletter(p, [1, 1, 2, 3], tiny_tokenizer)


def test_non_letter_prompts_are_refused(domains, tiny_tokenizer, letter_prompts):
    for kind in ("mcqa-text", "cloze"):
        p = build_prompts(domains[0], ProxyConfig(kind, n_shots=0), tiny_tokenizer, pool=domains)[0]
        with pytest.raises(ProxyError, match="mcqa-letter"):
            reletter(p, None, tiny_tokenizer)
        with pytest.raises(ProxyError, match=f"proxy is '{kind}'"):
            reletter(p, None, tiny_tokenizer, proxy=ProxyConfig(kind))
    pb = Query("pb", "math", "2+2?", "B", prompts=("Question: 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:",),
               prompt_letters=("B",))
    with pytest.raises(ProxyError, match="pre-built"):
        reletter(build_prompts(pb, ProxyConfig("mcqa-letter"), tiny_tokenizer)[0], None, tiny_tokenizer)
    r = reletter(_flat(letter_prompts)[0], None, tiny_tokenizer)
    with pytest.raises(ProxyError, match="already re-lettered"):
        reletter(r, None, tiny_tokenizer)
    # Built with other letters than the proxy passed: the listing is not found, the fix is named.
    other = ProxyConfig("mcqa-letter", letters="EFGHIJ", n_shots=0)
    p = build_prompts(domains[0], other, tiny_tokenizer, pool=domains)[0]
    with pytest.raises(ProxyError, match=r"proxy=run\.config\.proxy"):
        reletter(p, None, tiny_tokenizer)
    assert reletter(p, None, tiny_tokenizer, proxy=other).meta[RELETTER_KEY]["original_letter"] in "EFGH"


# ---------------------------------------------------------------- the statistic


def _summ(p_new, p_old, tol=1e-3):
    p_new, p_old = np.array(p_new, float), np.array(p_old, float)
    return binding_summary(p_new, p_old, np.log(p_new), np.log(p_old), tol)


def test_summary_extremes_and_invariances():
    letter = _summ([[0.2, 0.1], [0.3, 0.25]], [[0.1, 0.4], [0.2, 0.5]])  # only the old letter rises
    assert letter["content_share"] == 0.0 and letter["content_wins"] == 0.0 and letter["flag"] is None
    content = _summ([[0.1, 0.4], [0.2, 0.5]], [[0.2, 0.1], [0.3, 0.25]])
    assert content["content_share"] == 1.0 and content["content_wins"] == 1.0
    mixed = _summ([[0.1, 0.3], [0.1, 0.1]], [[0.1, 0.1], [0.1, 0.7]])  # rises 0.2 (new) and 0.6 (old)
    assert mixed["content_share"] == pytest.approx(0.25)
    assert mixed["mean_delta_new"] == pytest.approx(0.1) and mixed["mean_delta_old"] == pytest.approx(0.3)
    assert mixed["content_wins"] == 0.5
    # Halving every probability leaves the share alone: it is a ratio of pooled rises.
    half = _summ(np.array([[0.1, 0.3], [0.1, 0.1]]) / 2, np.array([[0.1, 0.1], [0.1, 0.7]]) / 2)
    assert half["content_share"] == pytest.approx(0.25)
    shift = _summ([[0.1, 0.2]], [[0.1, 0.05]])["mean_preference_shift"]
    assert shift == pytest.approx(math.log(2) + math.log(2))


def test_summary_flags_instead_of_fake_numbers():
    none = _summ([[0.2, 0.2 * (1 + 1e-6)], [0.3, 0.3]], [[0.1, 0.1], [0.2, 0.2 * (1 - 1e-6)]])
    assert none["content_share"] is None and none["content_wins"] is None and none["n_moved"] == 0
    assert none["flag"].startswith("no effect")
    down = _summ([[0.2, 0.1]], [[0.3, 0.1]])
    assert down["content_share"] is None and down["flag"].startswith("no rise")
    assert down["content_wins"] == 1.0  # the new letter lost less than the old one
    assert _summ(np.zeros((0, 2)) + 0.5, np.zeros((0, 2)) + 0.5)["flag"] == "no prompts"


# ---------------------------------------------------------------- the control on a letter-wired tiny model

WIRED_A, WIRED_B, DEAD = 5, 7, 9  # neurons of the last layer


@pytest.fixture(scope="module")
def wired(tiny_tokenizer, domains):
    """A private tiny Llama whose last-layer neuron 5 writes " A" (7 writes " B") whatever the content.

    Gate and linear rows of the wired neurons are equal (act = z^2 sigmoid(z) >= 0) and point along the mean
    MLP input at the last positions, so they are active on every prompt; their output rows point along the
    unembedding of their letter through the final norm's weight. Neuron 9 writes nothing (zero output row).
    The final norm's weight is scaled x4 so letter logits can move far (random-init logits are flat).
    """
    from builders import tiny_llama_hf
    from transformer_lens.model_bridge import TransformerBridge

    # Zero-shot keeps the prompts short (the model ignores their content anyway); 45 queries give enough
    # prompts with "A" correct and with the content moved to "B".
    prompts = build_all_prompts(domains[:45], ProxyConfig("mcqa-letter", n_shots=0), tiny_tokenizer, pool=domains)
    hf = tiny_llama_hf(tiny_tokenizer)
    mlp = hf.model.layers[-1].mlp
    seen: list[torch.Tensor] = []
    handle = mlp.register_forward_hook(lambda mod, inp, out: seen.append(inp[0][0, -1].clone()))
    try:
        with torch.no_grad():
            for p in _flat(prompts):
                hf(torch.tensor([p.tokens]))
    finally:
        handle.remove()
    mean = torch.stack(seen).mean(0)
    with torch.no_grad():
        hf.model.norm.weight.mul_(4.0)
        for n, letter in ((WIRED_A, "A"), (WIRED_B, "B")):
            mlp.gate_proj.weight[n] = mean / mean.norm()
            mlp.up_proj.weight[n] = mean / mean.norm()
            d = hf.model.norm.weight * hf.lm_head.weight[_letter_id(tiny_tokenizer, letter)]
            mlp.down_proj.weight[:, n] = d / d.norm()
        mlp.down_proj.weight[:, DEAD] = 0.0
    model = TransformerBridge.boot_transformers("tiny-llama-wired", hf_model=hf, tokenizer=tiny_tokenizer).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model, prompts


def _sets(prompts, **neurons):
    return {m: {q: NeuronSet([(2, n)]) for q in prompts} for m, n in neurons.items()}


def _plain_p(model, prompt, neuron=None, factor=2.0):
    """Full-vocabulary probability of the prompt's target: full sequence, a plain boost hook at the last position."""
    pos = prompt.target_position
    hooks = []
    if neuron is not None:
        def h(act, hook):
            out = act.clone()
            out[:, pos, neuron] = act[:, pos, neuron] * factor
            return out

        hooks.append((mlp_hook_name(model, 2), h))
    with torch.no_grad(), hooked(model, fwd=hooks):
        logits = model(torch.tensor([list(prompt.tokens)]))[0, pos].double()
    return float(torch.softmax(logits, -1)[prompt.target[0]])


def test_a_letter_wired_neuron_follows_the_letter(wired, tiny_tokenizer):
    model, prompts = wired
    on_a = {}
    for p in _flat(prompts):
        if p.correct == 0:  # "A" was correct: after re-lettering, "A" is the OLD letter
            on_a.setdefault(p.query_id, []).append(p)
    assert sum(map(len, on_a.values())) >= 20
    res = symbol_binding(model, on_a, _sets(on_a, wired_a=WIRED_A, dead=DEAD), seed=0)
    a = res.per_method["wired_a"]
    assert a["mean_delta_original"] > 0.1  # precondition: the boost really raises " A" on the original prompts
    assert a["mean_delta_old"] > 0.1 and a["mean_delta_new"] < 0
    assert a["content_share"] is not None and a["content_share"] < 0.05
    assert a["content_wins"] < 0.05 and a["mean_preference_shift"] < 0 and a["flag"] is None
    dead = res.per_method["dead"]
    assert dead["content_share"] is None and dead["content_wins"] is None
    assert dead["flag"].startswith("no effect") and dead["n_moved"] == 0


def test_a_neuron_raising_the_new_letter_gets_share_one(wired, tiny_tokenizer):
    """The mirror: on prompts whose content moved to "B", the B-wired neuron raises exactly the content's new
    letter. (Not a content neuron, which a random tiny model cannot honestly be given: it checks the other end
    of the statistic on the same machinery.)"""
    model, prompts = wired
    to_b = {}
    for p in _flat(prompts):
        if reletter(p, None, tiny_tokenizer, seed=1).meta[RELETTER_KEY]["new_letter"] == "B":
            to_b.setdefault(p.query_id, []).append(p)
    assert sum(map(len, to_b.values())) >= 10
    b = symbol_binding(model, to_b, _sets(to_b, wired_b=WIRED_B), seed=1).per_method["wired_b"]
    assert b["mean_delta_new"] > 0.1 and b["mean_delta_old"] < 0
    assert b["content_share"] is not None and b["content_share"] > 0.95 and b["content_wins"] > 0.95


def test_the_control_matches_a_plain_boost_loop(wired, tiny_tokenizer):
    model, prompts = wired
    some = {q: prompts[q] for q in list(prompts)[:2]}
    sets = _sets(some, wired_a=WIRED_A, wired_b=WIRED_B)
    res = symbol_binding(model, some, sets, seed=2)
    assert len(res.per_prompt) == 2 * 6
    rel = reletter_all(some, tiny_tokenizer, seed=2)
    before: dict = {}  # the clean probabilities, one forward per prompt and letter
    for row in res.per_prompt:
        p = some[row["query_id"]][row["index"]]
        r = rel[row["query_id"]][row["index"]]
        old = Prompt.from_dict({**r.to_dict(), "target": r.meta[RELETTER_KEY]["original_target"]})
        n = WIRED_A if row["method"] == "wired_a" else WIRED_B
        for name, pr in (("orig", p), ("new", r), ("old", old)):
            if (name, row["query_id"], row["index"]) not in before:
                before[(name, row["query_id"], row["index"])] = _plain_p(model, pr)
            assert row[f"p_{name}_before"] == pytest.approx(before[(name, row["query_id"], row["index"])], abs=1e-5)
            assert row[f"p_{name}_after"] == pytest.approx(_plain_p(model, pr, n), abs=1e-5)
    # The summary is binding_summary of those very rows.
    for m in sets:
        rows = [x for x in res.per_prompt if x["method"] == m]
        pn = np.array([[x["p_new_before"], x["p_new_after"]] for x in rows])
        po = np.array([[x["p_old_before"], x["p_old_after"]] for x in rows])
        want = binding_summary(pn, po, np.log(pn), np.log(po), res.meta["tol"])
        got = res.per_method[m]
        for k, v in want.items():
            assert got[k] == (pytest.approx(v, abs=1e-9) if isinstance(v, float) else v)
        q0 = next(iter(some))
        assert res.per_query[m][q0]["n_prompts"] == 3


def test_result_round_trip_and_views(wired, tiny_tokenizer):
    model, prompts = wired
    some = {q: prompts[q] for q in list(prompts)[:2]}
    res = symbol_binding(model, some, _sets(some, wired_a=WIRED_A, dead=DEAD))
    again = SymbolBindingResult.from_dict(res.to_record())
    assert again == res
    assert list(res.to_dataframe()["method"]) == ["wired_a", "dead"]
    assert len(res.to_dataframe("query")) == 4 and len(res.to_dataframe("prompt")) == 12
    text = str(res)
    assert "wired_a" in text and "no effect" in text
    with pytest.raises(QrncaError, match="level"):
        res.to_dataframe("layer")


def test_the_control_refuses_missing_sets_and_non_letter_prompts(wired, tiny_tokenizer, domains):
    model, prompts = wired
    some = {q: prompts[q] for q in list(prompts)[:2]}
    sets = _sets(some, wired_a=WIRED_A)
    del sets["wired_a"][next(iter(some))]
    with pytest.raises(QrncaError, match="no neuron set"):
        symbol_binding(model, some, sets)
    cloze = {domains[0].id: build_prompts(domains[0], ProxyConfig("cloze", n_shots=0), tiny_tokenizer, pool=domains)}
    with pytest.raises(ProxyError, match="mcqa-letter"):
        symbol_binding(model, cloze, _sets(cloze, wired_a=WIRED_A))


def test_the_control_shows_the_scoring_bar_unless_quiet(wired, capsys):
    model, prompts = wired
    some = {q: prompts[q] for q in list(prompts)[:15]}  # 90 distinct prompts: several engine steps
    sets = _sets(some, wired_a=WIRED_A)
    quiet = symbol_binding(model, some, sets, progress=False)
    assert "scoring" not in capsys.readouterr().err
    shown = symbol_binding(model, some, sets)
    assert "scoring: 100%" in capsys.readouterr().err
    assert shown.per_prompt == quiet.per_prompt
