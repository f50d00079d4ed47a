"""Scoring prompts on a model: target probabilities under teacher forcing, predictions, accuracy.

P(target) is the full-vocabulary softmax probability of the target continuation, the product over its
tokens (teacher forcing). Prediction is the argmax over options for MCQA (a multi-token option scores by
its summed log-probability) and the top-1 first answer token for cloze.

Sequences are batched with right padding, which leaves every real position of a causal model exact, and
identical sequences are run once (a letter prompt's options share one forward pass).

Example:
    >>> res = accuracy(model, load_data("builtin:facts", limit=5), ProxyConfig("cloze"))  # doctest: +SKIP
    >>> res.accuracy, res.mean_target_prob                                                 # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .data import Query, groups_of
from .errors import ProxyError
from .models import default_prepend_bos, model_device, tokenizer_of
from .proxies import Prompt, ProxyConfig, build_all_prompts

__all__ = ["PromptScore", "AccuracyResult", "score_prompts", "continuation_logprobs", "accuracy", "pad_batch"]


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


def continuation_logprobs(
    model: Any,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 8,
) -> tuple[list[Float[Tensor, "n_cont"]], list[int]]:
    """Per-token log-probs of each continuation after its prefix, and the top-1 token after each prefix.

    ``requests`` holds (prefix tokens, continuation tokens) pairs. Returns float32 tensors on the CPU.
    """
    seq_of = [tuple(p) + tuple(c[:-1]) for p, c in requests]
    unique = list(dict.fromkeys(seq_of))
    # Longest first keeps padding (and wasted unembedding work) low within a batch.
    order = sorted(range(len(unique)), key=lambda i: -len(unique[i]))
    logp_rows: dict[tuple[int, ...], Tensor] = {}
    device = model_device(model)
    pad = _pad_id(model)
    needed: dict[tuple[int, ...], set[int]] = {}
    for (p, c), s in zip(requests, seq_of):
        needed.setdefault(s, set()).update(range(len(p) - 1, len(p) - 1 + len(c)))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = [unique[i] for i in order[start : start + batch_size]]
            logits = model(pad_batch(batch, pad, device), return_type="logits")
            for b, s in enumerate(batch):
                pos = sorted(needed[s])
                rows = torch.log_softmax(logits[b, pos].float(), dim=-1).cpu()
                logp_rows[s] = (torch.tensor(pos), rows)
    out, top = [], []
    for (p, c), s in zip(requests, seq_of):
        pos, rows = logp_rows[s]
        index = {int(x): i for i, x in enumerate(pos)}
        lp = torch.stack([rows[index[len(p) - 1 + t], tok] for t, tok in enumerate(c)])
        out.append(lp)
        top.append(int(rows[index[len(p) - 1]].argmax()))
    return out, top


def score_prompts(model: Any, prompts: Sequence[Prompt], *, batch_size: int = 8) -> list[PromptScore]:
    """Target log-probability, prediction and correctness of every prompt."""
    requests: list[tuple[Sequence[int], Sequence[int]]] = []
    spans = []
    for pr in prompts:
        first = len(requests)
        requests.append((pr.tokens, pr.target))
        for opt in pr.options or ():
            requests.append((pr.tokens, opt))
        spans.append((first, len(requests)))
    lps, tops = continuation_logprobs(model, requests, batch_size=batch_size)
    scores = []
    for pr, (a, b) in zip(prompts, spans):
        target_lp = float(lps[a].sum())
        if pr.options:
            opt_lp = [float(lps[i].sum()) for i in range(a + 1, b)]
            pred = max(range(len(opt_lp)), key=lambda i: opt_lp[i])
            ok = pred == pr.correct
        else:
            pred = tops[a]
            ok = pred == pr.target[0]
        scores.append(PromptScore(pr.query_id, pr.group, pr.template, target_lp, pred, ok))
    return scores


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
