"""Symbol-binding control for letter MCQA: does a locator's effect follow the LETTER or the CONTENT?

Producing an answer letter is partly a matter of binding content to a symbol (Wiegreffe et al., ICLR 2025,
"Answer, Assemble, Ace"): neurons found on ``mcqa-letter`` prompts may raise "the letter B" rather than "the
correct answer". The control re-letters each prompt's own option block (same options, same order, the
letters permuted by a derangement, so the correct content sits under another letter and the letter that was
correct now labels other content), boosts the query's neurons on the re-lettered prompt, and compares the
rise of the content's NEW letter with the rise of the OLD one.

Statistic (``binding_summary``, pure). Per prompt, the boost's change of each letter's full-vocabulary
probability, ``d_new`` and ``d_old``; a change whose log-probability moves by no more than ``tol`` nats (the
engine's exactness tolerance) counts as 0. Then

    content_share = sum_p max(d_new, 0) / (sum_p max(d_new, 0) + sum_p max(d_old, 0))

The brief's per-prompt ratio ``d_new / (d_new + d_old)`` is undefined when both changes vanish and leaves
[0, 1] (or flips sign) when they have opposite signs, which is the common case: the boost raises one letter
and, through the softmax, lowers the other. Pooling the positive parts over prompts keeps the share in
[0, 1], gives 1 to an effect that only follows the content and 0 to one that only follows the letter, and
weights prompts by how much the boost moves them. When no prompt has a rise, the share is None and ``flag``
says why (never a number made from noise). Also reported: the mean raw changes, the share of moved prompts
where the content's letter gains more than the old letter, the mean shift of log p(new) - log p(old) (sign
>0: content), and the boost's effect on the ORIGINAL prompts (the effect being decomposed).

Only the query's own option block is re-lettered: the in-context examples keep their letters A, B, ... and
answers, so they still teach the answer format; the query's listing then shows the letters out of order
(e.g. "C. Liver  A. Heart  D. Lungs  B. Kidney"). ``Prompt.options`` stays one continuation per letter in
letter order, so ``correct`` moves to the content's new letter.

Example:
    >>> res = symbol_binding(model, run.stored_prompts(), {"qrnca": {q: run.qr_neurons(q) for q in run.groups}},
    ...                      proxy=run.config.proxy)                          # doctest: +SKIP
    >>> print(res)                                                            # doctest: +SKIP
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from jaxtyping import Float

from ..config import Config
from ..data.prompts import Prompt, ProxyConfig, Template, encode, letter_tokens
from ..engine.checks import check_tolerance
from ..errors import ProxyError, QrncaError
from ..model.access import model_dtype, tokenizer_of
from ..model.interventions import BOOST
from ..neurons import NeuronSet
from ..protocols import HookedModel

if TYPE_CHECKING:  # only the annotation needs the class; the executors load on first use
    from ..qrnca.executors import Executor

__all__ = ["RELETTER_KEY", "derangement", "reletter", "reletter_all", "binding_summary", "SymbolBindingResult",
           "symbol_binding"]

RELETTER_KEY = "reletter"  # Prompt.meta key of what reletter changed


# ---------------------------------------------------------------- relettering (text + tokenizer only)


def derangement(n: int, seed: int, *key: Any) -> tuple[int, ...]:
    """A uniformly drawn permutation of ``range(n)`` with no fixed point, from ``random.Random(seed|key)``.

    Args:
        n: its size (at least 2).
        seed: the seed; ``key`` parts (query id, prompt index) make each prompt's draw its own.

    Returns:
        ``perm`` with ``perm[i] != i`` for every i. The global RNG is not touched.

    Example:
        >>> p = derangement(4, 0, "q1", 0)
        >>> sorted(p) == [0, 1, 2, 3] and all(p[i] != i for i in range(4))
        True
    """
    if n < 2:
        raise QrncaError(f"a derangement needs at least 2 items, got {n}; letter prompts need >= 2 options")
    rng = random.Random("|".join(str(p) for p in (seed, "reletter", *key)))
    perm = list(range(n))
    while True:  # rejection: uniform over derangements, ~e tries on average
        rng.shuffle(perm)
        if all(p != i for i, p in enumerate(perm)):
            return tuple(perm)


def _block(t: Template, letters: str, order: Sequence[int], contents: Sequence[str]) -> str:
    """An option listing as ``proxies`` renders it, option ``i`` shown under letter ``letters[order[i]]``."""
    return t.option_sep.join(t.option_format.format(letter=letters[order[i]], text=o)
                             for i, o in enumerate(contents)) + t.options_end


def _not_letter(prompt: Prompt, why: str) -> ProxyError:
    return ProxyError(
        f"prompt {prompt.index} of query {prompt.query_id!r} cannot be re-lettered: {why}. The symbol-binding "
        "control needs mcqa-letter prompts built by qrnca_lens.data.prompts: locate with ProxyConfig('mcqa-letter') "
        "and pass the run's proxy config (proxy=run.config.proxy) and the tokenizer that built the prompts"
    )


def reletter(prompt: Prompt, permutation: Sequence[int] | None, tokenizer: Any, *,
             proxy: ProxyConfig | None = None, seed: int = 0) -> Prompt:
    """The same prompt with its own options' letters permuted: option order and contents unchanged.

    Option ``i`` (display position, content ``prompt.meta["options"][i]``) is shown under letter
    ``letters[permutation[i]]``; the in-context examples keep their letters. Tokens and letter
    continuations are rebuilt with ``tokenizer``; ``options`` stays one continuation per letter in letter
    order, so ``correct`` becomes ``permutation[old correct]`` and ``target`` its letter. ``meta["reletter"]``
    records the permutation, the letters shown, and the original correct letter, index and target.

    Args:
        prompt: an mcqa-letter prompt as ``build_prompts`` made it (or as a run stored it).
        permutation: ``None`` draws a seeded derangement from (``seed``, query id, prompt index); an explicit
            permutation must move the correct option's letter.
        tokenizer: the tokenizer that built the prompt (its ids are checked against the text).
        proxy: the proxy config the prompt was built with (its letters, templates, letter style, chat
            template); default ``ProxyConfig("mcqa-letter")``.
        seed: seed of the drawn derangement.

    Returns:
        The re-lettered ``Prompt``. Refuses (``ProxyError``) anything that is not such an mcqa-letter prompt,
        authors' pre-built prompts (their option layout is unknown) and prompts already re-lettered.

    Example:
        >>> r = reletter(prompts[0], None, tokenizer, seed=0)          # doctest: +SKIP
        >>> r.meta["reletter"]["original_letter"], r.meta["reletter"]["new_letter"]   # doctest: +SKIP
        ('B', 'D')
    """
    proxy = proxy if proxy is not None else ProxyConfig("mcqa-letter")
    if proxy.kind != "mcqa-letter":
        raise _not_letter(prompt, f"the proxy is {proxy.kind!r}, whose answers are not option letters")
    if RELETTER_KEY in prompt.meta:
        raise _not_letter(prompt, "it is already re-lettered (its original letter would be lost); re-letter the "
                                  "original prompt")
    if prompt.meta.get("prebuilt"):
        raise _not_letter(prompt, "it is an authors' pre-built prompt, whose option layout is not known")
    contents = prompt.meta.get("options")
    if prompt.options is None or prompt.correct is None or not contents or len(contents) != len(prompt.options):
        raise _not_letter(prompt, "it has no lettered options (a cloze prompt?)")
    n, c, letters = len(contents), prompt.correct, proxy.letters
    templates = proxy.template_list()
    if not 0 <= prompt.template < len(templates):
        raise _not_letter(prompt, f"its template {prompt.template} is not among the proxy's {len(templates)}")
    bos = bool(prompt.meta.get("prepend_bos", False))
    if list(prompt.tokens) != encode(tokenizer, prompt.text, prepend_bos=bos):
        raise _not_letter(prompt, "its tokens are not this tokenizer's encoding of its text")
    sep = "" if proxy.chat_template else " "
    try:
        old = tuple(letter_tokens(tokenizer, list(prompt.tokens), prompt.text, proxy, i, sep, bos) for i in range(n))
    except ProxyError as e:
        raise _not_letter(prompt, f"its letters are not single tokens here ({e})") from None
    if tuple(map(tuple, prompt.options)) != old:
        raise _not_letter(prompt, "its options are not the letter tokens (an mcqa-text prompt?)")
    t = templates[prompt.template]
    old_block = _block(t, letters, range(n), contents)
    at = prompt.text.rfind(old_block)  # the query's own listing comes after every example's
    if at < 0:
        raise _not_letter(prompt, f"its option listing is not in its text as template {prompt.template} renders it")
    if permutation is None:
        perm = derangement(n, seed, prompt.query_id, prompt.index)
    else:
        perm = tuple(int(p) for p in permutation)
        if sorted(perm) != list(range(n)):
            raise QrncaError(f"permutation {list(perm)} is not a permutation of 0..{n - 1}; give one new letter "
                             "index per option")
        if perm[c] == c:
            raise QrncaError(f"permutation {list(perm)} leaves the correct option under its letter "
                             f"{letters[c]!r}; the control needs the correct content to change letter (use "
                             "permutation=None for a seeded derangement)")
    text = prompt.text[:at] + _block(t, letters, perm, contents) + prompt.text[at + len(old_block):]
    ids = encode(tokenizer, text, prepend_bos=bos)
    opts = tuple(letter_tokens(tokenizer, ids, text, proxy, j, sep, bos) for j in range(n))
    record = {"permutation": list(perm), "letters": [letters[p] for p in perm], "original_correct": c,
              "original_letter": letters[c], "original_target": list(prompt.target), "new_letter": letters[perm[c]],
              "seed": seed if permutation is None else None}
    return replace(prompt, text=text, tokens=tuple(ids), target=opts[perm[c]], options=opts, correct=perm[c],
                   meta={**prompt.meta, RELETTER_KEY: record})


def reletter_all(prompts_by_query: Mapping[str, Sequence[Prompt]], tokenizer: Any, *,
                 proxy: ProxyConfig | None = None, seed: int = 0) -> dict[str, list[Prompt]]:
    """``reletter`` (seeded derangements) of every prompt, keyed by query id like ``run.stored_prompts()``.

    Example:
        >>> rel = reletter_all(run.stored_prompts(), model.tokenizer, proxy=run.config.proxy)   # doctest: +SKIP
    """
    return {q: [reletter(p, None, tokenizer, proxy=proxy, seed=seed) for p in ps] for q, ps in prompts_by_query.items()}


# ---------------------------------------------------------------- the statistic (pure)


def binding_summary(
    p_new: Float[np.ndarray, "prompt 2"], p_old: Float[np.ndarray, "prompt 2"],
    logp_new: Float[np.ndarray, "prompt 2"], logp_old: Float[np.ndarray, "prompt 2"], tol: float,
) -> dict[str, Any]:
    """The control's numbers for one set of prompts (see the module docstring for the definitions).

    Args:
        p_new, p_old: ``[prompt, (before, after)]`` probabilities of the content's new letter and the old
            letter on the re-lettered prompts, without and with the boost.
        logp_new, logp_old: the same as log-probabilities (what ``tol`` is measured on).
        tol: a letter whose log-probability moves by at most ``tol`` nats counts as unchanged.

    Returns:
        ``content_share`` (None with ``flag`` set when nothing rises), ``content_wins`` (None when no prompt
        moves), ``mean_delta_new``, ``mean_delta_old``, ``mean_preference_shift``, ``n_prompts``, ``n_moved``.

    Example:
        >>> s = binding_summary(np.array([[.1, .1]]), np.array([[.2, .5]]), np.log([[.1, .1]]), np.log([[.2, .5]]), 1e-3)
        >>> s["content_share"], s["content_wins"]
        (0.0, 0.0)
    """
    d_new, d_old = p_new[:, 1] - p_new[:, 0], p_old[:, 1] - p_old[:, 0]
    moved_new = np.abs(logp_new[:, 1] - logp_new[:, 0]) > tol
    moved_old = np.abs(logp_old[:, 1] - logp_old[:, 0]) > tol
    c_new, c_old = np.where(moved_new, d_new, 0.0), np.where(moved_old, d_old, 0.0)
    rise_new, rise_old = float(np.clip(c_new, 0, None).sum()), float(np.clip(c_old, 0, None).sum())
    moved = moved_new | moved_old
    n = len(d_new)
    flag = None
    share: float | None = None
    if n == 0:
        flag = "no prompts"
    elif not moved.any():
        flag = f"no effect: the boost moved neither letter by more than {tol:g} nats on any prompt"
    elif rise_new + rise_old <= 0:
        flag = "no rise: the boost lowered (or kept) both letters on every prompt, so no share of a rise exists"
    else:
        share = rise_new / (rise_new + rise_old)
    shift = (logp_new[:, 1] - logp_old[:, 1]) - (logp_new[:, 0] - logp_old[:, 0])
    return {
        "content_share": share,
        "content_wins": float(np.mean(c_new[moved] > c_old[moved])) if moved.any() else None,
        "mean_delta_new": float(np.mean(d_new)) if n else None,
        "mean_delta_old": float(np.mean(d_old)) if n else None,
        "mean_preference_shift": float(np.mean(shift)) if n else None,
        "n_prompts": n, "n_moved": int(moved.sum()), "flag": flag,
    }


# ---------------------------------------------------------------- the result


@dataclass
class SymbolBindingResult(Config):
    """The control per method (``per_method``), per method and query (``per_query``) and per prompt.

    ``per_method[m]`` holds ``binding_summary``'s numbers plus ``mean_delta_original`` (the boost's mean
    change of the correct letter's probability on the original prompts). ``per_prompt`` rows hold the
    probabilities before/after of the new, old and original letters. ``to_dict`` / ``from_dict`` are the
    base's (None, never NaN, for undefined numbers).
    """

    per_method: dict[str, dict[str, Any]]
    per_query: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    per_prompt: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dataframe(self, level: str = "method") -> Any:
        """One row per method (``level="method"``), per method and query (``"query"``) or per prompt."""
        import pandas as pd

        if level == "method":
            return pd.DataFrame([{"method": m, **r} for m, r in self.per_method.items()])
        if level == "query":
            return pd.DataFrame([{"method": m, "query_id": q, **r} for m, d in self.per_query.items()
                                 for q, r in d.items()])
        if level == "prompt":
            return pd.DataFrame(self.per_prompt)
        raise QrncaError(f"unknown level {level!r}; choose 'method', 'query' or 'prompt'")

    def __str__(self) -> str:
        def f(x: Any, fmt: str) -> str:
            return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)

        head = (f"{'method':<12} {'content share':>13} {'content wins':>12} {'d p(new)':>10} {'d p(old)':>10} "
                f"{'d p(orig)':>10} {'n':>5}  flag")
        lines = [f"symbol binding (boost x{self.meta.get('factor', '?')}, re-lettered options)", head, "-" * len(head)]
        for m, r in self.per_method.items():
            lines.append(f"{m:<12} {f(r['content_share'], '{:.2f}'):>13} {f(r['content_wins'], '{:.1%}'):>12} "
                         f"{f(r['mean_delta_new'], '{:+.4f}'):>10} {f(r['mean_delta_old'], '{:+.4f}'):>10} "
                         f"{f(r['mean_delta_original'], '{:+.4f}'):>10} {r['n_prompts']:>5}  {r['flag'] or ''}")
        return "\n".join(lines)


# ---------------------------------------------------------------- the control (model edge)


def symbol_binding(
    model: HookedModel,
    prompts_by_query: Mapping[str, Sequence[Prompt]],
    sets: Mapping[str, Mapping[str, NeuronSet]],
    factor: float = BOOST,
    seed: int = 0,
    *,
    tokenizer: Any = None,
    proxy: ProxyConfig | None = None,
    every_position: bool = False,
    tol: float | None = None,
    batch_size: int = 8,
    engine: bool = True,
    executor: Executor | None = None,
    progress: bool = True,
) -> SymbolBindingResult:
    """How much of each method's boost effect follows the option letter rather than the content.

    Every prompt is re-lettered (``reletter``, seeded derangement); each method's query neurons are boosted
    (x ``factor``, at the last position like the evaluation's boost, or ``every_position``) on the original
    and the re-lettered prompts; all rows (clean and boosted) are scored in one ``score_items`` call.

    Args:
        model: the TL model.
        prompts_by_query: mcqa-letter prompts per query id, e.g. ``run.stored_prompts()``.
        sets: ``{method: {query id: NeuronSet}}`` (e.g. ``locators.neuron_sets``); every query of
            ``prompts_by_query`` needs a set in every method.
        factor: the boost factor (the evaluation's ``BOOST`` = 2).
        seed: seed of the derangements.
        tokenizer: the tokenizer that built the prompts (default: the model's).
        proxy: the proxy config the prompts were built with (``run.config.proxy``); default mcqa-letter.
        tol: a letter moving by at most ``tol`` nats counts as unmoved (default: the engine's exactness
            tolerance for the model's dtype).
        batch_size, engine: passed to ``score_items``; ``executor`` (``SerialExecutor``, ``RayExecutor``)
            runs the scoring elsewhere.
        progress: a bar over the scoring's steps (``score_items``), when there are several.

    Returns:
        ``SymbolBindingResult``.

    Example:
        >>> sets = neuron_sets(("qrnca", "random"), LocatorContext(model, queries, prompts, run))  # doctest: +SKIP
        >>> res = symbol_binding(model, prompts, sets, proxy=run.config.proxy)                     # doctest: +SKIP
        >>> res.per_method["qrnca"]["content_share"]                                              # doctest: +SKIP
    """
    tok = tokenizer if tokenizer is not None else tokenizer_of(model)
    tol = check_tolerance(model_dtype(model)) if tol is None else float(tol)
    flat, items, starts = _rows(prompts_by_query, sets, factor, seed, tok, proxy)
    if executor is not None:
        scored = executor.score_items(items, every_position=every_position, batch_size=batch_size, engine=engine,
                                      progress=progress)
    else:
        from ..engine.scoring import score_items

        scored = score_items(model, items, every_position=every_position, batch_size=batch_size, engine=engine,
                             progress=progress)
    lp = np.array([s.target_logprob for s in scored], dtype=np.float64).reshape(-1, 3)  # rows: (orig, new, old)
    per_method, per_query, per_prompt = _summaries(flat, lp, starts, prompts_by_query, tol)
    n = len(flat)
    acc = [s.correct for s in scored[: 3 * n]]
    meta = {"factor": float(factor), "seed": seed, "tol": tol, "every_position": every_position,
            "n_queries": len(prompts_by_query), "n_prompts": n, "methods": list(sets),
            "proxy": (proxy or ProxyConfig("mcqa-letter")).to_dict(),
            "model_accuracy_original": float(np.mean(acc[0::3])), "model_accuracy_relettered": float(np.mean(acc[1::3])),
            "statistic": "content_share = sum max(d_new,0) / (sum max(d_new,0) + sum max(d_old,0)), changes within "
                         "tol nats set to 0; 1 = follows the content, 0 = follows the letter"}
    return SymbolBindingResult(per_method=per_method, per_query=per_query, per_prompt=per_prompt, meta=meta)


_Flat = list[tuple[str, Prompt, Prompt]]  # (query id, original prompt, re-lettered prompt)


def _rows(prompts_by_query: Mapping[str, Sequence[Prompt]], sets: Mapping[str, Mapping[str, NeuronSet]],
          factor: float, seed: int, tok: Any, proxy: ProxyConfig | None
          ) -> tuple[_Flat, list[tuple[Prompt, Any]], dict[str, int]]:
    """Every prompt re-lettered, and the rows to score: three views of each prompt clean, then the same boosted
    per method. Returns the prompts, the rows and where each method's rows start."""
    for m, per in sets.items():
        missing = [q for q in prompts_by_query if q not in per]
        if missing:
            raise QrncaError(f"method {m!r} has no neuron set for queries {missing[:3]}; give every method a set "
                             "for every query whose prompts are passed")
    flat = [(q, p, reletter(p, None, tok, proxy=proxy, seed=seed)) for q, ps in prompts_by_query.items() for p in ps]
    if not flat:
        raise QrncaError("no prompts to re-letter; pass at least one query's mcqa-letter prompts")
    # Three targets per prompt: the original correct letter on the original prompt, and on the re-lettered
    # prompt the content's new letter and the old letter (now labelling other content).
    views = []
    for _, p, r in flat:
        assert r.options is not None  # reletter refuses prompts without options
        views.append((p, r, replace(r, target=tuple(r.options[r.meta[RELETTER_KEY]["original_correct"]]))))
    items: list[tuple[Prompt, Any]] = [(v, None) for trio in views for v in trio]
    starts = {}
    for m, per in sets.items():
        starts[m] = len(items)
        for (q, _, _), trio in zip(flat, views):
            iv = (per[q], float(factor))
            items.extend((v, iv) for v in trio)
    return flat, items, starts


def _summaries(flat: _Flat, lp: Float[np.ndarray, "row 3"], starts: Mapping[str, int],
               prompts_by_query: Mapping[str, Sequence[Prompt]], tol: float
               ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, dict[str, Any]]], list[dict[str, Any]]]:
    """Per method, per method and query, and per prompt: the statistic from the scored log-probabilities
    (``lp``: one row per prompt view, columns (orig, new, old); the first ``len(flat)`` rows clean)."""
    n = len(flat)
    clean = lp[:n]
    per_method, per_query, per_prompt = {}, {}, []
    for m in starts:
        boosted = lp[starts[m] // 3 : starts[m] // 3 + n]
        both = np.stack([clean, boosted], axis=-1)  # [prompt, (orig, new, old), (before, after)]
        probs = np.exp(both)

        def summary(idx: Sequence[int], both: np.ndarray = both, probs: np.ndarray = probs) -> dict[str, Any]:
            out = binding_summary(probs[idx, 1], probs[idx, 2], both[idx, 1], both[idx, 2], tol)
            d_orig = probs[idx, 0, 1] - probs[idx, 0, 0]
            return out | {"mean_delta_original": float(np.mean(d_orig)) if len(idx) else None}

        per_method[m] = summary(list(range(n)))
        per_query[m] = {q: summary([i for i, (qq, _, _) in enumerate(flat) if qq == q]) for q in prompts_by_query}
        for i, (q, p, r) in enumerate(flat):
            rec = r.meta[RELETTER_KEY]
            per_prompt.append({
                "method": m, "query_id": q, "index": p.index, "template": p.template,
                "original_letter": rec["original_letter"], "new_letter": rec["new_letter"],
                **{f"p_{name}_{when}": float(probs[i, k, w]) for k, name in enumerate(("orig", "new", "old"))
                   for w, when in enumerate(("before", "after"))},
            })
    return per_method, per_query, per_prompt
