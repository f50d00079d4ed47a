"""Scoring prompts on a model: target probabilities under teacher forcing, predictions, accuracy.

P(target) is the full-vocabulary softmax probability of the target continuation, the product over its
tokens (teacher forcing). Prediction is the argmax over options for MCQA (a multi-token option scores by
its summed log-probability) and the top-1 first answer token for cloze.

Sequences are batched with right padding, which leaves every real position of a causal model exact, and
identical sequences are run once (a letter prompt's options share one forward pass). ``score_items`` is the
one batched scorer: each row may carry its own intervention (the evaluation's boost/suppress rows).

Example:
    >>> res = accuracy(model, load_data("builtin:facts", limit=5), ProxyConfig("cloze"))  # doctest: +SKIP
    >>> res.accuracy, res.mean_target_prob                                                 # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from .data import Query, groups_of
from .errors import ProxyError
from .interventions import row_factors, scale_rows
from .models import default_prepend_bos, model_device, tokenizer_of
from .proxies import Prompt, ProxyConfig, build_all_prompts

__all__ = ["PromptScore", "ItemScore", "AccuracyResult", "score_prompts", "score_items", "accuracy", "pad_batch"]


@dataclass(frozen=True)
class PromptScore:
    query_id: str
    group: str
    template: int
    target_logprob: float
    predicted: int  # option index (MCQA) or token id (cloze)
    correct: bool

    @property
    def target_prob(self) -> float:
        return math.exp(self.target_logprob)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> Int[Tensor, "batch seq"]:
    """Right-pad token lists into one tensor (exact for the real positions of a causal model)."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    return out.to(device)


def _pad_id(model: Any) -> int:
    tok = tokenizer_of(model)
    for cand in (tok.pad_token_id, tok.eos_token_id, 0):
        if cand is not None:
            return int(cand)
    return 0


Intervention = tuple[Sequence[Sequence[int]], float] | None  # (neurons, factor)


@dataclass(frozen=True)
class ItemScore:
    target_logprob: float
    predicted: int
    correct: bool


def score_items(
    model: Any,
    items: Sequence[tuple[Prompt, Intervention]],
    *,
    every_position: bool = False,
    batch_size: int = 8,
) -> list[ItemScore]:
    """Score each (prompt, intervention) pair: target log-prob, prediction, correctness; rows batched.

    A row's intervention acts at its own last prompt position (or at every position), on its own neurons.
    Identical rows (same tokens, same intervention object) run once: a letter prompt's options share a row.
    """
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
    keys = sorted(needed, key=lambda k: -len(k[0]))  # longest first: little padding within a batch
    tables: dict[tuple, dict[int, torch.Tensor]] = {}
    device, pad = model_device(model), _pad_id(model)
    with torch.no_grad():
        for start in range(0, len(keys), batch_size):
            batch = keys[start : start + batch_size]
            positions = None if every_position else torch.tensor([k[2] for k in batch], device=device)
            with scale_rows(model, row_factors(model, [row_iv[k] for k in batch]), positions):
                logits = model(pad_batch([k[0] for k in batch], pad, device), return_type="logits")
            for b, k in enumerate(batch):
                pos_list = sorted(needed[k])
                lp = torch.log_softmax(logits[b, pos_list].float(), dim=-1).cpu()
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


def score_prompts(model: Any, prompts: Sequence[Prompt], *, batch_size: int = 8) -> list[PromptScore]:
    """Target log-probability, prediction and correctness of every prompt (no intervention)."""
    scores = score_items(model, [(p, None) for p in prompts], batch_size=batch_size)
    return [PromptScore(p.query_id, p.group, p.template, s.target_logprob, s.predicted, s.correct)
            for p, s in zip(prompts, scores)]


@dataclass
class AccuracyResult:
    """A model's competence on a proxy: accuracy over prompts and the mean target probability."""

    accuracy: float
    mean_target_prob: float
    n: int
    n_queries: int
    chance: float | None
    proxy: dict[str, Any]
    prepend_bos: bool
    per_group: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AccuracyResult":
        return cls(**d)

    def __str__(self) -> str:
        chance = f" (chance {self.chance:.2f})" if self.chance is not None else ""
        lines = [
            f"{self.proxy['kind']}: accuracy {self.accuracy:.3f}{chance}, mean target probability "
            f"{self.mean_target_prob:.4f} over {self.n} prompts of {self.n_queries} queries"
        ]
        for g, r in self.per_group.items():
            lines.append(f"  {g:<20} accuracy {r['accuracy']:.3f}  mean p {r['mean_target_prob']:.4f}  n {int(r['n'])}")
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


def _summary(scores: Sequence[PromptScore]) -> dict[str, float]:
    return {
        "accuracy": sum(s.correct for s in scores) / len(scores),
        "mean_target_prob": sum(s.target_prob for s in scores) / len(scores),
        "n": float(len(scores)),
    }


def accuracy(
    model: Any,
    queries: Sequence[Query],
    cfg: ProxyConfig,
    *,
    pool: Sequence[Query] | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> AccuracyResult:
    """Is the model competent on this proxy? Check before attributing: chance-level answers measure noise."""
    if not queries:
        raise ProxyError("no queries to score (the data set is empty)")
    bos = cfg.prepend_bos if cfg.prepend_bos is not None else default_prepend_bos(model)
    prompts_by_q = build_all_prompts(queries, cfg, tokenizer_of(model), prepend_bos=bos, pool=pool)
    prompts = [p for ps in prompts_by_q.values() for p in ps]
    scores: list[PromptScore] = []
    step = max(batch_size * 4, 1)
    chunks = range(0, len(prompts), step)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=f"scoring {cfg.kind}", unit="chunk")
    for start in chunks:
        scores.extend(score_prompts(model, prompts[start : start + step], batch_size=batch_size))
    per_group = {g: _summary([s for s in scores if s.group == g]) for g in groups_of(list(queries))}
    total = _summary(scores)
    n_opts = {len(p.options) for p in prompts if p.options}
    chance = 1.0 / n_opts.pop() if len(n_opts) == 1 else None
    return AccuracyResult(
        accuracy=total["accuracy"], mean_target_prob=total["mean_target_prob"], n=len(scores),
        n_queries=len(queries), chance=chance, proxy=cfg.to_dict(), prepend_bos=bos, per_group=per_group,
    )
