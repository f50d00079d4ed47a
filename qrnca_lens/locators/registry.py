"""Locators: anything that maps a collection of queries to per-query neuron sets, judged by the same metrics.

**One shape.** A locator is a ``Locator``: a ``name``, a ``config_class`` (its config dataclass) and
``locate(model, queries, cfg, *, prompts=None, run=None, progress=True, seed=0) -> Located``. Every registered
one is reached through ``locate(model, queries, cfg, method=NAME)`` (``qrnca_lens.locate``): ``"qrnca"`` gives a
``LocateResult``, every other method a ``RankedResult`` (its neurons with scores, the prompts used, the layers,
the proxy, its cost), which ``evaluate`` judges and ``save``/``load`` keep on disk.

Inside ``evaluate`` (and ``neuron_sets``) the built-ins rank from a ``LocatorContext`` (the model, the queries
and their prompts, the QRNCA run when there is one, the layers, the neuron budget per query): a registered
``fn(ctx) -> {query_id: NeuronSet or (layer, neuron[, score]) list}`` (best first) is wrapped as a
``ContextLocator`` and works both ways. ``register_locator`` refuses a name already taken unless
``replace=True``.

Built in: ``qrnca``; ``no-ica`` (naica := na), ``with-common`` (common neurons kept) and ``kn`` (Knowledge
Neuron*, Dai et al.: per-prompt t·max clusters, neurons shared by more than a fraction ``KN_SHARE`` of the
query's prompts, ranked by summed score), which re-read the QRNCA run's stored IG scores (given as ``run=``,
or computed first on the same prompts); ``activation`` (highest clean activation of the attributed hook at
the target position, mean over prompts), ``atp`` (attribution patching: gradient x activation, minus the
first-order zero-ablation effect on P(target)) and ``dla`` (direct logit attribution of hook_post to the
target logit through the frozen final norm), each the mean over the query's prompts, top ``top_k``
(``RankConfig``, default ``TOP``); ``logprob`` (the log-probability-increase lens, ``LogprobConfig``) and
``random`` (seeded per query; ``RandomConfig.top_k`` neurons, or QRNCA's count per query given a run).
The generic methods search ``cfg.layers`` (default: all).

Cost: every call is timed and recorded on ``ctx.costs[name]`` (and a ``RankedResult``'s ``costs``):
``seconds`` (the whole call), ``seconds_per_query`` and ``passes`` (model passes, each forward or backward
over one prompt counting one; None when a locator does not say). ``atp`` runs 2 per prompt, ``dla``,
``activation`` and ``logprob`` 1; ``qrnca``, ``no-ica``, ``with-common``, ``kn`` 0, since they reuse the
run's stored IG, and ``random`` 0. The IG-based ones also record ``stored_attribution_seconds``: the IG
seconds per query ``locate`` stored (None for older runs).

Example:
    >>> @register_locator("first-neurons")                      # doctest: +SKIP
    ... def first(ctx): return {q.id: NeuronSet([(0, i, 1.0) for i in range(5)]) for q in ctx.queries}
    >>> locate(model, queries, RankConfig(ProxyConfig("cloze")), method="first-neurons")   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..config import Config
from ..data.prompts import Prompt, ProxyConfig, build_all_prompts, tokenizer_identity
from ..data.queries import QueriesLike, Query, as_queries
from ..errors import QrncaError
from ..lens.config import LensConfig
from ..located import Located, RankedResult
from ..model.access import d_mlp, default_prepend_bos, mlp_hook_name, model_device, model_name, n_layers, tokenizer_of
from ..model.hooks import capture, hooked
from ..neurons import NeuronSet, NeuronsLike
from ..protocols import HookedModel
from ..qrnca.locate import LocateConfig, LocateResult, scores_of
from ..qrnca.selection import prompt_clusters
from ..versions import library_versions, model_identity
from .first_order import atp_scores, dla_scores

__all__ = ["Locator", "ContextLocator", "LocatorContext", "LocatorRegistry", "LOCATORS", "register_locator",
           "neuron_sets", "cut_to", "cut_to_qrnca", "qrnca_counts", "report_passes", "coerce_config",
           "locate", "locate_with", "RankConfig", "RandomConfig", "LogprobConfig", "IG_BASED", "KN_SHARE", "TOP", "LENS_TOP"]

Ranked = dict[str, NeuronSet]  # query id -> its neurons, best first
# A registered ranking function may return plain (layer, neuron[, score]) lists per query; they are converted.
LocatorFn = Callable[["LocatorContext"], Mapping[str, NeuronsLike]]
KN_SHARE = 0.5  # Dai et al.'s refinement: keep neurons shared by more than this fraction of the prompts
TOP = 200  # neurons kept per query by the score-ranking locators (activation, atp, dla) unless told otherwise
LENS_TOP = 20  # the lens's default top-k (as ``lens_locate``'s)
IG_BASED = ("qrnca", "no-ica", "with-common", "kn")  # they read a QRNCA run's stored IG scores
Cost = dict[str, float | None]


# ---------------------------------------------------------------- configs of the generic methods


@dataclass(frozen=True)
class RankConfig(Config):
    """What a score-ranking method (activation, atp, dla, a registered ``fn(ctx)``) needs: prompts and layers.

    Example:
        >>> cfg = RankConfig(ProxyConfig("cloze"), layers=(0, 1), top_k=10)
        >>> RankConfig.from_dict(cfg.to_dict()) == cfg, cfg.to_dict()["layers"]
        (True, [0, 1])
    """

    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    layers: tuple[int, ...] | None = field(default=None, metadata={"help": "layers searched (default: all)"})
    top_k: int | None = field(default=TOP, metadata={"help": "neurons kept per query, best first (None: all)"})

    def validate(self) -> None:
        if self.top_k is not None and (isinstance(self.top_k, bool) or self.top_k < 1):
            raise QrncaError(f"top_k must be at least 1 (or None for every neuron), got {self.top_k!r}")
        if self.layers is not None and (not self.layers or any(x < 0 for x in self.layers)):
            raise QrncaError(f"layers must be non-negative layer numbers (or None for all), got {self.layers!r}")


@dataclass(frozen=True)
class RandomConfig(RankConfig):
    """``random``: ``top_k`` seeded random neurons per query; None takes QRNCA's count from ``run=``.

    Example:
        >>> RandomConfig(top_k=5).top_k, RandomConfig().top_k is None
        (5, True)
    """

    top_k: int | None = field(default=None, metadata={"help": "neurons drawn per query (None: QRNCA's count)"})


@dataclass(frozen=True)
class LogprobConfig(RankConfig):
    """``logprob``: the lens's top ``top_k`` neurons per query, computed as ``lens`` says (certified top-k).

    Example:
        >>> LogprobConfig().top_k, LogprobConfig().lens.mode
        (20, 'topk')
    """

    top_k: int | None = field(default=LENS_TOP, metadata={"help": "neurons kept per query"})
    lens: LensConfig = field(default_factory=lambda: LensConfig(mode="topk"))


# ---------------------------------------------------------------- the context the built-ins rank from


@dataclass
class LocatorContext:
    """What the ranking functions read: the model, the queries and their prompts, the QRNCA run, a seed.

    ``run``: the QRNCA run (None: ``qrnca_run()`` computes it on these prompts when an IG-based method asks).
    ``layers``: the layers searched (empty: the run's, else all). ``proxy``: the prompts' proxy (None: the
    run's). ``cfg``: the called method's config (None: every method's defaults). ``counts``: the neuron budget
    per query (``evaluate`` sets it; random draws that many, the rankers keep at least that many). ``costs`` is
    filled as each method runs: ``{method: {"seconds", "seconds_per_query", "passes", ...}}``; a locator
    reports its model passes with ``report_passes(ctx, name, n)``.

    Example:
        >>> ctx = LocatorContext(model, queries, run.stored_prompts(), run)     # doctest: +SKIP
        >>> neuron_sets(["qrnca", "random"], ctx)["random"][queries[0].id]     # doctest: +SKIP
    """

    model: HookedModel
    queries: Sequence[Query]
    prompts: dict[str, list[Prompt]]
    run: LocateResult | None = None
    seed: int = 0
    costs: dict[str, Cost] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)
    proxy: ProxyConfig | None = None
    cfg: Any = None
    counts: dict[str, int] | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if not self.layers:
            self.layers = list(self.run.layers) if self.run is not None else list(range(n_layers(self.model)))
        if self.proxy is None and self.run is not None:
            self.proxy = self.run.config.proxy

    def n_prompts(self) -> int:
        return sum(len(self.prompts[q.id]) for q in self.queries)

    def proxy_config(self) -> ProxyConfig:
        """The prompts' proxy; a context without one (and without a run) says so."""
        if self.proxy is None:
            raise QrncaError("this LocatorContext has no proxy and no QRNCA run; give LocatorContext(..., proxy=...)")
        return self.proxy

    def top_k(self, query_id: str, default: int | None) -> int | None:
        """How many neurons a ranking method keeps for the query: its config's ``top_k`` (else ``default``), and
        at least the query's budget (so a cut to the budget is never short for want of ranked neurons)."""
        k = self.cfg.top_k if isinstance(self.cfg, RankConfig) else default
        if k is not None and self.counts is not None:
            k = max(k, self.counts.get(query_id, 0))
        return k

    def qrnca_run(self) -> LocateResult:
        """The QRNCA run the IG-based methods read: the given one, or QRNCA located now on these prompts."""
        if self.run is None:
            from ..qrnca.locate import locate

            cfg = self.cfg if isinstance(self.cfg, LocateConfig) else LocateConfig(proxy=self.proxy_config())
            if cfg.layers is None:
                cfg = replace(cfg, layers=tuple(self.layers))
            res = locate(self.model, list(self.queries), cfg, prompts=self.prompts, progress=self.progress)
            assert res is not None  # no out=: in memory, every query done
            self.run = res
        return self.run


def report_passes(ctx: LocatorContext, name: str, passes: int | None, **extra: float | None) -> None:
    """Record how many model passes locator ``name`` ran (a forward or a backward over one prompt = 1).

    Args:
        ctx: the context the locator was called with (the timing is added next to it).
        name: the locator's registered name.
        passes: the count, or None when unknown.
        extra: other cost entries (e.g. ``stored_attribution_seconds``).

    Returns:
        None.

    Example:
        >>> report_passes(ctx, "my-locator", 2 * ctx.n_prompts())   # doctest: +SKIP
    """
    ctx.costs.setdefault(name, {}).update(passes=passes, **extra)


# ---------------------------------------------------------------- the protocol and the registry


@runtime_checkable
class Locator(Protocol):
    """The one shape of a method: ``name``, ``config_class`` and ``locate(...) -> Located``.

    Example:
        >>> isinstance(LOCATORS["atp"], Locator), LOCATORS["atp"].config_class.__name__
        (True, 'RankConfig')
    """

    @property
    def name(self) -> str: ...

    @property
    def config_class(self) -> type[Config]: ...

    def locate(self, model: HookedModel, queries: Sequence[Query], cfg: Any = None, *,
               prompts: dict[str, list[Prompt]] | None = None, run: LocateResult | None = None,
               progress: bool = True, seed: int = 0) -> Located: ...


@dataclass(frozen=True)
class ContextLocator:
    """A ``Locator`` made from a ranking function ``fn(ctx) -> {query_id: neurons}`` (best first).

    ``uses_run``: it reads a QRNCA run (``ctx.qrnca_run()``). Called with a context it ranks
    (``loc(ctx)``); ``locate`` builds the context and returns a ``RankedResult``.

    Example:
        >>> loc = ContextLocator("first3", lambda ctx: {q.id: [(0, i) for i in range(3)] for q in ctx.queries})
        >>> loc.config_class.__name__, isinstance(loc, Locator)
        ('RankConfig', True)
    """

    name: str
    fn: LocatorFn
    config_class: type[Config] = RankConfig
    uses_run: bool = False

    def __call__(self, ctx: LocatorContext) -> Mapping[str, NeuronsLike]:
        return self.fn(ctx)

    def locate(self, model: HookedModel, queries: Sequence[Query], cfg: Any = None, *,
               prompts: dict[str, list[Prompt]] | None = None, run: LocateResult | None = None,
               progress: bool = True, seed: int = 0) -> Located:
        """This method's neurons for ``queries`` as a ``RankedResult`` (see the module docstring)."""
        return _ranked_result(self, model, queries, cfg, prompts=prompts, run=run, progress=progress, seed=seed)


@dataclass(frozen=True)
class _QrncaLocator(ContextLocator):
    """QRNCA: ``locate`` is ``qrnca_lens.qrnca.locate``'s QRNCA path (a ``LocateResult``); a given run is the answer."""

    def locate(self, model: HookedModel, queries: Sequence[Query], cfg: Any = None, *,
               prompts: dict[str, list[Prompt]] | None = None, run: LocateResult | None = None,
               progress: bool = True, seed: int = 0) -> Located:
        if run is not None:
            missing = [q.id for q in queries if q.id not in run.selection.qr]
            if missing:
                raise QrncaError(f"the run given holds no queries {missing[:3]}; give the run these queries were "
                                 "located in, or no run")
            return run
        from ..qrnca.locate import locate

        res = locate(model, queries, coerce_config(self, cfg), prompts=prompts, progress=progress)
        assert res is not None  # no out=: in memory
        return res


class LocatorRegistry(dict[str, Locator]):
    """Name -> ``Locator``; a name is registered once (``register_locator(..., replace=True)`` replaces).

    Example:
        >>> "qrnca" in LOCATORS and "atp" in LOCATORS
        True
    """

    def __setitem__(self, name: str, locator: Locator) -> None:
        if name in self:
            raise QrncaError(_taken(name))
        super().__setitem__(name, locator)


def _taken(name: str) -> str:
    return (f"a locator named {name!r} is already registered; pick another name, or pass replace=True "
            f"(register_locator({name!r}, fn, replace=True)) to replace it")


LOCATORS: LocatorRegistry = LocatorRegistry()


def register_locator(name: str, fn: Any = None, *, replace: bool = False) -> Any:
    """Register a locator under ``name`` (usable as a decorator); ``locate`` and ``evaluate`` then know it.

    Args:
        name: the method name (``locate(..., method=name)``, ``EvalConfig(methods=(..., name))``).
        fn: a ranking function ``fn(ctx: LocatorContext) -> {query_id: NeuronSet or (layer, neuron[, score])
            list}``, best first (wrapped as a ``ContextLocator``), or a ``Locator`` object; None returns a
            decorator.
        replace: replace a locator already registered under ``name`` (without it that is refused).

    Returns:
        ``fn`` itself (or, without ``fn``, a decorator that registers and returns the function).

    Example:
        >>> @register_locator("layer0-first5")
        ... def first_five(ctx):
        ...     return {q.id: [(0, i) for i in range(5)] for q in ctx.queries}
        >>> LOCATORS["layer0-first5"].fn is first_five
        True
        >>> register_locator("layer0-first5", first_five)
        Traceback (most recent call last):
        ...
        qrnca_lens.errors.QrncaError: a locator named 'layer0-first5' is already registered; pick another name, ...
        >>> evaluate(model, run, cfg=EvalConfig(methods=("qrnca", "layer0-first5")))   # doctest: +SKIP
        >>> del LOCATORS["layer0-first5"]      # this example's registration does not outlive it
    """

    def add(f: Any) -> Any:
        if isinstance(f, Locator):
            if f.name != name:
                raise QrncaError(f"the locator's name {f.name!r} differs from the name it is registered under "
                                 f"({name!r}); give them the same name")
            loc: Locator = f
        elif callable(f):
            loc = ContextLocator(name, f)
        else:
            raise QrncaError(f"register_locator({name!r}, ...) needs fn(ctx) or a Locator, got {type(f).__name__}")
        if name in LOCATORS and not replace:
            raise QrncaError(_taken(name))
        dict.__setitem__(LOCATORS, name, loc)
        return f

    return add(fn) if fn is not None else add


def _locator(name: str) -> Locator:
    if name not in LOCATORS:
        raise QrncaError(f"unknown method(s) [{name!r}]; registered locators: {sorted(LOCATORS)}")
    return LOCATORS[name]


def coerce_config(locator: Locator, cfg: Any) -> Any:
    """``cfg`` as an instance of ``locator.config_class``.

    None gives the defaults; an instance is kept; any other config with ``proxy`` and ``layers`` (a
    ``LocateConfig`` handed to ``atp``, a ``RankConfig`` to ``qrnca``) lends its proxy, its layers and any
    other field both share and it sets away from its own default (e.g. ``top_k``); a ``LensConfig`` is
    ``logprob``'s lens settings.

    Args:
        locator: the method.
        cfg: the config given.

    Returns:
        The method's config.

    Example:
        >>> coerce_config(LOCATORS["atp"], LocateConfig(layers=(1,))).layers
        (1,)
    """
    cls = locator.config_class
    if cfg is None:
        return cls()
    if isinstance(cfg, cls):
        return cfg
    if cls is LogprobConfig and isinstance(cfg, LensConfig):
        return LogprobConfig(lens=cfg)
    lends = isinstance(getattr(cfg, "proxy", None), ProxyConfig) and hasattr(cfg, "layers")
    if dataclasses.is_dataclass(cfg) and lends:
        theirs = {f.name: f for f in dataclasses.fields(cfg)}
        kw = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]  # every config class is a dataclass
            if f.name not in theirs:
                continue
            value, g = getattr(cfg, f.name), theirs[f.name]
            if g.default is not dataclasses.MISSING:
                default = g.default
            else:
                default = g.default_factory() if g.default_factory is not dataclasses.MISSING else None
            if f.name in ("proxy", "layers") or value != default:
                kw[f.name] = value
        return cls(**kw)
    raise QrncaError(f"method {locator.name!r} takes a {cls.__name__} (or any config with proxy and layers), got "
                     f"{type(cfg).__name__}")


# ---------------------------------------------------------------- ranking, cost, cut


def _rank(name: str, locator: Locator, ctx: LocatorContext) -> Ranked:
    """One method's whole ranking per query, timed into ``ctx.costs[name]``."""
    ctx.costs.pop(name, None)  # a second call measures afresh
    t0 = time.perf_counter()
    if isinstance(locator, ContextLocator):
        ranked: Mapping[str, NeuronsLike] = locator(ctx)
    else:  # any other Locator: its own locate, on the context's prompts and run
        base = ctx.cfg if ctx.cfg is not None else RankConfig(proxy=ctx.proxy_config(), layers=tuple(ctx.layers))
        ranked = locator.locate(ctx.model, ctx.queries, coerce_config(locator, base), prompts=ctx.prompts,
                                run=ctx.run, progress=False, seed=ctx.seed).neuron_sets()
    seconds = time.perf_counter() - t0
    cost = ctx.costs.setdefault(name, {})
    cost.setdefault("passes", None)
    cost.update(seconds=seconds, seconds_per_query=seconds / max(1, len(ctx.queries)))
    missing = [q.id for q in ctx.queries if q.id not in ranked]
    if missing:
        raise QrncaError(f"locator {name!r} returned no neurons for queries {missing[:3]}")
    return {q.id: _as_set(name, q.id, ranked[q.id]) for q in ctx.queries}


def neuron_sets(methods: Sequence[str], ctx: LocatorContext, *, cut: bool = True,
                progress: bool = False) -> dict[str, Ranked]:
    """Each method's neurons per query, cut to the budget: ``ctx.counts``, else QRNCA's count for that query.

    Args:
        methods: registered locator names (``LOCATORS``).
        ctx: the model, queries, prompts (and QRNCA run, budget) the locators read.
        cut: False keeps each locator's whole ranking (what ground truth compares beyond the budget).
        progress: one tqdm bar step per method, its description naming the method.

    Returns:
        ``{method: {query_id: NeuronSet}}``, each set its method's best ``n`` neurons, ``n`` the query's
        budget. Each method's cost lands on ``ctx.costs[method]``: ``seconds`` (wall clock of the locator call,
        ``time.perf_counter``), ``seconds_per_query`` and ``passes`` (as the locator reported them; None if it
        did not).

    Example:
        >>> sets = neuron_sets(["qrnca", "random"], LocatorContext(model, queries, prompts, run))  # doctest: +SKIP
        >>> sets["random"]["capital-01"][:2]                                                      # doctest: +SKIP
        NeuronSet([(27, 1410, 0.0), (3, 88, 0.0)])
    """
    unknown = [m for m in methods if m not in LOCATORS]
    if unknown:
        raise QrncaError(f"unknown method(s) {unknown}; registered locators: {sorted(LOCATORS)}")
    todo: Any = methods
    bar = None
    if progress and methods:
        from tqdm.auto import tqdm

        todo = bar = tqdm(methods, desc="locators", unit="method")
    out = {}
    for m in todo:
        if bar is not None:
            bar.set_description(f"locate {m}")
        out[m] = _rank(m, LOCATORS[m], ctx)
    if not cut:
        return out
    counts = ctx.counts if ctx.counts is not None else qrnca_counts(ctx.qrnca_run(), [q.id for q in ctx.queries])
    return cut_to(out, counts)


def qrnca_counts(run: LocateResult, query_ids: Sequence[str]) -> dict[str, int]:
    """Each query's QR neuron count in ``run`` (the paper's budget).

    Args:
        run: the QRNCA run.
        query_ids: the queries.

    Returns:
        ``{query_id: count}``.

    Example:
        >>> qrnca_counts(run, ["capital-01"])   # doctest: +SKIP
        {'capital-01': 12}
    """
    return {q: len(run.selection.qr[q][0]) for q in query_ids}


def cut_to(sets: Mapping[str, Mapping[str, NeuronSet]], counts: Mapping[str, int]) -> dict[str, Ranked]:
    """Every set cut to its query's count (``{method: {query_id: NeuronSet}}`` in, the same out).

    Example:
        >>> cut_to({"m": {"q": NeuronSet([(0, 1), (0, 2)])}}, {"q": 1})["m"]["q"].pairs()
        [(0, 1)]
    """
    return {m: {q: s[: counts[q]] for q, s in d.items()} for m, d in sets.items()}


def cut_to_qrnca(sets: Mapping[str, Mapping[str, NeuronSet]], run: LocateResult) -> dict[str, Ranked]:
    """Uncut rankings (``neuron_sets(..., cut=False)``) cut to each query's QR neuron count in ``run``.

    Args:
        sets: ``{method: {query_id: NeuronSet}}``.
        run: the QRNCA run whose QR neuron counts set each query's cut.

    Returns:
        The same structure, every set its method's best ``n`` neurons.

    Example:
        >>> sets = cut_to_qrnca(neuron_sets(["atp"], ctx, cut=False), ctx.run)   # doctest: +SKIP
    """
    return cut_to(sets, qrnca_counts(run, list({q for d in sets.values() for q in d})))


def _as_set(method: str, query_id: str, neurons: NeuronsLike) -> NeuronSet:
    """A locator's answer for one query as a NeuronSet; a malformed one names the locator and the query."""
    try:
        return NeuronSet(neurons)
    except QrncaError as e:
        raise QrncaError(f"locator {method!r}, query {query_id!r}: {e}") from None


# ---------------------------------------------------------------- a RankedResult from any ranking


def resolved_proxy(proxy: ProxyConfig, model: HookedModel) -> ProxyConfig:
    """``proxy`` with ``prepend_bos`` resolved for ``model`` (recorded so, a rerun cannot drift)."""
    bos = proxy.prepend_bos if proxy.prepend_bos is not None else default_prepend_bos(model)
    return replace(proxy, prepend_bos=bos)


def check_queries(queries: Sequence[Query]) -> None:
    if not queries:
        raise QrncaError("no queries to locate (the data set is empty)")
    ids = [q.id for q in queries]
    if len(set(ids)) != len(ids):
        raise QrncaError("query ids repeat; every query needs its own id")


def _ranked_result(loc: ContextLocator, model: HookedModel, queries: Sequence[Query], cfg: Any, *,
                   prompts: dict[str, list[Prompt]] | None, run: LocateResult | None, progress: bool,
                   seed: int) -> RankedResult:
    """Rank with ``loc`` on a context built from these arguments, and keep everything evaluate needs."""
    from ..model.access import model_numerics

    held = model_numerics(model)
    queries = list(queries)
    check_queries(queries)
    cfg = coerce_config(loc, cfg)
    ids = [q.id for q in queries]
    outside = [q for q in ids if q not in run.groups] if run is not None else ids
    if loc.uses_run and run is not None and outside:
        raise QrncaError(f"the run given holds no queries {outside[:3]}; give the run these queries were located in, "
                         f"or no run ({loc.name} then locates QRNCA first)")
    # A run's IG was computed on its stored prompts: the methods that reuse it rank on those too.
    same = run if run is not None and not outside else None
    proxy = same.config.proxy if same is not None else resolved_proxy(cfg.proxy, model)
    if hasattr(cfg, "proxy"):
        cfg = replace(cfg, proxy=proxy)
    if prompts is None:
        prompts = same.stored_prompts(ids) if same is not None else \
            build_all_prompts(queries, proxy, tokenizer_of(model), pool=queries)
    else:
        missing = [q for q in ids if not prompts.get(q)]
        if missing:
            raise QrncaError(f"no prompts given for queries {missing[:3]}; pass every query's prompts, or none")
        prompts = {q: list(prompts[q]) for q in ids}
    layers = getattr(cfg, "layers", None)
    ctx = LocatorContext(model, queries, prompts, run, seed, layers=list(layers or []), proxy=proxy, cfg=cfg,
                         progress=progress)
    ranked = _rank(loc.name, loc, ctx)
    meta: dict[str, Any] = {}
    if loc.uses_run and ctx.run is not None:
        meta["qrnca_run"] = str(ctx.run.out) if ctx.run.out is not None else "computed in memory"
    return RankedResult(
        locator=loc.name, config=cfg.to_dict() if isinstance(cfg, Config) else {}, model=model_name(model),
        layers=list(ctx.qrnca_run().layers if loc.uses_run else ctx.layers), groups={q.id: q.group for q in queries},
        neurons=ranked, prompts=prompts, query_records={q.id: q for q in queries}, proxy=proxy,
        costs=dict(ctx.costs.get(loc.name, {})), dtype=held["dtype"], device=held["device"],
        model_identity=model_identity(model), tokenizer=tokenizer_identity(tokenizer_of(model)),
        versions=library_versions(), meta=meta,
    )


def locate(model: HookedModel, queries: QueriesLike, cfg: Any = None, *, method: str = "qrnca",
           run: LocateResult | None = None, seed: int = 0, **kwargs: Any) -> Located | None:
    """Locate every query's neurons with any registered ``method`` (``qrnca_lens.locate``).

    ``method="qrnca"`` (the default) is QRNCA's resumable, shardable run (``qrnca.locate.locate``: every keyword
    of it, e.g. ``out``, ``shard``, ``executor``, ``pool``); any other method returns its ``Located`` (a
    ``RankedResult`` for the built-ins), saved to ``out`` when given (no resume: written once, at the end).
    ``cfg`` is the method's config (``LOCATORS[method].config_class``: ``LocateConfig`` for the IG-based ones,
    ``RankConfig`` for atp/dla/activation, ``RandomConfig``, ``LogprobConfig``) or any config with ``proxy`` and
    ``layers``, whose proxy and layers it takes.

    Args:
        model, queries: the TL model and the queries (``Query`` objects, dicts or a DataFrame; distinct ids).
        cfg: the method's config (default: its own default).
        method: a registered locator name.
        run: a QRNCA run the IG-based methods (no-ica, with-common, kn) and random reuse (its stored prompts and
            scores; its QR neuron count per query for random); without it they locate QRNCA first.
        seed: seeds the methods that draw (random).
        kwargs: ``pool``, ``out``, ``progress``, ``name``, ``data``, ``group_by``, ``prompts`` (every method);
            ``shard``, ``executor``, ``pool_spec``, ``allow_dtype_change`` (QRNCA's run only).

    Returns:
        QRNCA: the ``LocateResult`` (None when ``out`` is given and other shards still have queries to do);
        another method: its ``Located``.

    Example:
        >>> run = locate(model, pool[:10], LocateConfig(ProxyConfig("cloze")), pool=pool)      # doctest: +SKIP
        >>> atp = locate(model, pool[:10], RankConfig(ProxyConfig("cloze")), method="atp")    # doctest: +SKIP
    """
    from ..qrnca.locate import locate as qrnca_locate

    queries = as_queries(queries)
    if method == "qrnca" and run is None:
        return qrnca_locate(model, queries, coerce_config(_locator("qrnca"), cfg), **kwargs)
    if kwargs.get("shard", (0, 1)) != (0, 1) or kwargs.get("executor") is not None:
        raise QrncaError(f"shard= and executor= apply to QRNCA's attribution only, not to method {method!r}; "
                         "leave them out")
    prompts = kwargs.pop("prompts", None)
    given = {q: list(ps) for q, ps in prompts.items()} if prompts is not None else None
    for k in ("shard", "executor", "pool_spec", "allow_dtype_change"):
        kwargs.pop(k, None)
    return locate_with(method, model, queries, cfg, prompts=given, run=run, seed=seed, **kwargs)


def locate_with(method: str, model: HookedModel, queries: Sequence[Query], cfg: Any = None, *,
                pool: Sequence[Query] | None = None, out: str | Path | None = None, progress: bool = True,
                name: str | None = None, data: str | None = None, group_by: str | None = None,
                prompts: dict[str, list[Prompt]] | None = None, run: LocateResult | None = None,
                seed: int = 0) -> Located:
    """``locate(..., method=method)`` for any registered method but QRNCA's own path (see ``locate``).

    Args:
        method: the registered name.
        model, queries, cfg, pool, out, progress, name, data, group_by, prompts, run, seed: as ``locate``'s.

    Returns:
        The method's ``Located`` (a ``RankedResult`` for the built-ins), saved to ``out`` if given.

    Example:
        >>> locate_with("atp", model, queries, RankConfig(ProxyConfig("cloze")), pool=pool)   # doctest: +SKIP
    """
    from ..data.grouping import check_group_by, regroup

    loc = _locator(method)
    queries = list(queries)
    check_queries(queries)
    check_group_by(group_by)
    regroup(queries, group_by or "group")  # a query without the field fails now, not after the work
    cfg = coerce_config(loc, cfg)
    if prompts is None and run is None and isinstance(getattr(cfg, "proxy", None), ProxyConfig):
        # The pool lends examples and distractors here; the locator itself builds from the queries alone.
        prompts = build_all_prompts(queries, resolved_proxy(cfg.proxy, model), tokenizer_of(model), pool=pool)
    res = loc.locate(model, queries, cfg, prompts=prompts, run=run, progress=progress, seed=seed)
    if isinstance(res, RankedResult):
        res.model, res.data, res.group_by = name or res.model, data, group_by or "group"
        if out is not None:
            res.save(out)
    elif out is not None:
        res.write_neurons(out)
    return res


# ---------------------------------------------------------------- the built-ins


def _reuses_ig(ctx: LocatorContext, name: str) -> LocateResult:
    # No extra pass: the run's stored IG scores are read. Their own cost is the IG time locate stored per
    # query (runs made before it was stored have none: None rather than a guess).
    run = ctx.qrnca_run()
    stored = [run.info.get(q.id, {}).get("attribution_seconds") for q in ctx.queries]
    seconds = [float(x) for x in stored if isinstance(x, (int, float))]
    known = bool(stored) and len(seconds) == len(stored)
    report_passes(ctx, name, 0, stored_attribution_seconds=sum(seconds) / len(seconds) if known else None)
    return run


def _from_selection(run: LocateResult, ids: Sequence[str]) -> Ranked:
    return {qid: run.qr_neurons(qid) for qid in ids}


def _ranked(mean: Tensor, layers: Sequence[int], k: int | None) -> NeuronSet:
    """The top ``k`` neurons (None: all) of a [layer, d_mlp] score table, best first, with the model's layer numbers."""
    flat = mean.flatten()
    order = torch.argsort(flat, descending=True, stable=True)[:k]
    width = mean.shape[-1]
    return NeuronSet([(layers[int(i) // width], int(i) % width, float(flat[i])) for i in order])


def _ids(ctx: LocatorContext) -> list[str]:
    return [q.id for q in ctx.queries]


def _qrnca(ctx: LocatorContext) -> Ranked:
    return _from_selection(_reuses_ig(ctx, "qrnca"), _ids(ctx))


def _no_ica(ctx: LocatorContext) -> Ranked:
    run = _reuses_ig(ctx, "no-ica")
    return _from_selection(run.reselect(replace(run.config.selection, use_ica=False)), _ids(ctx))


def _with_common(ctx: LocatorContext) -> Ranked:
    run = _reuses_ig(ctx, "with-common")
    return _from_selection(run.reselect(replace(run.config.selection, remove_common=False)), _ids(ctx))


def _knowledge_neurons(ctx: LocatorContext) -> Ranked:
    run = _reuses_ig(ctx, "kn")
    t = run.config.selection.t
    out: Ranked = {}
    for q in ctx.queries:
        scores = scores_of(run, q.id)  # [prompt, layer, d_mlp]
        kept = prompt_clusters(scores, t)
        shared = kept.sum(0) > KN_SHARE * scores.shape[0]
        summed = scores.sum(0)
        idx = torch.nonzero(shared)
        order = torch.argsort(summed[shared], descending=True, stable=True)
        out[q.id] = NeuronSet([(run.layers[int(idx[i, 0])], int(idx[i, 1]), float(summed[shared][i]))
                               for i in order])
    return out


def _activation(ctx: LocatorContext) -> Ranked:
    report_passes(ctx, "activation", ctx.n_prompts())
    layers = ctx.layers
    names = [mlp_hook_name(ctx.model, layer) for layer in layers]
    out: Ranked = {}
    device = model_device(ctx.model)
    for q in ctx.queries:
        acts = []
        for p in ctx.prompts[q.id]:
            store: dict[str, torch.Tensor] = {}
            grab = [(n, capture(store, n, position=p.target_position)) for n in names]
            with torch.no_grad(), hooked(ctx.model, fwd=grab):
                ctx.model(torch.tensor([list(p.tokens)], device=device))
            acts.append(torch.stack([store[n][0].float().cpu() for n in names]))
        out[q.id] = _ranked(torch.stack(acts).mean(0), layers, ctx.top_k(q.id, TOP))
    return out


def _atp(ctx: LocatorContext) -> Ranked:
    """Attribution patching: mean over the query's prompts of f · dP/df (minus the first-order zero-ablation
    effect; large = supports the target, as QRNCA ranks)."""
    report_passes(ctx, "atp", 2 * ctx.n_prompts())  # one forward and one backward per prompt
    return {q.id: _ranked(atp_scores(ctx.model, ctx.prompts[q.id], ctx.layers).mean(0), ctx.layers,
                          ctx.top_k(q.id, TOP)) for q in ctx.queries}


def _dla(ctx: LocatorContext) -> Ranked:
    """Direct logit attribution: mean over the query's prompts of each neuron's raw target-logit contribution."""
    report_passes(ctx, "dla", ctx.n_prompts())
    return {q.id: _ranked(dla_scores(ctx.model, ctx.prompts[q.id], ctx.layers).mean(0), ctx.layers,
                          ctx.top_k(q.id, TOP)) for q in ctx.queries}


def _random_count(ctx: LocatorContext, query_id: str) -> int:
    if ctx.counts is not None:
        return ctx.counts[query_id]
    if isinstance(ctx.cfg, RankConfig) and ctx.cfg.top_k is not None:
        return ctx.cfg.top_k
    if ctx.run is not None and query_id in ctx.run.selection.qr:
        return len(ctx.run.selection.qr[query_id][0])
    raise QrncaError("random needs a count per query: give RandomConfig(top_k=K), or run= (a QRNCA run: its count "
                     "per query)")


def _random(ctx: LocatorContext) -> Ranked:
    report_passes(ctx, "random", 0)
    width = d_mlp(ctx.model)
    total = len(ctx.layers) * width
    out: Ranked = {}
    for q in ctx.queries:
        n = _random_count(ctx, q.id)
        # Seeded per query from (seed, id): repeatable, independent of query order and of the global RNG.
        digest = int(hashlib.sha256(f"{ctx.seed}|random|{q.id}".encode()).hexdigest()[:15], 16)
        g = torch.Generator().manual_seed(digest)
        pick = torch.randperm(total, generator=g)[:n]
        out[q.id] = NeuronSet([(ctx.layers[int(i) // width], int(i) % width, 0.0) for i in pick])
    return out


def _logprob(ctx: LocatorContext) -> Ranked:
    from ..lens import lens_locate

    report_passes(ctx, "logprob", ctx.n_prompts())  # one cached forward per prompt; the rest is arithmetic
    keep = {q.id: ctx.top_k(q.id, LENS_TOP) for q in ctx.queries}
    width = len(ctx.layers) * d_mlp(ctx.model)
    k = max(min(width, x if x is not None else width) for x in keep.values())
    lens_cfg = ctx.cfg.lens if isinstance(ctx.cfg, LogprobConfig) else LensConfig(mode="topk")
    every = ctx.layers == list(range(n_layers(ctx.model)))
    res = lens_locate(ctx.model, list(ctx.queries), ctx.proxy_config(), prompts=ctx.prompts, progress=False, top_k=k,
                      cfg=lens_cfg, layers=None if every else ctx.layers)
    certified = [bool(res.certified.get(q.id, False)) for q in ctx.queries]
    ctx.costs["logprob"]["certified_share"] = sum(certified) / max(1, len(certified))
    return {q.id: res.qr_neurons(q.id)[: keep[q.id]] for q in ctx.queries}


LOCATORS["qrnca"] = _QrncaLocator("qrnca", _qrnca, LocateConfig, True)
for _name, _fn, _cls, _uses in (
    ("no-ica", _no_ica, LocateConfig, True), ("with-common", _with_common, LocateConfig, True),
    ("kn", _knowledge_neurons, LocateConfig, True), ("activation", _activation, RankConfig, False),
    ("atp", _atp, RankConfig, False), ("dla", _dla, RankConfig, False), ("random", _random, RandomConfig, False),
    ("logprob", _logprob, LogprobConfig, False),
):
    LOCATORS[_name] = ContextLocator(_name, _fn, _cls, _uses)
del _name, _fn, _cls, _uses
