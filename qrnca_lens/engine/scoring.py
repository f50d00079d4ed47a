"""Scoring prompts on a model: target probabilities under teacher forcing, predictions, accuracy.

P(target) is the full-vocabulary softmax probability of the target continuation, the product over its
tokens (teacher forcing). Prediction is the argmax over options for MCQA (a multi-token option scores by
its summed log-probability) and the top-1 first answer token for cloze.

Sequences are batched with right padding, which leaves every real position of a causal model exact, and
identical sequences are run once (a letter prompt's options share one forward pass). ``score_items`` is the
one batched scorer: each row may carry its own intervention (the evaluation's boost/suppress rows).

Memory stays bounded on long prompts: a batch holds at most ``max_batch_tokens`` padded tokens (a longer
sequence runs alone), and the forward stops before the final norm, so full-vocabulary logits are computed
only at the few positions that are read, not at every position of every row. Sequences longer than the
model's context (``cfg.n_ctx``) are refused with the prompt named.

Progress: ``score_items``, ``score_prompts`` and ``accuracy`` show a tqdm bar (``progress=True``, the default)
when their work takes more than one step (``progress_bar``); ``progress=False`` keeps them quiet.

Example:
    >>> res = accuracy(model, load_data("builtin:facts", limit=5), ProxyConfig("cloze"))  # doctest: +SKIP
    >>> res.accuracy, res.mean_target_prob                                                 # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from ..config import Config
from ..data.prompts import Prompt, ProxyConfig, build_all_prompts, cloze_chance
from ..data.queries import QueriesLike, Query, as_queries, groups_of
from ..engine import DEFAULT_MEMORY_BUDGET_MB, Backend, Row, Scale, backend_of, choose_backend, run_rows
from ..engine.plan import DEFAULT_MAX_PREFIX_TOKENS, Dims, plan_groups
from ..errors import ProxyError
from ..model.access import default_prepend_bos, model_device, pad_batch, pad_token_id, tokenizer_of
from ..model.interventions import Intervention, check_neurons, row_factors, scale_rows
from ..model.readout import logprobs_at
from ..protocols import HookedModel

__all__ = [
    "PromptScore", "ItemScore", "AccuracyResult", "score_prompts", "score_items", "accuracy",
    "batch_plan", "check_context", "progress_bar", "DEFAULT_MAX_BATCH_TOKENS",
]

T = TypeVar("T")


def progress_bar(steps: Iterable[T], total: int, desc: str, *, enabled: bool = True, unit: str = "step",
                 leave: bool = True) -> Iterable[T]:
    """``steps`` under a ``tqdm.auto`` bar (stderr, or a notebook widget) when ``enabled`` and there is more
    than one step; else ``steps`` as they are: a single step has nothing to show. ``leave=False``: an inner
    bar that disappears when done.

    Example:
        >>> list(progress_bar(range(3), 3, "demo", enabled=False))
        [0, 1, 2]
    """
    if not enabled or total <= 1:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, total=total, desc=desc, unit=unit, leave=leave)

# Padded tokens per scoring forward. Without vocabulary logits a token costs a few residual-sized vectors,
# but attention grows with rows x width^2: 2,048 keeps a 2,000-token prompt to one row (~0.5 GB of scores
# on SmolLM2) while short prompts still batch by the row cap.
DEFAULT_MAX_BATCH_TOKENS = 2048


@dataclass(frozen=True)
class PromptScore:
    """One prompt's score: the target's log-probability, the prediction and whether it is right.

    Example:
        >>> s = PromptScore("q1", "g", template=0, target_logprob=math.log(0.5), predicted=2, correct=True)
        >>> round(s.target_prob, 6)
        0.5
    """

    query_id: str
    group: str
    template: int
    target_logprob: float
    predicted: int  # option index (MCQA) or token id (cloze)
    correct: bool

    @property
    def target_prob(self) -> float:
        return math.exp(self.target_logprob)


@dataclass(frozen=True)
class ItemScore:
    target_logprob: float
    predicted: int
    correct: bool


def batch_plan(lengths: Sequence[int], *, max_rows: int, max_tokens: int) -> list[list[int]]:
    """Group sequence indices, longest first, into batches of at most ``max_rows`` rows whose padded size
    (rows x longest length) stays within ``max_tokens``; a sequence longer than the budget runs alone."""
    if max_rows < 1 or max_tokens < 1:
        raise ProxyError(f"batch limits must be at least 1, got max_rows={max_rows}, max_tokens={max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < max_rows and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def check_context(model: HookedModel, prompts: Sequence[Prompt]) -> None:
    """Refuse a prompt whose scored sequence (prompt + teacher-forced answer) exceeds the model's context."""
    limit = getattr(getattr(model, "cfg", None), "n_ctx", None)
    if not limit:
        return
    for pr in prompts:
        n = len(pr.tokens) + max(len(c) for c in [pr.target, *(pr.options or ())]) - 1
        if n > limit:
            raise ProxyError(
                f"prompt {pr.template} of query {pr.query_id!r} is {n} tokens (prompt + answer), longer than the "
                f"model's context of {limit} tokens (cfg.n_ctx); shorten the question, use fewer in-context "
                "examples (--shots), or a model with a longer context"
            )


def score_items(
    model: HookedModel,
    items: Sequence[tuple[Prompt, Intervention]],
    *,
    every_position: bool = False,
    batch_size: int = 8,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    engine: bool = True,
    memory_budget_mb: int = DEFAULT_MEMORY_BUDGET_MB,
    progress: bool = True,
) -> list[ItemScore]:
    """Score each (prompt, intervention) pair: target log-prob, prediction, correctness.

    An intervention ``(neurons, factor)`` multiplies the (layer, neuron) activations of the attributed hook
    at the prompt's last position (``every_position``: at every position). Last-position items go through the
    row engine (``engine``): each distinct prompt's prefix runs once, each item is a short row behind it, rows
    start at their lowest intervened layer. ``every_position`` (or ``engine=False``) runs full sequences,
    ``batch_size`` rows and ``max_batch_tokens`` padded tokens per forward. Both give the same numbers (tested).
    ``progress``: a bar over the engine's prefix groups (or the full path's batches) when there are several.

    Example:
        >>> scored = score_items(model, [(prompt, None), (prompt, ([(3, 7)], 2.0))], progress=False)  # doctest: +SKIP
        >>> scored[1].target_logprob - scored[0].target_logprob   # what doubling neuron 7 of layer 3 did  # doctest: +SKIP
    """
    check_context(model, [pr for pr, _ in items])
    # Models without a prefix cache (TL-native bridges) gain nothing from rows: full sequences, logits only
    # at the positions read. An intervention at every position is not a row's.
    backend = choose_backend(model, fast=engine and not every_position)
    if backend == "full":
        return _score_items_full(model, items, every_position=every_position, batch_size=batch_size,
                                 max_batch_tokens=max_batch_tokens, progress=progress)
    return _score_items_rows(model, items, memory_budget_mb, progress, backend)


def _scale_of(model: HookedModel, iv: Intervention) -> Scale:
    if iv is None:
        return ()
    neurons, factor = iv
    return tuple((layer, tuple(idx), float(factor)) for layer, idx in sorted(check_neurons(model, neurons).items()))


def _engine_steps(model: HookedModel, prompts: Sequence[Sequence[int]], memory_budget_mb: int,
                  backend: Backend | None = None) -> list[list[int]]:
    """The engine's own prefix groups of these prompts (``plan_groups``, as ``run_rows`` plans them): running
    one group per ``run_rows`` call computes exactly what one call over all of them does, step by step."""
    return plan_groups([len(p) - 1 for p in prompts], Dims.of(model), backend or backend_of(model),
                       memory_budget_mb * 2**20, DEFAULT_MAX_PREFIX_TOKENS)


def _score_items_rows(model: HookedModel, items: Sequence[tuple[Prompt, Intervention]], memory_budget_mb: int,
                      progress: bool = False, backend: Backend | None = None) -> list[ItemScore]:
    """Every item as engine rows: one row per distinct teacher-forced prefix of its target and options."""
    prompt_ids: dict[tuple[int, ...], int] = {}
    rows: list[Row] = []
    reads: dict[Row, set[tuple[int, int]]] = {}
    plans = []
    scales: dict[int, Scale] = {}
    for pr, iv in items:
        b = prompt_ids.setdefault(tuple(pr.tokens), len(prompt_ids))
        scale = scales.get(id(iv)) if iv is not None else ()
        if scale is None:
            scale = scales[id(iv)] = _scale_of(model, iv)
        plan = []
        for cont in [pr.target, *(pr.options or ())]:
            row = Row(b, (pr.tokens[-1], *cont[:-1]), scale)
            reads.setdefault(row, set()).update(enumerate(cont))
            rows.append(row)
            plan.append((row, tuple(cont)))
        plans.append(plan)
    prompts = [list(t) for t in prompt_ids]

    def reduce(row: Row, lp: Tensor, acts: Any) -> tuple[dict[tuple[int, int], float], int]:
        want = sorted(reads[row])
        t = torch.tensor([w[0] for w in want], device=lp.device)
        tok = torch.tensor([w[1] for w in want], device=lp.device)
        return dict(zip(want, lp[t, tok].tolist())), int(lp[0].argmax())

    steps = _engine_steps(model, prompts, memory_budget_mb, backend) if progress else [list(range(len(prompts)))]
    got: dict[Row, Any] = {}
    for group in progress_bar(steps, len(steps), "scoring", enabled=progress, unit="prefix"):
        members = set(group)
        mine = list(dict.fromkeys(r for r in rows if r.prompt in members))
        got.update(zip(mine, run_rows(model, prompts, mine, reduce, memory_budget_mb=memory_budget_mb, backend=backend)))
    out = []
    for (pr, _), plan in zip(items, plans):
        vals = [sum(got[row][0][(t, tok)] for t, tok in enumerate(cont)) for row, cont in plan]
        if pr.options:
            pred = int(np.argmax(vals[1:]))
            ok = pred == pr.correct
        else:
            pred = got[plan[0][0]][1]
            ok = pred == pr.target[0]
        out.append(ItemScore(vals[0], pred, bool(ok)))
    return out


def _score_items_full(
    model: HookedModel,
    items: Sequence[tuple[Prompt, Intervention]],
    *,
    every_position: bool = False,
    batch_size: int = 8,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    progress: bool = False,
) -> list[ItemScore]:
    """Full-sequence scoring: every (prompt, intervention) pair runs its whole sequence (the oracle, and the
    path for interventions at every position). A batch holds at most ``batch_size`` rows and
    ``max_batch_tokens`` padded tokens; identical rows (same tokens, same intervention object) run once."""
    needed: dict[tuple, set[int]] = {}
    row_iv: dict[tuple, Intervention] = {}
    plans = []
    for pr, iv in items:
        pos = pr.target_position
        plan = []
        for cont in [pr.target, *(pr.options or ())]:
            key = (tuple(pr.tokens) + tuple(cont[:-1]), id(iv), pos)
            needed.setdefault(key, set()).update(range(pos, pos + len(cont)))
            row_iv[key] = iv
            plan.append((key, tuple(cont)))
        plans.append(plan)
    keys = list(needed)
    tables: dict[tuple, dict[int, torch.Tensor]] = {}
    device, pad = model_device(model), pad_token_id(model)
    batches = batch_plan([len(k[0]) for k in keys], max_rows=batch_size, max_tokens=max_batch_tokens)
    with torch.no_grad():
        for idx in progress_bar(batches, len(batches), "scoring", enabled=progress, unit="batch"):
            batch = [keys[i] for i in idx]
            positions = None if every_position else torch.tensor([k[2] for k in batch], device=device)
            pos_lists = [sorted(needed[k]) for k in batch]
            with scale_rows(model, row_factors(model, [row_iv[k] for k in batch]), positions):
                lps = logprobs_at(model, pad_batch([k[0] for k in batch], pad, device), pos_lists)
            for k, pos_list, lp in zip(batch, pos_lists, lps):
                lp = lp.cpu()
                tables[k] = {p: lp[i] for i, p in enumerate(pos_list)}
    out = []
    for (pr, _), plan in zip(items, plans):
        pos = pr.target_position
        vals = [sum(float(tables[k][pos + t][tok]) for t, tok in enumerate(cont)) for k, cont in plan]
        if pr.options:
            pred = int(np.argmax(vals[1:]))
            ok = pred == pr.correct
        else:
            pred = int(tables[plan[0][0]][pos].argmax())
            ok = pred == pr.target[0]
        out.append(ItemScore(vals[0], pred, bool(ok)))
    return out


def score_prompts(model: HookedModel, prompts: Sequence[Prompt], *, batch_size: int = 8,
                  max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, engine: bool = True,
                  progress: bool = True) -> list[PromptScore]:
    """Score every prompt, without intervention: target log-probability, prediction, correctness.

    Args:
        model: the TL model.
        prompts: the prompts (from ``build_prompts``, or a run's stored ones).
        batch_size: rows per forward pass.
        max_batch_tokens: cap on padded tokens per batch (a longer sequence runs alone).
        engine: run on the row engine (shared prefixes run once); False runs full sequences.
        progress: a bar when the scoring takes more than one step.

    Returns:
        One ``PromptScore`` per prompt, in order.

    Example:
        >>> scores = score_prompts(model, prompts)          # doctest: +SKIP
        >>> len(scores), 0 < scores[0].target_prob <= 1     # doctest: +SKIP
        (3, True)
    """
    scores = score_items(model, [(p, None) for p in prompts], batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                         engine=engine, progress=progress)
    return [PromptScore(p.query_id, p.group, p.template, s.target_logprob, s.predicted, s.correct)
            for p, s in zip(prompts, scores)]


@dataclass
class AccuracyResult(Config):
    """A model's competence on a proxy: accuracy over prompts and the mean target probability.

    ``to_dict`` / ``from_dict`` are the base's (``proxy`` is the proxy config as a dict).

    Example:
        >>> res = AccuracyResult(accuracy=0.5, mean_target_prob=0.25, n=4, n_queries=2, chance=None,
        ...                      proxy={"kind": "cloze"}, prepend_bos=False)
        >>> print(res)
        cloze: accuracy 0.500, mean target probability 0.2500 over 4 prompts of 2 queries
    """

    accuracy: float
    mean_target_prob: float
    n: int
    n_queries: int
    chance: float | None
    proxy: dict[str, Any]
    prepend_bos: bool
    per_group: dict[str, dict[str, float]] = field(default_factory=dict)

    def __str__(self) -> str:
        chance = f" (chance {self.chance:.2f})" if self.chance is not None else ""
        lines = [
            f"{self.proxy['kind']}: accuracy {self.accuracy:.3f}{chance}, mean target probability "
            f"{self.mean_target_prob:.4f} over {self.n} prompts of {self.n_queries} queries"
        ]
        for g, r in self.per_group.items():
            ch = f"  chance {r['chance']:.2f}" if r.get("chance") is not None else ""
            lines.append(f"  {g:<20} accuracy {r['accuracy']:.3f}{ch}  mean p {r['mean_target_prob']:.4f}  n {int(r['n'])}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{g}</td><td>{r['accuracy']:.3f}</td><td>{r['mean_target_prob']:.4f}</td><td>{int(r['n'])}</td></tr>"
            for g, r in self.per_group.items()
        )
        return (
            f"<b>{self.proxy['kind']}</b>: accuracy {self.accuracy:.3f}, mean target p {self.mean_target_prob:.4f}, "
            f"n={self.n}<table><tr><th>group</th><th>accuracy</th><th>mean p</th><th>n</th></tr>{rows}</table>"
        )


def _cloze_chances(prompts: Sequence[Prompt], pool: Sequence[Query], tokenizer: Any,
                   bos: bool) -> tuple[float | None, dict[str, float]]:
    """``proxies.cloze_chance`` of every prompt against its group in ``pool``: the mean over all prompts (None
    if no prompt has one) and each group's mean."""
    members = groups_of(list(pool))
    by_group: dict[str, list[float]] = {}
    for p in prompts:
        c = cloze_chance(p, [o for o in members.get(p.group, []) if o.id != p.query_id], tokenizer, bos)
        if c is not None:
            by_group.setdefault(p.group, []).append(c)
    every = [c for cs in by_group.values() for c in cs]
    return (sum(every) / len(every) if every else None), {g: sum(cs) / len(cs) for g, cs in by_group.items()}


def _summary(scores: Sequence[PromptScore]) -> dict[str, float]:
    return {
        "accuracy": sum(s.correct for s in scores) / len(scores),
        "mean_target_prob": sum(s.target_prob for s in scores) / len(scores),
        "n": float(len(scores)),
    }


def accuracy(
    model: HookedModel,
    queries: QueriesLike,
    cfg: ProxyConfig,
    *,
    pool: Sequence[Query] | None = None,
    batch_size: int = 8,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    progress: bool = True,
    engine: bool = True,
) -> AccuracyResult:
    """Is the model competent on this proxy? Check before attributing: chance-level answers measure noise.

    Args:
        model: the TL model.
        queries: the queries to score.
        cfg: the proxy that builds their prompts.
        pool: distractors and in-context examples (default: ``queries``).
        batch_size: rows per forward pass.
        max_batch_tokens: cap on padded tokens per batch.
        progress: a bar over the chunks of prompts, when there are several.
        engine: score on the row engine (default); False runs full sequences (the way around the engine's
            refusal of your own hooks on the model, which it would apply at other positions).

    Returns:
        An ``AccuracyResult``: accuracy over all prompts, mean target probability, chance level, and the
        same per group. Chance is 1 / options for MCQA; for cloze, the rate at which a random other answer
        of the query's group (in ``pool``) starts with the target token (``proxies.cloze_chance``), per group
        too.

    Example:
        >>> res = accuracy(model, load_data("builtin:facts", limit=5), ProxyConfig("cloze"))  # doctest: +SKIP
        >>> res.n, res.n_queries, sorted(res.per_group)[0]                                     # doctest: +SKIP
        (75, 25, 'capital')
    """
    queries = as_queries(queries)
    if not queries:
        raise ProxyError("no queries to score (the data set is empty)")
    bos = cfg.prepend_bos if cfg.prepend_bos is not None else default_prepend_bos(model)
    prompts_by_q = build_all_prompts(queries, cfg, tokenizer_of(model), prepend_bos=bos, pool=pool)
    prompts = [p for ps in prompts_by_q.values() for p in ps]
    check_context(model, prompts)  # before any work: a too-long prompt late in the data fails now
    scores: list[PromptScore] = []
    step = max(batch_size * 4, 1)
    chunks = range(0, len(prompts), step)
    for start in progress_bar(chunks, len(chunks), f"scoring {cfg.kind}", enabled=progress, unit="chunk"):
        scores.extend(score_prompts(model, prompts[start : start + step], batch_size=batch_size,
                                    max_batch_tokens=max_batch_tokens, engine=engine, progress=False))
    per_group = {g: _summary([s for s in scores if s.group == g]) for g in groups_of(list(queries))}
    total = _summary(scores)
    n_opts = {len(p.options) for p in prompts if p.options}
    chance = 1.0 / n_opts.pop() if len(n_opts) == 1 else None
    if cfg.kind == "cloze":
        chance, group_chance = _cloze_chances(prompts, pool if pool is not None else queries, tokenizer_of(model), bos)
        for g, c in group_chance.items():
            per_group[g]["chance"] = c
    return AccuracyResult(
        accuracy=total["accuracy"], mean_target_prob=total["mean_target_prob"], n=len(scores),
        n_queries=len(queries), chance=chance, proxy=cfg.to_dict(), prepend_bos=bos, per_group=per_group,
    )
