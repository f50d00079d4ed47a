"""The memory plan of the row engine: how many prompts share a prefix pass, how many rows share a chunk.

Estimates of a pass's peak working memory from the model's shapes (``Dims``): chunks shrink as prompts
grow, so a long prompt stays within ``memory_budget_mb``; ``max_rows`` stays the upper bound. Pure functions;
``backend`` is an engine ``Backend`` name (``"packed"`` shares one prefix per chunk, the others copy it per row).

Example:
    >>> rows_per_chunk(Dims.of(model), "packed", cached=360, tokens_per_row=1, max_rows=240,
    ...                budget=2**30, grad=True)                                      # doctest: +SKIP
    240
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..model.access import model_dtype
from ..protocols import HookedModel

__all__ = ["Dims", "prefix_bytes", "chunk_bytes", "rows_per_chunk", "plan_groups", "plan_chunks", "DEFAULT_MEMORY_BUDGET_MB",
           "DEFAULT_MAX_PREFIX_TOKENS", "weight_bytes", "model_bytes", "QueryPlan", "plan_query"]

# The one default of every ``memory_budget_mb`` (IG, the row engine, scoring): the estimated peak working memory
# of one pass (prefix or row chunk). 1 GB keeps a 2,000-token prompt on SmolLM2 (30 layers, float32) under 4 GB
# RSS with the model loaded, while short prompts keep their full chunks.
DEFAULT_MEMORY_BUDGET_MB = 1024
# Packed rows compute (masked) attention scores against the whole group's prefix: 512 cached positions keep
# that under ~20% of a row token's cost on SmolLM2-sized models while a group still holds several prompts.
DEFAULT_MAX_PREFIX_TOKENS = 512


@dataclass(frozen=True)
class Dims:
    """What a pass's memory depends on: the model's shapes and activation width in bytes."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_mlp: int
    d_vocab: int
    act_bytes: int

    @classmethod
    def of(cls, model: HookedModel) -> "Dims":
        c = model.cfg
        return cls(c.n_layers, c.n_heads, getattr(c, "n_key_value_heads", None) or c.n_heads, c.d_head, c.d_model,
                   c.d_mlp, c.d_vocab, model_dtype(model).itemsize)


# Coefficients measured with torch's allocator (profiler peak) on tiny and SmolLM2-shaped Llama bridges:
# per layer, one attention-score tensor and the prefix keys/values (the cache concatenation and the GQA
# expansion) are kept for backward, ~4 d_mlp + 6 d_model per row token; ~3 score tensors are live at once
# in the layer being computed; ~3-4 float32 vocabulary vectors per row token (logits, log-softmax, their
# gradient). The estimate comes out 1.5x the measured peak, which the allocator's fragmentation eats.
_SCORE_TRANSIENT, _ROW_PER_LAYER, _VOCAB_COPIES, _PREFIX_SCORE_COPIES = 3, (4, 6), 4, 3


def _kv_bytes(d: Dims, positions: int) -> int:
    return d.act_bytes * positions * d.n_layers * 2 * d.n_kv_heads * d.d_head


def prefix_bytes(d: Dims, n_prompts: int, width: int) -> int:
    """Peak of a prefix pass over ``n_prompts`` padded to ``width`` (no gradient, no vocabulary logits)."""
    scores = n_prompts * d.n_heads * width * width
    return d.act_bytes * _PREFIX_SCORE_COPIES * scores + _kv_bytes(d, n_prompts * width)


def chunk_bytes(d: Dims, backend: str, cached: int, row_tokens: int, *, grad: bool, rows_per_seq: int = 1) -> int:
    """Peak of one chunk: ``row_tokens`` row tokens against ``cached`` prefix positions (packed: one sequence
    of all rows; batch: sequences of ``rows_per_seq`` tokens, each with a copy of the prefix)."""
    if backend == "packed":
        seqs, queries, keys = 1, row_tokens, cached + row_tokens
    else:
        seqs = max(1, row_tokens // max(1, rows_per_seq))
        queries, keys = rows_per_seq, cached + rows_per_seq
    scores = seqs * d.n_heads * queries * keys
    kv = seqs * keys * 2 * (d.n_heads + d.n_kv_heads) * d.d_head
    a, b = _ROW_PER_LAYER
    kept = (scores + kv + row_tokens * (a * d.d_mlp + b * d.d_model)) * d.n_layers if grad else 0
    return (d.act_bytes * (kept + _SCORE_TRANSIENT * scores + kv) + 4 * _VOCAB_COPIES * row_tokens * d.d_vocab
            + _kv_bytes(d, cached))


def rows_per_chunk(d: Dims, backend: str, cached: int, tokens_per_row: int, max_rows: int, budget: int, *,
                   grad: bool) -> int:
    """The most rows (of ``tokens_per_row`` tokens) whose chunk fits the budget: at most ``max_rows``, at least 1
    (a budget below one row is exceeded, not refused)."""
    lo, hi = 1, max(1, max_rows)
    while lo < hi:  # the estimate grows with rows: bisect for the largest that fits
        mid = (lo + hi + 1) // 2
        if chunk_bytes(d, backend, cached, mid * tokens_per_row, grad=grad, rows_per_seq=tokens_per_row) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_groups(lengths: Sequence[int], d: Dims, backend: str, budget: int,
                max_prefix_tokens: int = DEFAULT_MAX_PREFIX_TOKENS) -> list[list[int]]:
    """Consecutive prompts whose packed prefix stays within ``max_prefix_tokens`` and whose prefix pass and
    one-row chunk fit the budget (always at least one prompt per group; other backends: one per group)."""
    if backend != "packed":
        return [[i] for i in range(len(lengths))]
    groups: list[list[int]] = []
    for i in range(len(lengths)):
        if groups:
            g = groups[-1] + [i]
            total, width = sum(lengths[j] for j in g), max(lengths[j] for j in g)
            fits = total <= max_prefix_tokens and max(
                prefix_bytes(d, len(g), width), chunk_bytes(d, backend, total, 1, grad=True)) <= budget
            if fits:
                groups[-1] = g
                continue
        groups.append([i])
    return groups


# A forward has a cost per layer that does not scale with its rows (kernel launches, hooks, small-matrix
# inefficiency), worth about this many rows on SmolLM2-sized models on a CPU.
CHUNK_OVERHEAD_ROWS = 16


def plan_chunks(groups: Sequence[tuple[int, int]], n_layers: int, max_rows: int,
                overhead_rows: int = CHUNK_OVERHEAD_ROWS) -> list[list[tuple[int, int, int]]]:
    """Cut rows into chunks that run from their lowest start layer up, at the least total cost.

    ``groups``: (start layer, number of rows) per group of rows that start at the same layer. A chunk runs
    layers ``min start .. n_layers - 1`` for all its rows, so mixing a deep group into a shallow chunk costs
    the deep rows the layers between; a chunk of its own costs ``overhead_rows`` per layer. Returns chunks as
    lists of (group index, first row, number of rows): groups larger than ``max_rows`` are split, and chunks
    hold at most ``max_rows`` rows. Dynamic programming over the groups sorted by start (deepest first).

    >>> plan_chunks([(29, 48), (14, 48), (0, 48)], 30, 240)
    [[(0, 0, 48)], [(1, 0, 48)], [(2, 0, 48)]]
    """
    pieces: list[tuple[int, int, int, int]] = []  # (start, group, first row, rows), deepest first
    for g in sorted(range(len(groups)), key=lambda g: -groups[g][0]):
        start, n = groups[g]
        for first in range(0, n, max_rows):
            pieces.append((start, g, first, min(max_rows, n - first)))
    best = [0.0] + [float("inf")] * len(pieces)
    cut = [0] * (len(pieces) + 1)
    for i in range(1, len(pieces) + 1):
        rows = 0
        for j in range(i - 1, -1, -1):  # chunk = pieces[j:i]; its lowest start is pieces[i - 1]'s
            rows += pieces[j][3]
            if rows > max_rows:
                break
            cost = best[j] + (rows + overhead_rows) * (n_layers - pieces[i - 1][0])
            if cost < best[i]:
                best[i], cut[i] = cost, j
    chunks, i = [], len(pieces)
    while i > 0:
        j = cut[i]
        chunks.append([(g, first, n) for _, g, first, n in pieces[j:i]])
        i = j
    return chunks[::-1]


# ---------------------------------------------------------------- a whole query: weights + the largest pass


def weight_bytes(d: Dims, *, gated: bool = True, tied: bool = False) -> int:
    """The weights of a decoder of shapes ``d`` in its dtype: embeddings (and an untied unembedding), attention
    (q, k, v, o with grouped-query heads), the MLP (3 matrices gated, 2 plain) and the norms."""
    attn = d.d_model * d.d_head * (2 * d.n_heads + 2 * d.n_kv_heads)
    mlp = (3 if gated else 2) * d.d_model * d.d_mlp
    embed = d.d_vocab * d.d_model * (1 if tied else 2)
    return d.act_bytes * (embed + d.n_layers * (attn + mlp + 2 * d.d_model) + d.d_model)


def model_bytes(model: HookedModel) -> int:
    """The bytes of a loaded model's parameters and buffers, each storage counted once (tied weights, views)."""
    seen: dict[int, int] = {}
    tensors = list(model.parameters()) + list(getattr(model, "buffers", lambda: [])())
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


@dataclass(frozen=True)
class QueryPlan:
    """The plan of one query's fast IG on the packed engine: its passes and their estimated peaks."""

    passes: list[list[int]]  # prompt indices per prefix pass
    rows_per_chunk: list[int]  # per pass
    prefix_bytes: list[int]  # per pass
    chunk_bytes: list[int]  # per pass, at the largest chunk it runs
    weights: int

    @property
    def working(self) -> int:
        """The largest pass: what the budget bounds."""
        return max(max(self.prefix_bytes), max(self.chunk_bytes))

    @property
    def peak(self) -> int:
        return self.weights + self.working

    def to_dict(self) -> dict[str, object]:
        mb = 2**20
        return {"passes": self.passes, "rows_per_chunk": self.rows_per_chunk,
                "prefix_mb": [b / mb for b in self.prefix_bytes], "chunk_mb": [b / mb for b in self.chunk_bytes],
                "weights_mb": self.weights / mb, "working_mb": self.working / mb, "peak_mb": self.peak / mb}


def plan_query(d: Dims, prompt_tokens: Sequence[int], target_tokens: int, steps: int, n_attributed: int,
               budget: int, max_rows: int = 240, *, gated: bool = True, tied: bool = False,
               weights: int | None = None) -> QueryPlan:
    """What ``attribute_prompts`` will do for one query of prompts of ``prompt_tokens`` tokens (targets of
    ``target_tokens``), ``steps`` IG steps on ``n_attributed`` layers: its prefix passes (``plan_groups``),
    rows per chunk (``rows_per_chunk``) and the peaks; ``weights`` defaults to ``weight_bytes``."""
    lengths = [n - 1 for n in prompt_tokens]
    groups = plan_groups(lengths, d, "packed", budget, max(DEFAULT_MAX_PREFIX_TOKENS, max(lengths)))
    rows, pre, chunk = [], [], []
    for g in groups:
        cached = sum(lengths[i] for i in g)
        per = rows_per_chunk(d, "packed", cached, target_tokens, max_rows, budget, grad=True)
        biggest = min(per, len(g) * n_attributed * steps)
        rows.append(per)
        pre.append(prefix_bytes(d, len(g), max(lengths[i] for i in g) + target_tokens))
        chunk.append(chunk_bytes(d, "packed", cached, biggest * target_tokens, grad=True))
    return QueryPlan(groups, rows, pre, chunk, weight_bytes(d, gated=gated, tied=tied) if weights is None else weights)
