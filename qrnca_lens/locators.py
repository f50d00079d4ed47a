"""Locators: anything that maps a collection of queries to per-query neuron sets, judged by the same metrics.

Every locator receives a ``LocatorContext`` (the model, the queries and their prompts, and the QRNCA run with
its stored IG scores, so variants re-use them instead of re-attributing) and returns
``{query_id: NeuronSet}`` ranked best first (a locator of your own may return ``(layer, neuron[, score])``
lists instead: ``neuron_sets`` converts them). ``neuron_sets`` then cuts every method to QRNCA's own count
for that query (METHOD section 4: baselines get the same number of neurons per query).

Built in: ``qrnca``, ``no-ica`` (naica := na), ``with-common`` (common neurons kept), ``kn`` (Knowledge
Neuron*, Dai et al.: per-prompt t·max clusters, neurons shared by more than a fraction ``KN_SHARE`` of the
query's prompts, ranked by summed score), ``activation`` (highest clean activation of the attributed hook at
the target position, mean over prompts), ``random`` (seeded per query), ``logprob`` (the log-probability-
increase lens, one registration away), ``atp`` (attribution patching: gradient x activation of the attributed
hook, i.e. minus the first-order zero-ablation effect on P(target)) and ``dla`` (direct logit attribution of
hook_post to the target logit through the frozen final norm); these two score with ``first_order``, mean over
the query's prompts, top ``TOP``. Add your own with ``register_locator``.

Cost: ``neuron_sets`` times each locator call and records, on ``ctx.costs[name]``, ``seconds`` (the whole
call), ``seconds_per_query`` and ``passes`` (model passes the locator ran, each forward or backward over
one prompt counting one; None when a locator does not say). The built-ins report their passes: ``atp`` 2
per prompt, ``dla``, ``activation`` and ``logprob`` 1 per prompt; ``qrnca``, ``no-ica``, ``with-common``,
``kn`` 0, since they reuse the run's stored IG, and ``random`` 0. The IG-based ones also record
``stored_attribution_seconds``: the IG seconds per query ``locate`` stored (None for older runs).

Example:
    >>> @register_locator("first-neurons")                      # doctest: +SKIP
    ... def first(ctx): return {q.id: NeuronSet([(0, i, 1.0) for i in range(5)]) for q in ctx.queries}
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .data import Query
from .errors import QrncaError
from .first_order import atp_scores, dla_scores
from .hooks import capture, hooked
from .locate import LocateResult, scores_of
from .models import d_mlp, mlp_hook_name, model_device
from .neurons import NeuronSet, NeuronsLike
from .protocols import HookedModel
from .proxies import Prompt
from .selection import prompt_clusters

__all__ = ["LocatorContext", "LOCATORS", "register_locator", "neuron_sets", "report_passes", "KN_SHARE", "TOP"]

Ranked = dict[str, NeuronSet]  # query id -> its neurons, best first
# A registered locator may return plain (layer, neuron[, score]) lists per query; neuron_sets converts them.
LocatorFn = Callable[["LocatorContext"], Mapping[str, NeuronsLike]]
LOCATORS: dict[str, LocatorFn] = {}
KN_SHARE = 0.5  # Dai et al.'s refinement: keep neurons shared by more than this fraction of the prompts
TOP = 200  # neurons kept per query by the score-ranking locators (activation, atp, dla) before the cut to QRNCA's count
Cost = dict[str, float | None]


@dataclass
class LocatorContext:
    """What every locator reads: the model, the queries and their prompts, the QRNCA run, a seed.

    ``costs`` is filled by ``neuron_sets``: ``{method: {"seconds", "seconds_per_query", "passes", ...}}``; a
    locator reports its model passes with ``report_passes(ctx, name, n)``.
    """

    model: HookedModel
    queries: Sequence[Query]
    prompts: dict[str, list[Prompt]]
    run: LocateResult
    seed: int = 0
    costs: dict[str, Cost] = field(default_factory=dict)

    def n_prompts(self) -> int:
        return sum(len(self.prompts[q.id]) for q in self.queries)


def report_passes(ctx: LocatorContext, name: str, passes: int | None, **extra: float | None) -> None:
    """Record how many model passes locator ``name`` ran (a forward or a backward over one prompt = 1).

    Args:
        ctx: the context the locator was called with (``neuron_sets`` adds the timing next to it).
        name: the locator's registered name.
        passes: the count, or None when unknown.
        extra: other cost entries (e.g. ``stored_attribution_seconds``).

    Returns:
        None.

    Example:
        >>> report_passes(ctx, "my-locator", 2 * ctx.n_prompts())   # doctest: +SKIP
    """
    ctx.costs.setdefault(name, {}).update(passes=passes, **extra)


def _reuses_ig(ctx: LocatorContext, name: str) -> None:
    # No extra pass: the run's stored IG scores are read. Their own cost is the IG time locate stored per
    # query (runs made before it was stored have none: None rather than a guess).
    stored = [ctx.run.info.get(q.id, {}).get("attribution_seconds") for q in ctx.queries]
    seconds = [float(x) for x in stored if isinstance(x, (int, float))]
    known = bool(stored) and len(seconds) == len(stored)
    report_passes(ctx, name, 0, stored_attribution_seconds=sum(seconds) / len(seconds) if known else None)


def register_locator(name: str, fn: LocatorFn | None = None) -> Any:
    """Register a locator under ``name`` (usable as a decorator); ``evaluate`` then judges it by that name.

    Args:
        name: the method name (``EvalConfig(methods=(..., name))``); an existing name is replaced.
        fn: ``fn(ctx: LocatorContext) -> {query_id: NeuronSet or (layer, neuron[, score]) list}``, best first;
            None returns a decorator.

    Returns:
        ``fn`` itself (or, without ``fn``, a decorator that registers and returns the function).

    Example:
        >>> @register_locator("layer0-first5")
        ... def first_five(ctx):
        ...     return {q.id: [(0, i) for i in range(5)] for q in ctx.queries}
        >>> LOCATORS["layer0-first5"] is first_five
        True
        >>> evaluate(model, run, cfg=EvalConfig(methods=("qrnca", "layer0-first5")))   # doctest: +SKIP
        >>> del LOCATORS["layer0-first5"]      # this example's registration does not outlive it
    """

    def add(f: LocatorFn) -> LocatorFn:
        LOCATORS[name] = f
        return f

    return add(fn) if fn is not None else add


def _from_selection(run: LocateResult) -> Ranked:
    return {qid: run.qr_neurons(qid) for qid in run.selection.qr}


def _ranked(mean: Tensor, layers: Sequence[int]) -> NeuronSet:
    """The TOP neurons of a [layer, d_mlp] score table, best first, with the model's layer numbers."""
    flat = mean.flatten()
    order = torch.argsort(flat, descending=True, stable=True)[:TOP]
    width = mean.shape[-1]
    return NeuronSet([(layers[int(i) // width], int(i) % width, float(flat[i])) for i in order])


@register_locator("qrnca")
def _qrnca(ctx: LocatorContext) -> Ranked:
    _reuses_ig(ctx, "qrnca")
    return _from_selection(ctx.run)


@register_locator("no-ica")
def _no_ica(ctx: LocatorContext) -> Ranked:
    _reuses_ig(ctx, "no-ica")
    return _from_selection(ctx.run.reselect(replace(ctx.run.config.selection, use_ica=False)))


@register_locator("with-common")
def _with_common(ctx: LocatorContext) -> Ranked:
    _reuses_ig(ctx, "with-common")
    return _from_selection(ctx.run.reselect(replace(ctx.run.config.selection, remove_common=False)))


@register_locator("kn")
def _knowledge_neurons(ctx: LocatorContext) -> Ranked:
    _reuses_ig(ctx, "kn")
    t = ctx.run.config.selection.t
    out: Ranked = {}
    for q in ctx.queries:
        scores = scores_of(ctx.run, q.id)  # [prompt, layer, d_mlp]
        kept = prompt_clusters(scores, t)
        shared = kept.sum(0) > KN_SHARE * scores.shape[0]
        summed = scores.sum(0)
        idx = torch.nonzero(shared)
        order = torch.argsort(summed[shared], descending=True, stable=True)
        out[q.id] = NeuronSet([(ctx.run.layers[int(idx[i, 0])], int(idx[i, 1]), float(summed[shared][i]))
                               for i in order])
    return out


@register_locator("activation")
def _activation(ctx: LocatorContext) -> Ranked:
    report_passes(ctx, "activation", ctx.n_prompts())
    layers = ctx.run.layers
    names = [mlp_hook_name(ctx.model, layer) for layer in layers]
    out: Ranked = {}
    device = model_device(ctx.model)
    for q in ctx.queries:
        acts = []
        for p in ctx.prompts[q.id]:
            store: dict[str, torch.Tensor] = {}
            with torch.no_grad(), hooked(ctx.model, fwd=[(n, capture(store, n, position=p.target_position)) for n in names]):
                ctx.model(torch.tensor([list(p.tokens)], device=device))
            acts.append(torch.stack([store[n][0].float().cpu() for n in names]))
        out[q.id] = _ranked(torch.stack(acts).mean(0), layers)
    return out


@register_locator("atp")
def _atp(ctx: LocatorContext) -> Ranked:
    """Attribution patching: mean over the query's prompts of f · dP/df (minus the first-order zero-ablation
    effect; large = supports the target, as QRNCA ranks)."""
    report_passes(ctx, "atp", 2 * ctx.n_prompts())  # one forward and one backward per prompt
    return {q.id: _ranked(atp_scores(ctx.model, ctx.prompts[q.id], ctx.run.layers).mean(0), ctx.run.layers)
            for q in ctx.queries}


@register_locator("dla")
def _dla(ctx: LocatorContext) -> Ranked:
    """Direct logit attribution: mean over the query's prompts of each neuron's raw target-logit contribution."""
    report_passes(ctx, "dla", ctx.n_prompts())
    return {q.id: _ranked(dla_scores(ctx.model, ctx.prompts[q.id], ctx.run.layers).mean(0), ctx.run.layers)
            for q in ctx.queries}


@register_locator("random")
def _random(ctx: LocatorContext) -> Ranked:
    report_passes(ctx, "random", 0)
    width = d_mlp(ctx.model)
    total = len(ctx.run.layers) * width
    out: Ranked = {}
    for q in ctx.queries:
        n = len(ctx.run.selection.qr[q.id][0])
        # Seeded per query from (seed, id): repeatable, independent of query order and of the global RNG.
        digest = int(hashlib.sha256(f"{ctx.seed}|random|{q.id}".encode()).hexdigest()[:15], 16)
        g = torch.Generator().manual_seed(digest)
        pick = torch.randperm(total, generator=g)[:n]
        out[q.id] = NeuronSet([(ctx.run.layers[int(i) // width], int(i) % width, 0.0) for i in pick])
    return out


@register_locator("logprob")
def _logprob(ctx: LocatorContext) -> Ranked:
    from .lens import lens_locate

    report_passes(ctx, "logprob", ctx.n_prompts())  # one cached forward per prompt; the rest is arithmetic
    return lens_locate(ctx.model, list(ctx.queries), ctx.run.config.proxy, prompts=ctx.prompts,
                       progress=False).neuron_sets()


def neuron_sets(methods: Sequence[str], ctx: LocatorContext, *, cut: bool = True) -> dict[str, Ranked]:
    """Each method's neurons per query, cut to QRNCA's count for that query.

    Args:
        methods: registered locator names (``LOCATORS``).
        ctx: the model, queries, prompts and QRNCA run the locators read.
        cut: False keeps each locator's whole ranking (what ground truth compares beyond QRNCA's count).

    Returns:
        ``{method: {query_id: NeuronSet}}``, each set its method's best ``n`` neurons, ``n`` the query's
        QR neuron count. Each method's cost lands on ``ctx.costs[method]``: ``seconds`` (wall clock of the
        locator call, ``time.perf_counter``), ``seconds_per_query`` and ``passes`` (as the locator reported
        them; None if it did not).

    Example:
        >>> sets = neuron_sets(["qrnca", "random"], LocatorContext(model, queries, prompts, run))  # doctest: +SKIP
        >>> sets["random"]["capital-01"][:2]                                                      # doctest: +SKIP
        NeuronSet([(27, 1410, 0.0), (3, 88, 0.0)])
    """
    unknown = [m for m in methods if m not in LOCATORS]
    if unknown:
        raise QrncaError(f"unknown method(s) {unknown}; registered locators: {sorted(LOCATORS)}")
    counts = {q.id: len(ctx.run.selection.qr[q.id][0]) for q in ctx.queries}
    out = {}
    for m in methods:
        ctx.costs.pop(m, None)  # a second call measures afresh
        t0 = time.perf_counter()
        ranked = LOCATORS[m](ctx)
        seconds = time.perf_counter() - t0
        cost = ctx.costs.setdefault(m, {})
        cost.setdefault("passes", None)
        cost.update(seconds=seconds, seconds_per_query=seconds / max(1, len(ctx.queries)))
        missing = [q.id for q in ctx.queries if q.id not in ranked]
        if missing:
            raise QrncaError(f"locator {m!r} returned no neurons for queries {missing[:3]}")
        out[m] = {q.id: _as_set(m, q.id, ranked[q.id])[: counts[q.id] if cut else None] for q in ctx.queries}
    return out


def cut_to_qrnca(sets: Mapping[str, Ranked], run: LocateResult) -> dict[str, Ranked]:
    """Uncut rankings (``neuron_sets(..., cut=False)``) cut to each query's QR neuron count, as ``neuron_sets`` does.

    Args:
        sets: ``{method: {query_id: NeuronSet}}``.
        run: the QRNCA run whose QR neuron counts set each query's cut.

    Returns:
        The same structure, every set its method's best ``n`` neurons.

    Example:
        >>> sets = cut_to_qrnca(neuron_sets(["atp"], ctx, cut=False), ctx.run)   # doctest: +SKIP
    """
    return {m: {q: s[: len(run.selection.qr[q][0])] for q, s in d.items()} for m, d in sets.items()}


def _as_set(method: str, query_id: str, neurons: NeuronsLike) -> NeuronSet:
    """A locator's answer for one query as a NeuronSet; a malformed one names the locator and the query."""
    try:
        return NeuronSet(neurons)
    except QrncaError as e:
        raise QrncaError(f"locator {method!r}, query {query_id!r}: {e}") from None
