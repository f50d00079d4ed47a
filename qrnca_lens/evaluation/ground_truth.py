"""Ground truth for single neurons: the exact effect of scaling ONE neuron, and how well each locator agrees.

A neuron's **effect** at factor ``f`` on a prompt is ``log p'(t) - log p(t)``: the change of the first target
token's full-vocabulary log-probability at the prompt's last position when that one neuron's attributed
activation (``models.mlp_hook_name``: ``hook_pre_linear`` on gated models, else ``hook_pre``) is multiplied
by ``f`` at that position only (0 = zero-ablation, 2 = doubling); a query's effect is the mean over its
prompts. Every effect is measured, not estimated: one engine row per (prompt, neuron, factor), started at the
neuron's layer (exact: the engine checks itself against a plain forward).

``ground_truth`` measures a candidate set per query (the union of every locator's top-k plus as many seeded
random neurons) and scores each locator against the true top-k by |zero-ablation effect|: precision@k,
recall@k, Spearman and the false-negative rate (``metrics``).

Example:
    >>> sets = neuron_sets(["qrnca", "kn", "random"], ctx)                          # doctest: +SKIP
    >>> res = ground_truth(model, ctx.queries, ctx.prompts, sets, k=50, layers=run.layers)  # doctest: +SKIP
    >>> res.to_dataframe()                                                            # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ..config import Config
from ..data.prompts import Prompt
from ..data.queries import Query
from ..engine import DEFAULT_MEMORY_BUDGET_MB, Row, run_rows
from ..engine.scoring import progress_bar
from ..errors import QrncaError
from ..model.access import d_mlp, n_layers
from ..model.interventions import check_neurons
from ..neurons import NeuronSet, NeuronsLike
from ..protocols import HookedModel
from ..qrnca.ig import resolve_layers
from .metrics import NEAR_ZERO, false_negative_rate, mean_or_none, precision_at_k, recall_at_k, spearman

__all__ = ["NeuronEffects", "neuron_effects", "exhaustive_effects", "candidate_neurons", "ground_truth",
           "GroundTruthResult", "METRICS", "DEFAULT_EXHAUSTIVE_LAYERS"]

Pair = tuple[int, int]
METRICS = ("precision", "recall", "spearman", "false_negative_rate")
DEFAULT_EXHAUSTIVE_LAYERS = 4  # the top layers exhaustive_effects measures by default (see its cost note)


@dataclass(frozen=True)
class NeuronEffects:
    """What ``neuron_effects`` measured: ``per_prompt[f, n, b]`` = effect of factor ``factors[f]`` on neuron
    ``neurons[n]`` at prompt ``b`` (log-prob after minus ``clean[b]``); ``effects`` is its mean over prompts."""

    neurons: tuple[Pair, ...]
    factors: tuple[float, ...]
    clean: Float[Tensor, " prompt"]
    per_prompt: Float[Tensor, "factor neuron prompt"]

    @property
    def effects(self) -> Float[Tensor, "factor neuron"]:
        return self.per_prompt.mean(-1)

    def of(self, factor: float) -> Float[Tensor, " neuron"]:
        """The query-mean effect of every neuron at ``factor`` (one of ``factors``)."""
        if float(factor) not in self.factors:
            raise QrncaError(f"factor {factor} was not measured; measured factors are {list(self.factors)}")
        return self.effects[self.factors.index(float(factor))]


def _distinct(neurons: NeuronsLike) -> list[Pair]:
    """(layer, neuron) pairs in rank order, a repeated entry kept at its first (best) place."""
    return list(dict.fromkeys(NeuronSet(neurons).pairs()))


def neuron_effects(
    model: HookedModel,
    prompts: Sequence[Prompt],
    candidates: NeuronsLike,
    factors: Sequence[float] = (0.0, 2.0),
    *,
    memory_budget_mb: int = DEFAULT_MEMORY_BUDGET_MB,
) -> NeuronEffects:
    """The exact effect of scaling each candidate neuron alone, per factor, on one query's prompts.

    Args:
        model: a TransformerLens model (bridge or HookedTransformer).
        prompts: the query's prompts; each is read at its last position for its first target token.
        candidates: the neurons (a ``NeuronSet``, pairs or triples; repeats are measured once).
        factors: multipliers of the neuron's activation at the last position (0 ablates, 2 doubles).
        memory_budget_mb: the engine's memory plan.

    Returns:
        ``NeuronEffects``: per (factor, neuron, prompt) the change of the target log-probability.

    Example:
        >>> eff = neuron_effects(model, prompts["capital-01"], [(14, 103), (20, 7)])   # doctest: +SKIP
        >>> eff.of(0.0)                                           # zero-ablation, mean over prompts  # doctest: +SKIP
        tensor([-0.4113,  0.0021], dtype=torch.float64)
    """
    if not prompts:
        raise QrncaError("no prompts to measure neuron effects on: give the query's prompts")
    if not factors:
        raise QrncaError("no factors: give at least one, e.g. factors=(0.0,) for zero-ablation")
    pairs = _distinct(candidates)
    if pairs:
        check_neurons(model, pairs)
    toks = [list(p.tokens) for p in prompts]
    targets = [int(p.target[0]) for p in prompts]
    B, F, N = len(toks), len(factors), len(pairs)
    rows = [Row(b, (toks[b][-1],)) for b in range(B)]
    # Factor-major, then neuron, then prompt: the reshape below reads them back in this order.
    rows += [Row(b, (toks[b][-1],), ((layer, (n,), float(f)),)) for f in factors for layer, n in pairs for b in range(B)]
    got = run_rows(model, toks, rows, lambda row, lp, acts: float(lp[0, targets[row.prompt]]),
                   memory_budget_mb=memory_budget_mb)
    clean = torch.tensor(got[:B], dtype=torch.float64)
    after = torch.tensor(got[B:], dtype=torch.float64).reshape(F, N, B)
    return NeuronEffects(tuple(pairs), tuple(float(f) for f in factors), clean, after - clean)


def exhaustive_effects(
    model: HookedModel,
    prompt: Prompt,
    layers: Sequence[int] | None = None,
    factor: float = 0.0,
    *,
    progress: bool = True,
    memory_budget_mb: int = DEFAULT_MEMORY_BUDGET_MB,
) -> Float[Tensor, "layer d_mlp"]:
    """Every neuron's effect in ``layers`` on ONE prompt: one engine call (and progress step) per layer.

    Cost: one row per neuron, started at its layer, so a low layer costs more than a high one. Measured on
    SmolLM2-135M (30 layers x 1,536 neurons, a 39-token prompt, CPU): a layer costs ~11 CPU-s fixed (the
    full-vocabulary log-softmax of its 1,536 rows) plus ~1.6 CPU-s per block its rows run (layer 29: 13 CPU-s,
    layer 15: 35 CPU-s). All 46,080 neurons: ~1,060 CPU-s, i.e. 9-18 min on 2 cores (about an hour of wall
    time on the loaded machine it was measured on). The default is therefore the top
    ``DEFAULT_EXHAUSTIVE_LAYERS`` layers (~60 CPU-s); pass ``layers=range(n_layers(model))`` for all.

    Args:
        model: a TransformerLens model.
        prompt: the prompt (its first target token is read at its last position).
        layers: the layers to measure (default: the top ``DEFAULT_EXHAUSTIVE_LAYERS``).
        factor: the multiplier (0.0: zero-ablation).
        progress: a tqdm bar over the layers (when there are several).
        memory_budget_mb: the engine's memory plan.

    Returns:
        ``[len(layers), d_mlp]`` effects (log-prob after minus clean), rows in the order of ``layers``.

    Example:
        >>> eff = exhaustive_effects(model, prompts["capital-01"][0], layers=[29])    # doctest: +SKIP
        >>> eff.abs().argmax()                                                          # doctest: +SKIP
    """
    L, width = n_layers(model), d_mlp(model)
    chosen = list(range(max(0, L - DEFAULT_EXHAUSTIVE_LAYERS), L)) if layers is None else resolve_layers(L, layers)
    if not chosen:
        raise QrncaError("no layers to measure: give at least one layer")
    it = progress_bar(chosen, len(chosen), "exhaustive effects", enabled=progress, unit="layer")
    out = [neuron_effects(model, [prompt], [(layer, i) for i in range(width)], (factor,),
                          memory_budget_mb=memory_budget_mb).per_prompt[0, :, 0] for layer in it]
    return torch.stack(out)


def candidate_neurons(
    sets: Mapping[str, NeuronsLike], query_id: str, *, k: int, layers: Sequence[int], width: int, seed: int = 0,
) -> tuple[NeuronSet, int]:
    """One query's candidates: the union of every method's top-k, then as many seeded random neurons.

    The random neurons are drawn from ``layers`` x ``width`` without the union, seeded from ``(seed,
    query_id)`` through a hash: repeatable, independent of query order, never touching the global RNG.

    Args:
        sets: method -> that method's neurons for this query (ranked best first; cut or uncut).
        query_id: seeds the random part.
        k: how many of each method's neurons enter the union.
        layers: the layers random neurons come from (the attributed layers).
        width: neurons per layer (``d_mlp``).
        seed: the run's seed.

    Returns:
        ``(candidates, n_union)``: the union first (method by method, rank order), then the random ones.

    Example:
        >>> cands, n = candidate_neurons({"a": [(1, 2), (1, 3)], "b": [(1, 3)]}, "q1", k=5, layers=[0, 1], width=8)
        >>> n, len(cands)
        (2, 4)
    """
    union: dict[Pair, None] = {}
    for ns in sets.values():
        union.update(dict.fromkeys(_distinct(ns)[:k]))
    n = len(union)
    digest = int(hashlib.sha256(f"{seed}|ground-truth|{query_id}".encode()).hexdigest()[:15], 16)
    order = torch.randperm(len(layers) * width, generator=torch.Generator().manual_seed(digest)).tolist()
    extra: list[Pair] = []
    for i in order:
        if len(extra) == n:
            break
        pair = (int(layers[i // width]), i % width)
        if pair not in union:
            extra.append(pair)
    return NeuronSet([*union, *extra]), n


@dataclass
class GroundTruthResult(Config):
    """Per query the candidates, their measured effects and each locator's agreement; per method the means.

    ``queries[qid]``: ``neurons`` ([[layer, neuron], ...]), ``n_union`` (the first n are the union of the
    methods' top-k, the rest random), ``effects`` (one list per factor, parallel to ``factors``, aligned with
    ``neurons``), ``clean_logprob`` (per prompt), ``true_top`` (the true top-k pairs) and ``metrics``
    (method -> precision, recall, spearman, false_negative_rate, n_ranked). ``methods[m]``: each metric's
    mean over the queries where it is defined (None where it never is), and ``n_queries`` per metric.
    """

    k: int
    seed: int
    factors: tuple[float, ...]
    layers: tuple[int, ...]
    exhaustive: bool
    queries: dict[str, dict[str, Any]]
    methods: dict[str, dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dataframe(self, per_query: bool = False) -> Any:
        """One row per method (means), or with ``per_query`` one row per (query, method)."""
        import pandas as pd

        if per_query:
            return pd.DataFrame([{"query": q, "method": m, **r} for q, d in self.queries.items()
                                 for m, r in d["metrics"].items()])
        return pd.DataFrame([{"method": m, **{x: r[x] for x in (*METRICS, "n_ranked")}} for m, r in self.methods.items()])


def _locator_metrics(ns: NeuronsLike, cands: Sequence[Pair], importance: np.ndarray, true_top: Sequence[Pair],
                     k: int) -> dict[str, Any]:
    """One locator against one query's truth (``importance`` = |zero-ablation effect| per candidate)."""
    scores: dict[Pair, float] = {}
    for layer, n, s in NeuronSet(ns):
        scores.setdefault((layer, n), float(s))
    ranked = _distinct(ns)
    # |score|: a locator's score is signed (a log-prob increase, an activation) and importance is |effect|;
    # a candidate the locator did not rank gets 0, the lowest |score|, tied with the other unranked ones.
    mine = np.array([abs(scores.get(c, 0.0)) for c in cands])
    rho = spearman(mine, importance) if len(cands) else float("nan")
    return {
        "precision": precision_at_k(ranked, true_top, k), "recall": recall_at_k(ranked, true_top, k),
        "spearman": rho if np.isfinite(rho) else None,
        "false_negative_rate": false_negative_rate(scores, true_top, rel=NEAR_ZERO),
        "n_ranked": min(k, len(ranked)),
    }


def ground_truth(
    model: HookedModel,
    queries: Sequence[Query | str],
    prompts: Mapping[str, Sequence[Prompt]],
    sets: Mapping[str, Mapping[str, NeuronsLike]],
    *,
    k: int = 50,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    factors: Sequence[float] = (0.0, 2.0),
    exhaustive: bool = False,
    memory_budget_mb: int = DEFAULT_MEMORY_BUDGET_MB,
    progress: bool = True,
) -> GroundTruthResult:
    """Measure each query's candidate neurons one at a time and score every locator against that truth.

    The **true top-k** is the k candidates with the largest |zero-ablation effect| (ties: candidate order),
    among the candidate set, NOT among all neurons: a neuron no method named and the random draw missed cannot
    be in it. With ``exhaustive=True`` the candidates are every neuron of ``layers`` (exact, and costly: see
    ``exhaustive_effects``). Per locator and query (``metrics``): precision@k (over the neurons it offers,
    at most k), recall@k, Spearman between its |score| and the |zero-ablation effect| over the candidates
    (unranked candidates score 0, the lowest; None when undefined, e.g. a locator whose scores are all 0),
    and the false-negative rate: the share of the true top-k it scored near zero (|score| under 1% of its max
    |score|) or did not rank.

    Args:
        model: a TransformerLens model.
        queries: the queries (or their ids) to judge.
        prompts: query id -> its prompts (``LocatorContext.prompts``, ``run.stored_prompts``).
        sets: method -> query id -> neurons, best first: ``locators.neuron_sets``'s answer (cut to QRNCA's
            count) or uncut sets (e.g. each ``LOCATORS[m](ctx)``), whose top-k enter the candidates and whose
            scores beyond k still count for Spearman and the false-negative rate.
        k: the top-k of each method and of the truth.
        seed: seeds the random candidates (per query, hashed; the global RNG is untouched).
        layers: where random candidates come from: the attributed layers (``run.layers``); default all.
        factors: the factors measured; 0.0 (the truth's ranking) must be among them.
        exhaustive: candidates = every neuron of ``layers``.
        memory_budget_mb: the engine's memory plan.
        progress: a tqdm bar over the queries, each step one query's single-neuron ablations (when there
            are several queries; ``exhaustive``: a bar over each query's layers too).

    Returns:
        ``GroundTruthResult``.

    Example:
        >>> res = ground_truth(model, ctx.queries, ctx.prompts, neuron_sets(["qrnca", "kn"], ctx),
        ...                    k=50, layers=run.layers)                          # doctest: +SKIP
        >>> res.methods["qrnca"]["precision"]                                    # doctest: +SKIP
    """
    if k < 1:
        raise QrncaError(f"k must be at least 1, got {k}")
    facs = tuple(float(f) for f in factors)
    if 0.0 not in facs:
        raise QrncaError(f"factors {list(facs)} lack 0.0: the true top-k ranks by zero-ablation; add 0.0")
    width = d_mlp(model)
    lays = tuple(range(n_layers(model))) if layers is None else tuple(int(x) for x in layers)
    ids = [q if isinstance(q, str) else q.id for q in queries]
    _check_inputs(ids, prompts, sets)
    per_query = {qid: _query_truth(model, qid, prompts[qid], {m: per[qid] for m, per in sets.items()}, k=k, seed=seed,
                                   layers=lays, width=width, factors=facs, exhaustive=exhaustive,
                                   memory_budget_mb=memory_budget_mb, progress=progress)
                 for qid in progress_bar(ids, len(ids), "ground truth (single-neuron ablations)", enabled=progress,
                                         unit="query")}
    methods = {m: _means([per_query[q]["metrics"][m] for q in ids]) for m in sets}
    return GroundTruthResult(k=k, seed=seed, factors=facs, layers=lays, exhaustive=exhaustive, queries=per_query,
                             methods=methods, meta={"n_queries": len(ids), "near_zero": NEAR_ZERO})


def _check_inputs(ids: Sequence[str], prompts: Mapping[str, Sequence[Prompt]],
                  sets: Mapping[str, Mapping[str, NeuronsLike]]) -> None:
    """Every method has neurons, and every query prompts, for every judged query."""
    for m, per in sets.items():
        missing = [q for q in ids if q not in per]
        if missing:
            raise QrncaError(f"method {m!r} has no neurons for queries {missing[:3]}; give every method a set per query")
    missing = [q for q in ids if not prompts.get(q)]
    if missing:
        raise QrncaError(f"no prompts for queries {missing[:3]}; pass every query's prompts")


def _query_truth(model: HookedModel, qid: str, prompts: Sequence[Prompt], mine: Mapping[str, NeuronsLike], *,
                 k: int, seed: int, layers: tuple[int, ...], width: int, factors: tuple[float, ...],
                 exhaustive: bool, memory_budget_mb: int, progress: bool) -> dict[str, Any]:
    """One query's entry of ``GroundTruthResult.queries``: its candidates measured, the true top-k, and each
    method's agreement (``mine``: method -> its neurons for this query)."""
    if exhaustive:
        eff, n_union = _every_neuron(model, prompts, layers, width, factors, memory_budget_mb, progress), 0
    else:
        cands, n_union = candidate_neurons(mine, qid, k=k, layers=layers, width=width, seed=seed)
        eff = neuron_effects(model, prompts, cands, factors, memory_budget_mb=memory_budget_mb)
    importance = eff.of(0.0).abs().numpy()
    order = sorted(range(len(eff.neurons)), key=lambda i: -importance[i])  # stable: ties in candidate order
    true_top = [eff.neurons[i] for i in order[:k]]
    return {
        "neurons": [list(p) for p in eff.neurons], "n_union": n_union,
        "effects": eff.effects.tolist(), "clean_logprob": eff.clean.tolist(),
        "true_top": [list(p) for p in true_top],
        "metrics": {m: _locator_metrics(ns, eff.neurons, importance, true_top, k) for m, ns in mine.items()},
    }


def _every_neuron(model: HookedModel, prompts: Sequence[Prompt], layers: Sequence[int], width: int,
                  factors: Sequence[float], memory_budget_mb: int, progress: bool) -> NeuronEffects:
    """Every neuron of ``layers`` measured alone: one engine call, and one progress step, per layer (an
    exhaustive query is thousands of rows per layer; the clean pass repeated per layer is a small extra)."""
    steps = progress_bar(layers, len(layers), "single-neuron ablations", enabled=progress, unit="layer", leave=False)
    parts = [neuron_effects(model, prompts, [(layer, i) for i in range(width)], factors,
                            memory_budget_mb=memory_budget_mb) for layer in steps]
    return NeuronEffects(tuple(p for e in parts for p in e.neurons), parts[0].factors, parts[0].clean,
                         torch.cat([e.per_prompt for e in parts], dim=1))


def _means(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Each metric's mean over the queries where it is defined; ``n_queries``: how many those were."""
    out: dict[str, Any] = {"n_queries": {}}
    for key in (*METRICS, "n_ranked"):
        vals = [float(r[key]) for r in rows if r[key] is not None]
        out[key] = mean_or_none(vals)
        out["n_queries"][key] = len(vals)
    return out
