"""Where per-query work runs: in this process (``SerialExecutor``) or on a cluster (``RayExecutor``).

Attribution is independent per query and selection is a cheap reduce over stored scores, so scaling out is a
scheduling problem. An executor offers two operations:

- ``attribute(jobs, ig, layers)``: for each ``(query_id, prompts)`` job, the query's IG scores and its info,
  yielded as each query finishes (in any order). ``locate`` writes each result to the run store as it
  arrives, so a lost worker loses no finished query.
- ``score_items(items, every_position=..., batch_size=...)``: the evaluation's batched scoring of
  (prompt, intervention) pairs, results in input order.

Example:
    >>> ex = SerialExecutor(model)                                        # doctest: +SKIP
    >>> for qid, scores, info in ex.attribute([(q.id, prompts)], IGConfig(), layers): ...  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol, Sequence

from torch import Tensor

from .attribution import IGConfig, attribute_prompts
from .proxies import Prompt

__all__ = ["Executor", "SerialExecutor", "attribute_query"]

Job = tuple[str, Sequence[Prompt]]


def attribute_query(model: Any, prompts: Sequence[Prompt], ig: IGConfig, layers: Sequence[int]) -> tuple[Tensor, dict[str, Any]]:
    """One query's work: IG scores of its prompts, and how the model did on them (stored with the scores)."""
    from .scoring import score_prompts

    scores = attribute_prompts(model, prompts, ig, layers=list(layers))
    sc = score_prompts(model, prompts)
    info = {
        "group": prompts[0].group,
        "n_tokens": [len(p.tokens) for p in prompts],
        "templates": [p.template for p in prompts],
        "target_probs": [x.target_prob for x in sc],
        "correct": [bool(x.correct) for x in sc],
    }
    return scores, info


class Executor(Protocol):
    def attribute(self, jobs: Sequence[Job], ig: IGConfig, layers: Sequence[int]) -> Iterator[tuple[str, Tensor, dict[str, Any]]]: ...

    def score_items(self, items: Sequence[Any], *, every_position: bool = False, batch_size: int = 8) -> list[Any]: ...


class SerialExecutor:
    """Everything in this process, on the caller's model."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def attribute(self, jobs: Sequence[Job], ig: IGConfig, layers: Sequence[int]) -> Iterator[tuple[str, Tensor, dict[str, Any]]]:
        for qid, prompts in jobs:
            scores, info = attribute_query(self.model, prompts, ig, layers)
            yield qid, scores, info

    def score_items(self, items: Sequence[Any], *, every_position: bool = False, batch_size: int = 8) -> list[Any]:
        from .evaluation import score_items

        return score_items(self.model, items, every_position=every_position, batch_size=batch_size)
