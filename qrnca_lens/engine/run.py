"""``run_rows``: many rows over many prompts, grouped behind prefix passes and cut into chunks by depth."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from ..errors import QrncaError
from ..model.hooks import refuse_caller_hooks
from ..protocols import HookedModel
from .checks import ENGINE_WAY_OUT, CleanRowCheck, skipping_is_exact
from .plan import DEFAULT_MAX_PREFIX_TOKENS, DEFAULT_MEMORY_BUDGET_MB, Dims, plan_chunks, plan_groups, rows_per_chunk
from .prefix import Backend, Prefix, Row, backend_of

__all__ = ["run_rows", "Reduce", "plan_row_chunks"]


Reduce = Callable[[Row, Tensor, dict[str, Tensor]], Any]
R = TypeVar("R")


def plan_row_chunks(prefix: Prefix, by_start: Sequence[tuple[int, Sequence[R]]], tokens_per_row: int, max_rows: int,
                    budget: int, *, grad: bool) -> list[tuple[int, list[R]]]:
    """The chunks rows behind ``prefix`` run in, one forward each: ``(start layer, rows)`` per chunk.

    ``by_start``: (start layer, rows) per group of rows that start at the same layer. A chunk holds at most the
    rows the memory plan allows: ``rows_per_chunk`` for rows of ``tokens_per_row`` tokens against the prefix's
    cached positions within ``budget`` bytes, ``grad`` when a backward runs through them (IG keeps every
    layer's activations for it, so its chunks are smaller), never more than ``max_rows``. A chunk starts at
    the lowest start of its rows; depths mix where that costs less than another forward (``plan_chunks``).
    The one planner of ``run_rows`` and IG's fast path.

    Example:
        >>> plan_row_chunks(prefix, [(2, ["a", "b"]), (0, ["c"])], 1, 240, 2**30, grad=False)  # doctest: +SKIP
        [(2, ['a', 'b']), (0, ['c'])]
    """
    cached = prefix.C if prefix.backend == "packed" else max(prefix.P)
    per = rows_per_chunk(Dims.of(prefix.model), prefix.backend, cached, tokens_per_row, max_rows, budget, grad=grad)
    pieces = plan_chunks([(start, len(rows)) for start, rows in by_start], prefix.L, per)
    return [(min(by_start[g][0] for g, _, _ in piece),
             [row for g, first, n in piece for row in by_start[g][1][first : first + n]]) for piece in pieces]


def run_rows(
    model: HookedModel,
    prompts: Sequence[Sequence[int]],
    rows: Sequence[Row],
    reduce: Reduce,
    *,
    capture_names: Sequence[str] = (),
    memory_budget_mb: int = DEFAULT_MEMORY_BUDGET_MB,
    max_rows: int = 256,
    max_prefix_tokens: int = DEFAULT_MAX_PREFIX_TOKENS,
    backend: Backend | None = None,
    check: bool = True,
) -> list[Any]:
    """``reduce(row, logprobs [T, vocab], acts {name: [T, width]})`` for every row, in row order (no gradient).

    Rows of each prompt group run behind one prefix pass, sorted by start layer into chunks planned by the
    memory budget; identical rows run once; clean rows come from the clean pass that also records the
    residuals the other rows start from. ``backend``: the model's own by default (``backend_of``); ``"full"``
    runs every row as a full sequence (the oracle).
    """
    if not rows:
        return []
    for r in rows:
        if not 0 <= r.prompt < len(prompts):
            raise QrncaError(f"row of prompt {r.prompt}: there are {len(prompts)} prompts")
        if not r.tokens:
            raise QrncaError("a row needs at least one token (the prompt's last token)")
    refuse_caller_hooks(model, ENGINE_WAY_OUT)
    backend = backend or backend_of(model)
    d, budget = Dims.of(model), memory_budget_mb * 2**20
    out: list[Any] = [None] * len(rows)
    unique = list(dict.fromkeys(rows))
    where = {row: i for i, row in enumerate(unique)}
    by_prompt: dict[int, list[int]] = {}
    for i, row in enumerate(unique):
        by_prompt.setdefault(row.prompt, []).append(i)
    used = sorted(by_prompt)
    results: list[Any] = [None] * len(unique)
    groups = plan_groups([len(prompts[p]) - 1 for p in used], d, backend, budget, max_prefix_tokens)
    with torch.no_grad():
        for g in groups:
            members = [used[j] for j in g]
            _run_group(model, prompts, members, [i for p in members for i in by_prompt[p]], unique, results, reduce,
                       capture_names=capture_names, backend=backend, check=check, max_rows=max_rows, budget=budget)
    for j, row in enumerate(rows):
        out[j] = results[where[row]]
    return out


def _run_group(model: HookedModel, prompts: Sequence[Sequence[int]], members: list[int], mine: list[int],
               unique: list[Row], results: list[Any], reduce: Reduce, *, capture_names: Sequence[str],
               backend: Backend, check: bool, max_rows: int, budget: int) -> None:
    """One prompt group of ``run_rows``: its prefix pass, the self-check, then its rows chunk by chunk into
    ``results`` (indexed like ``unique``)."""
    local = {p: k for k, p in enumerate(members)}
    lrows = {i: Row(local[unique[i].prompt], unique[i].tokens, unique[i].scale) for i in mine}
    # Each prompt's first row's tokens ride along in the prefix pass: its plain logits check that row.
    firsts: dict[int, Row] = {}
    for r in lrows.values():
        firsts.setdefault(r.prompt, r.clean())
    prefix = Prefix(model, [prompts[p] for p in members], backend=backend,
                    continuations=[firsts[b].tokens[1:] for b in range(len(members))])
    # The clean pass: clean rows' results, and the residuals every other row starts from.
    clean_lp, acts, clean_at = prefix.clean_pass(list(lrows.values()), capture_names)
    if check:
        self_check = CleanRowCheck(prefix, ENGINE_WAY_OUT)
        for b in (range(len(members)) if prefix.plain is not None else [0]):
            s, T = clean_at[firsts[b]]
            self_check.add(b, clean_lp[s : s + T], firsts[b].tokens, f"the clean row of prompt {members[b]}")
        self_check.verify()
    skip = skipping_is_exact(prefix)
    by_start: dict[int, list[int]] = {}
    for i, r in lrows.items():
        if r.start is None:
            s, T = clean_at[r.clean()]
            results[i] = reduce(unique[i], clean_lp[s : s + T], {n: acts[n][s : s + T] for n in capture_names})
        else:
            by_start.setdefault(r.start if skip else 0, []).append(i)
    if not by_start:
        return
    # Rows of similar depth and length share a chunk; the memory plan bounds its rows.
    tokens_per_row = max(len(lrows[i].tokens) for ids in by_start.values() for i in ids)
    for i_list in by_start.values():
        i_list.sort(key=lambda i: (lrows[i].prompt, len(lrows[i].tokens)))
    for start, chunk in plan_row_chunks(prefix, sorted(by_start.items()), tokens_per_row, max_rows, budget, grad=False):
        crow = [lrows[i] for i in chunk]
        chunk_acts: dict[str, Tensor] = {}
        lp = prefix.forward(crow, start=start, capture_names=capture_names, acts_out=chunk_acts)
        k = 0
        for i, r in zip(chunk, crow):
            T = len(r.tokens)
            results[i] = reduce(unique[i], lp[k : k + T], {n: chunk_acts[n][k : k + T] for n in capture_names})
            k += T
