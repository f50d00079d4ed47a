"""Prove the neurons: every locator's neurons judged by the same metrics, in one table (METHOD section 4).

``evaluate(model, located)`` judges any ``Located``: a QRNCA ``LocateResult`` (methods default to
``DEFAULT_METHODS``), or another method's result (a ``RankedResult`` from ``locate(..., method="atp")``, a
``LensResult``; methods default to its own and ``random``), whose own neurons are judged as it found them.
Every stage reads the prompts the located stored when it located each query (``stored_prompts``), never
rebuilt ones, so the data file may change or vanish after ``locate`` without changing the verdict (``pool``
is therefore ignored).

**Dtype.** A result is judged with a model of the dtype it records; another dtype is refused in one line
unless ``allow_dtype_change`` (a result that predates recording its dtype is said to be unknown and not
checked). The device may differ freely; both are recorded in ``meta`` (``dtype``, ``device``, ``run_dtype``,
``run_device``).

**Budget** (``EvalConfig.budget``, recorded in ``meta["budget"]``): how many neurons each method gets per
query: ``"qrnca"`` QRNCA's count for that query (the paper's comparison; the default for a QRNCA run),
``"own"`` the evaluated located's own count (the default otherwise), or an int k for every query. A query
whose set is empty for a method is named in a warning, counted (``pcr[method]["n_empty"]``) and left out of
that method's numbers, never scored as an intervention on no neurons.

For each method and query (neurons cut to the budget):

- **PCR.** Boost (x2) or suppress (x0) the query's neurons at the last prompt position (``every_position`` for
  all positions) on its own prompts (related) and on the prompts of a control query drawn, seeded, from a
  *different* group (unrelated). A query's change is the mean over its prompts of 100·(p_after − p_before) /
  p_before of the full-vocabulary probability of the target (a product over tokens under teacher forcing).
  PCR = mean |related| / mean |unrelated| over queries, with signed means and a 95% bootstrap interval
  (queries resampled).
- **Editing.** Prediction = argmax over the options (MCQA) or the top-1 token (cloze). Boost success = share
  of wrongly answered prompts that become right; suppress success = share of rightly answered prompts that
  become wrong.
- **Neuron-based prediction** (our reconstruction: the paper's procedure is in a supplement we do not have).
  Within each group, the QR neurons of the even-indexed queries are pooled into group neurons (ranked by
  summed naica, top ``group_neurons``); for each odd-indexed (held-out) query and each candidate answer
  (its options, or for cloze the answer plus the proxy's distractors), the candidate is appended to the
  prompt and the group neurons' summed activation (the attributed hook, at the candidate's last token) is
  read; the prediction is the most activating candidate. Compared with the model's own prediction over the
  same candidates.
- **Free-form check** (beyond the paper; cloze and answer-text queries): ablate the QR neurons at every
  position while scoring the answer under teacher forcing; report the drop in its log-likelihood and greedy
  exact match before/after; the same for equal-size random neurons; the ratio of the mean drops.

Every number is computed per group and overall. Interventions run batched, one neuron set per row.

**Profile.** Each stage's wall-clock seconds land in ``EvaluationResult.timings`` (``StageTimings``: prepare,
locate, scored rows, PCR/editing, free form with its greedy decoding, neuron prediction, symbol binding,
ground truth, total), saved in evaluation.json and printed as the last note of ``table()``.

**Groups.** ``EvalConfig.group_by`` (default: the run's recorded ``LocateResult.group_by``) picks the query field
that makes the groups: ``group``, ``language`` or ``relation`` (``grouping.regroup``). It decides the per-group
numbers, the group neurons of neuron-based prediction, and where unrelated controls come from: grouped by
language, a query's control is from *another language* (it may share the relation), so PCR asks whether the
neurons are specific to the language; grouped by relation, the control is another relation, possibly in the
same language. Prompts are the stored ones either way (examples and distractors from ``Query.group``).

Example:
    >>> res = evaluate(model, run, cfg=EvalConfig())   # the run's stored prompts  # doctest: +SKIP
    >>> print(res.table())                                        # doctest: +SKIP
    >>> evaluate(model, locate(model, queries, cfg, method="atp")).meta["budget"]  # doctest: +SKIP
    'own'
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from ..atomic import write_json_atomic
from ..config import Config
from ..data.grouping import GroupBy, check_group_by, regroup
from ..data.prompts import Prompt, ProxyConfig, tokenizer_identity
from ..data.queries import Query, groups_of
from ..engine import Row, run_rows
from ..engine.scoring import ItemScore, score_items
from ..errors import QrncaError
from ..located import Located
from ..locators.registry import LocatorContext, Ranked, cut_to, neuron_sets, qrnca_counts
from ..model.access import dtype_name, mlp_hook_name, model_device, model_dtype, pad_batch, pad_token_id, tokenizer_of
from ..model.interventions import BOOST, SUPPRESS, Intervention, row_factors, scale_rows
from ..neurons import NeuronSet, top_pooled
from ..protocols import HookedModel
from ..qrnca.locate import LocateResult
from ..qrnca.store import check_run_dtype
from ..versions import library_versions, model_identity, versions_line
from .metrics import bootstrap_ci, editing_rates, mean_or_none, pcr, relative_change_log
from .result import EvaluationResult, StageTimings

if TYPE_CHECKING:  # only the annotation needs the class; the executors load on first use
    from ..qrnca.executors import Executor

__all__ = ["EvalConfig", "evaluate", "evaluation_doc", "control_queries", "DEFAULT_METHODS", "BUDGETS"]

DEFAULT_METHODS = ("qrnca", "no-ica", "with-common", "kn", "activation", "random")
BUDGETS = ("qrnca", "own")
T = TypeVar("T")


@dataclass(frozen=True)
class EvalConfig(Config):
    """What ``evaluate`` judges and how: the locators compared, seeds, bootstrap size, batching.

    ``methods`` None: ``DEFAULT_METHODS`` for a QRNCA run, else the evaluated method and ``random``.
    ``budget`` None: ``"qrnca"`` for a QRNCA run, else ``"own"`` (see the module docstring).

    Example:
        >>> cfg = EvalConfig(methods=("qrnca", "random"), n_boot=200, budget=10)
        >>> cfg.to_dict()["methods"], cfg.every_position, cfg.budget
        (['qrnca', 'random'], False, 10)
        >>> EvalConfig(budget="most")
        Traceback (most recent call last):
        ...
        qrnca_lens.errors.QrncaError: budget must be 'qrnca', 'own' or a number of neurons >= 1, got 'most'
    """

    methods: tuple[str, ...] | None = field(default=None, metadata={
        "help": "comma-separated locators (also: atp, dla, logprob; default: for a QRNCA run "
                + ",".join(DEFAULT_METHODS) + ", for another method's result that method and random)"})
    seed: int = field(default=0, metadata={"help": "seed of the control queries, random neurons and bootstrap"})
    every_position: bool = field(default=False, metadata={"help": "intervene at every position, not the last"})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples for the 95% intervals"})
    batch_size: int = field(default=8, metadata={"help": "scored prompts (with their interventions) per batch"})
    free_form: bool = True
    neuron_prediction: bool = True
    group_neurons: int = 50
    # Last-position scoring through the row engine (False: full sequences, the slow oracle; same numbers).
    engine: bool = True
    group_by: GroupBy | None = field(default=None, metadata={
        "help": "the query field whose groups give per-group numbers and unrelated controls (default: the run's)"})
    ground_truth: bool = field(default=False, metadata={
        "help": "also judge every locator against exact single-neuron ablations of its top-k (slow)"})
    ground_truth_k: int = field(default=50, metadata={"help": "ground truth: each locator's top-k candidates"})
    ground_truth_queries: int | None = field(default=None, metadata={
        "help": "ground truth on the first N queries of each group (default: all)"})
    symbol_binding: bool = field(default=True, metadata={
        "help": "letter MCQA: re-letter the options and measure whether boosts follow the letter or the content"})
    budget: str | int | None = field(default=None, metadata={
        "help": "neurons per query for every method: qrnca (QRNCA's count per query, the paper's comparison), "
                "own (the evaluated result's count per query) or an integer k (default: qrnca for a QRNCA run, "
                "else own)"})

    def validate(self) -> None:
        check_group_by(self.group_by)
        if self.methods is not None and not self.methods:
            raise QrncaError("no methods to evaluate")
        b = self.budget
        if not (b is None or b in BUDGETS or (isinstance(b, int) and not isinstance(b, bool) and b >= 1)):
            raise QrncaError(f"budget must be 'qrnca', 'own' or a number of neurons >= 1, got {b!r}")
        if self.batch_size < 1 or self.n_boot < 10:
            raise QrncaError("batch_size must be >= 1 and n_boot >= 10")
        if self.ground_truth_k < 1 or (self.ground_truth_queries is not None and self.ground_truth_queries < 1):
            raise QrncaError("ground_truth_k and ground_truth_queries must be at least 1")


# ---------------------------------------------------------------- controls


def control_queries(queries: Sequence[Query], seed: int = 0, by: str = "group") -> dict[str, str]:
    """For each query, a seeded query of a different group under ``by`` (the unrelated control).

    Args:
        queries: the judged queries; seed: the draw's seed (a query's draw depends on it and its id only);
        by: ``"group"``, ``"language"`` or ``"relation"`` (by language: a control of another language).

    Returns:
        Query id -> its control's id.

    Example:
        >>> qs = [Query("a", "g", "x [Y]", "1"), Query("b", "h", "y [Y]", "2")]
        >>> control_queries(qs)
        {'a': 'b', 'b': 'a'}
    """
    queries = regroup(queries, by)
    groups = groups_of(queries)
    if len(groups) < 2:
        only = next(iter(groups)) if groups else "none"
        raise QrncaError(
            f"all queries are in one group ({only!r}): no unrelated control exists, so PCR is undefined; "
            "evaluate a collection that spans at least two groups"
        )
    out = {}
    for q in queries:
        others = [o.id for o in queries if o.group != q.group]
        out[q.id] = random.Random(f"{seed}|control|{q.id}").choice(others)
    return out


# ---------------------------------------------------------------- evaluate


def _query_changes(before: dict[tuple[str, int], float], after: Sequence[float],
                   keys: Sequence[tuple[str, int]], owners: Sequence[str]) -> dict[str, float]:
    """Mean relative change per owning query (from log-probabilities: tiny probabilities do not underflow)."""
    ch = relative_change_log([before[k] for k in keys], after)
    per: dict[str, list[float]] = {}
    for o, c in zip(owners, ch):
        per.setdefault(o, []).append(float(c))
    return {o: float(np.mean(v)) for o, v in per.items()}


class _Clock:
    """Wall-clock seconds (``time.perf_counter``) per stage of one ``evaluate`` call, and its total.

    Example:
        >>> clock = _Clock()
        >>> with clock.stage("locate"):
        ...     pass
        >>> t = clock.done()
        >>> 0 <= t.locate <= t.total
        True
    """

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block into ``name`` (added to what ``name`` already holds: a stage may run in parts)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def timed(self, name: str, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn`` with every call timed into ``name``."""
        def call(*args: Any, **kwargs: Any) -> T:
            with self.stage(name):
                return fn(*args, **kwargs)

        return call

    def done(self) -> StageTimings:
        """The stages timed so far and the total since the clock started."""
        seconds: dict[str, Any] = {**self.seconds, "total": time.perf_counter() - self._start}
        return StageTimings(**seconds)  # a stage name StageTimings does not know is a TypeError, not lost


@dataclass
class _Plan:
    """What ``_prepare`` settles before any scoring; every later stage of ``evaluate`` reads it."""

    located: Located
    qrnca: LocateResult | None  # the located when it is a QRNCA run
    own: str  # the located's method name
    methods: tuple[str, ...]
    budget: str | int
    dtype: str
    device: str
    ex: Any  # the Executor (annotated loosely: executors imports evaluation's neighbours)
    ids: list[str]
    by: str
    queries: list[Query]  # regrouped by ``by``
    prompts: dict[str, list[Prompt]]
    controls: dict[str, str]
    proxy: ProxyConfig
    ctx: LocatorContext
    counts: dict[str, int]


def evaluate(
    model: HookedModel,
    run: Located,
    queries: Sequence[Query | str] | None = None,
    pool: Sequence[Query] | None = None,
    cfg: EvalConfig = EvalConfig(),
    *,
    progress: bool = True,
    executor: Executor | None = None,
    allow_dtype_change: bool = False,
    save: bool = True,
) -> EvaluationResult:
    """Judge every method's neurons on PCR, editing, neuron-based prediction and the free-form check.

    Args:
        model: the TL model the result was made with.
        run: any ``Located`` (from ``locate``, ``LocateResult.load``, ``RankedResult.load``, ``lens_locate``);
            every stage reads the prompts it stored (see the module docstring).
        queries: queries or ids of the result to judge (default: all); PCR needs at least two groups.
        pool: ignored (kept so that older calls keep working).
        cfg: locators compared, the neuron budget per query, seed, bootstrap size, batching, which checks run.
        progress: show progress bars (each locator, the free-form check, neuron prediction).
        executor: where the batched scoring runs (default: this process).
        allow_dtype_change: judge with a model of another dtype than the result records (module docstring).
        save: write ``evaluation.json`` into ``run.run_dir`` when it has one (the command line's way).

    Returns:
        An ``EvaluationResult``: PCR (boost/suppress, 95% CIs, ``n_empty``), editing rates, neuron-based
        prediction and the free-form check per method, overall and per group; ``meta["budget"]`` and
        ``meta["budget_note"]`` say how many neurons each method got; ``timings`` (``StageTimings``) the
        wall-clock seconds of each stage and the total.

    Example:
        >>> res = evaluate(model, run, cfg=EvalConfig(methods=("qrnca", "random")))   # doctest: +SKIP
        >>> sorted(res.pcr), sorted(res.pcr["qrnca"])[:2]                             # doctest: +SKIP
        (['qrnca', 'random'], ['boost', 'boost_ci'])
    """
    clock = _Clock()
    with clock.stage("prepare"):
        plan = _prepare(model, run, queries, cfg, progress, executor, allow_dtype_change)
    with clock.stage("locate"):
        uncut, sets, empty = _locate_all(plan, progress)
    with clock.stage("scored_rows"):
        flat, blocks, scored, before, correct_before = _score_rows(plan, sets, empty, cfg, progress)
    with clock.stage("pcr_editing"):
        pcr_out, editing, per_group = _pcr_and_editing(plan, sets, empty, blocks, scored, before, correct_before,
                                                       cfg, progress)
    result = EvaluationResult(pcr=pcr_out, editing=editing, per_group=per_group,
                              meta=_meta(model, plan, cfg, len(flat), before, correct_before, empty))
    result.costs = {m: dict(plan.ctx.costs.get(m, {})) for m in plan.methods}
    if cfg.free_form and plan.proxy.kind in ("cloze", "mcqa-text"):
        with clock.stage("free_form"):
            result.free_form = _free_form(model, plan.queries, plan.prompts, sets, run, plan.ctx, cfg, progress,
                                          clock=clock)
    if cfg.neuron_prediction:
        with clock.stage("neuron_prediction"):
            result.neuron_prediction = _neuron_prediction(model, plan.queries, plan.prompts, _own_sets(plan, sets),
                                                          cfg, plan.own, progress)
    if cfg.symbol_binding and plan.proxy.kind == "mcqa-letter":
        with clock.stage("symbol_binding"):
            result.symbol_binding = _symbol_binding(model, plan.prompts, sets, empty, plan.proxy, cfg, plan.ex,
                                                    progress)
    if cfg.ground_truth:
        with clock.stage("ground_truth"):
            result.ground_truth = _ground_truth(model, plan, uncut, cfg, progress)
    result.timings = clock.done()  # before the write: evaluation.json holds them
    if save and run.run_dir is not None:
        write_json_atomic(run.run_dir / "evaluation.json", evaluation_doc(result, run))
    return result


def _prepare(model: HookedModel, located: Located, queries: Sequence[Query | str] | None, cfg: EvalConfig,
             progress: bool, executor: Executor | None, allow_dtype_change: bool) -> _Plan:
    """The methods and budget, the dtype and tokenizer checks, the judged queries regrouped with their stored
    prompts, the controls and the locators' context (with each query's budget: QRNCA may be located here)."""
    from ..qrnca.executors import SerialExecutor

    qrnca = located if isinstance(located, LocateResult) else None
    own = located.locator_name()
    methods = tuple(cfg.methods) if cfg.methods is not None else (
        DEFAULT_METHODS if qrnca is not None else tuple(dict.fromkeys((own, "random"))))
    budget: str | int = cfg.budget if cfg.budget is not None else ("qrnca" if qrnca is not None else "own")
    dtype, device = dtype_name(model_dtype(model)), str(model_device(model))
    if located.run_dir is not None or located.dtype is not None:  # an in-memory result built by hand records none
        check_run_dtype(located.run_dir if located.run_dir is not None else located.model, located.dtype, dtype,
                        allow_dtype_change)
    ex = executor if executor is not None else SerialExecutor(model)
    known = list(qrnca.groups) if qrnca is not None else located.query_ids
    asked = known if queries is None else [q if isinstance(q, str) else q.id for q in queries]
    mine = set(qrnca.selection.qr) if qrnca is not None else set(known)
    ids = [q for q in asked if q in mine]
    if not ids:
        raise QrncaError("none of the queries belongs to this run")
    by = cfg.group_by or located.group_by
    # The one relabelling: from here on a query's group is its ``by`` field (its prompts are the stored ones).
    judged = regroup(located.stored_queries(ids), by)
    prompts = located.stored_prompts(ids)
    _check_tokenizer(located, ids, model)
    controls = control_queries(judged, cfg.seed)
    proxy = located.proxy_config()
    ctx = LocatorContext(model, judged, prompts, qrnca, cfg.seed, layers=list(located.layers), proxy=proxy,
                         progress=progress)
    ctx.counts = counts = _budget_counts(budget, located, ctx, ids)
    return _Plan(located, qrnca, own, methods, budget, dtype, device, ex, ids, by, judged, prompts, controls, proxy,
                 ctx, counts)


def _locate_all(plan: _Plan, progress: bool) -> tuple[dict[str, Ranked], dict[str, Ranked], dict[str, set[str]]]:
    """Each method's whole ranking per query, the same cut to the budget, and the queries each left empty."""
    # Whole rankings once: ground truth compares each locator's top-k; every other judge gets the budget. The
    # evaluated result's own method is judged on the neurons it found, not located again.
    methods, own = plan.methods, plan.own
    given = plan.qrnca is None and own in methods
    uncut = neuron_sets([m for m in methods if not (given and m == own)], plan.ctx, cut=False, progress=progress)
    if given:
        uncut[own] = {i: plan.located.qr_neurons(i) for i in plan.ids}
        plan.ctx.costs[own] = dict(getattr(plan.located, "costs", None) or {})
    uncut = {m: uncut[m] for m in methods}
    sets = cut_to(uncut, plan.counts)
    return uncut, sets, _empty_sets(sets, plan.ids)


_Block = tuple[str, str, int, list[tuple[str, int]], list[str], list[bool]]  # method, kind, start, keys, owners, related


def _score_rows(plan: _Plan, sets: dict[str, Ranked], empty: dict[str, set[str]], cfg: EvalConfig, progress: bool
                ) -> tuple[list[tuple[str, int, Prompt]], list[_Block], list[ItemScore], dict[tuple[str, int], float],
                           dict[tuple[str, int], bool]]:
    """Every scored row of the evaluation in one call: the clean prompts, then each (method, boost/suppress)'s
    related and unrelated rows (a block each). Returns the clean prompts, the blocks, the scores and each clean
    prompt's target log-probability and correctness, keyed by (query id, prompt index)."""
    # The engine runs each prompt's prefix once for all the rows. A query with no neurons for a method has no
    # rows of that method: it is left out, not scored as "no change".
    queries, prompts, controls = plan.queries, plan.prompts, plan.controls
    flat = [(q.id, i, p) for q in queries for i, p in enumerate(prompts[q.id])]
    items: list[tuple[Prompt, Any]] = [(p, None) for _, _, p in flat]
    blocks: list[_Block] = []
    steps = [(m, f) for m in plan.methods for f in ("boost", "suppress")]
    for m, kind in steps:
        factor = BOOST if kind == "boost" else SUPPRESS
        keys, owners, related = [], [], []
        start = len(items)
        for q in queries:
            if q.id in empty[m]:
                continue
            iv = (sets[m][q.id], factor)  # one object per (method, kind, query): scoring runs it once per row
            for target_q, is_rel in ((q.id, True), (controls[q.id], False)):
                for i, p in enumerate(prompts[target_q]):
                    items.append((p, iv))
                    keys.append((target_q, i))
                    owners.append(q.id)
                    related.append(is_rel)
        blocks.append((m, kind, start, keys, owners, related))
    if progress:
        print(f"evaluate: {len(items)} scored rows ({len(plan.methods)} methods x boost/suppress x related/unrelated "
              f"+ {len(flat)} clean prompts); neurons per query: {_budget_note(plan.budget)}")
    scored = plan.ex.score_items(items, every_position=cfg.every_position, batch_size=cfg.batch_size,
                                 engine=cfg.engine, progress=progress)
    clean = scored[: len(flat)]
    before = {(qid, i): s.target_logprob for (qid, i, _), s in zip(flat, clean)}
    correct_before = {(qid, i): s.correct for (qid, i, _), s in zip(flat, clean)}
    return flat, blocks, scored, before, correct_before


def _pcr_and_editing(plan: _Plan, sets: dict[str, Ranked], empty: dict[str, set[str]], blocks: Sequence[_Block],
                     scored: Sequence[ItemScore], before: dict[tuple[str, int], float],
                     correct_before: dict[tuple[str, int], bool], cfg: EvalConfig, progress: bool
                     ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """PCR per method (overall and per group) from each block's rows, editing from the related rows.

    Returns:
        ``(pcr, editing, per_group)`` as ``EvaluationResult`` holds them.
    """
    groups = groups_of(plan.queries)
    pcr_out: dict[str, dict[str, Any]] = {}
    edit_out: dict[str, dict[str, Any]] = {}
    group_out: dict[str, dict[str, Any]] = {g: {"pcr": {}, "editing": {}} for g in groups}
    for m, kind, start, keys, owners, related in _bar(blocks, "evaluate", progress):
        scores = scored[start : start + len(keys)]
        after = [s.target_logprob for s in scores]
        rel_idx = [i for i, r in enumerate(related) if r]
        unr_idx = [i for i, r in enumerate(related) if not r]
        rel = _query_changes(before, [after[i] for i in rel_idx], [keys[i] for i in rel_idx], [owners[i] for i in rel_idx])
        unr = _query_changes(before, [after[i] for i in unr_idx], [keys[i] for i in unr_idx], [owners[i] for i in unr_idx])
        kept = [i for i in plan.ids if i not in empty[m]]
        entry = pcr_out.setdefault(m, {"mean_neurons": float(np.mean([len(sets[m][i]) for i in kept])) if kept else 0.0,
                                       "n_empty": len(empty[m]), "empty_queries": sorted(empty[m])})
        entry.update(_pcr_numbers(kind, [rel[i] for i in kept], [unr[i] for i in kept], cfg))
        # Editing: the related rows only.
        edit_out.setdefault(m, {})[kind] = {(keys[i]): scores[i].correct for i in rel_idx}
        for g, members in groups.items():
            gid = [q.id for q in members if q.id in rel]
            gr, gu = [rel[i] for i in gid], [unr[i] for i in gid]
            group_out[g]["pcr"].setdefault(m, {})[kind] = pcr(gr, gu) if gu else None
            group_out[g]["pcr"][m][f"{kind}_related_mean"] = mean_or_none(gr)
    by_id = {q.id: q for q in plan.queries}
    editing: dict[str, dict[str, Any]] = {}
    for m, d in edit_out.items():
        ks = sorted(d["boost"])
        editing[m] = editing_rates([correct_before[k] for k in ks], [d["boost"][k] for k in ks],
                                   [d["suppress"][k] for k in ks])
        for g in groups:
            gk = [k for k in ks if by_id[k[0]].group == g]
            group_out[g]["editing"][m] = editing_rates([correct_before[k] for k in gk],
                                                       [d["boost"][k] for k in gk], [d["suppress"][k] for k in gk])
    return pcr_out, editing, group_out


def _pcr_numbers(kind: str, r_vals: list[float], u_vals: list[float], cfg: EvalConfig) -> dict[str, Any]:
    """One method's PCR numbers for ``kind`` over its kept queries' related and unrelated changes."""
    if not r_vals:  # no query had a neuron: nothing to measure, said as None rather than a number
        return {kind: None, f"{kind}_ci": None, f"{kind}_ci_dropped": 0, f"{kind}_related_mean": None,
                f"{kind}_unrelated_mean": None, f"{kind}_related_abs": None, f"{kind}_unrelated_abs": None}
    value = pcr(r_vals, u_vals)
    ci = bootstrap_ci(r_vals, u_vals, n_boot=cfg.n_boot, seed=cfg.seed)
    return {kind: value, f"{kind}_ci": list(ci), f"{kind}_ci_dropped": ci.dropped,
            f"{kind}_related_mean": float(np.mean(r_vals)), f"{kind}_unrelated_mean": float(np.mean(u_vals)),
            f"{kind}_related_abs": float(np.mean(np.abs(r_vals))),
            f"{kind}_unrelated_abs": float(np.mean(np.abs(u_vals)))}


def _meta(model: HookedModel, plan: _Plan, cfg: EvalConfig, n_prompts: int, before: dict[tuple[str, int], float],
          correct_before: dict[tuple[str, int], bool], empty: dict[str, set[str]]) -> dict[str, Any]:
    """``EvaluationResult.meta``: the config, counts, clean accuracy, controls, versions, dtypes and the budget."""
    located = plan.located
    return {"config": cfg.to_dict(), "n_queries": len(plan.queries), "n_prompts": n_prompts,
            "model_accuracy": float(np.mean(list(correct_before.values()))),
            "mean_target_prob": float(np.mean([np.exp(v) for v in before.values()])),
            "proxy": plan.proxy.kind, "controls": plan.controls, "group_by": plan.by,
            "versions": library_versions(), "model_identity": model_identity(model),
            "dtype": plan.dtype, "device": plan.device, "run_dtype": located.dtype, "run_device": located.device,
            "located": plan.own, "methods": list(plan.methods), "budget": plan.budget,
            "budget_note": _budget_note(plan.budget), "n_empty": {m: len(empty[m]) for m in plan.methods}}


def _own_sets(plan: _Plan, sets: dict[str, Ranked]) -> Ranked:
    """The located's own neurons to the budget (neuron-based prediction reads them even when not compared)."""
    own = plan.own
    return sets[own] if own in sets else cut_to({own: {i: plan.located.qr_neurons(i) for i in plan.ids}},
                                                plan.counts)[own]


def _ground_truth(model: HookedModel, plan: _Plan, uncut: dict[str, Ranked], cfg: EvalConfig,
                  progress: bool) -> dict[str, Any]:
    """Each locator's whole ranking against single-neuron ablations on the first queries of each group."""
    from ..data.queries import limit_per_group
    from .ground_truth import ground_truth

    chosen = limit_per_group(plan.queries, cfg.ground_truth_queries)
    if progress:
        print(f"ground truth: {len(chosen)} queries, each locator's top-{cfg.ground_truth_k} + as many random "
              "neurons, zero-ablated and doubled one at a time")
    gt = ground_truth(model, chosen, {q.id: plan.prompts[q.id] for q in chosen},
                      {m: {q.id: uncut[m][q.id] for q in chosen} for m in plan.methods},
                      k=cfg.ground_truth_k, seed=cfg.seed, layers=plan.located.layers, progress=progress)
    return gt.to_dict()


def _bar(it: Any, desc: str, progress: bool) -> Any:
    if not progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, unit="step")


def evaluation_doc(res: EvaluationResult, located: Located) -> dict[str, Any]:
    """evaluation.json: the result's dict; for a QRNCA run also which selection's neurons it judged (a later
    reduce warns when it differs).

    Args:
        res: the evaluation.
        located: what it judged.

    Returns:
        The JSON-ready document ``evaluate`` writes into ``located.run_dir``.

    Example:
        >>> evaluation_doc(res, run)["meta"]["selection"]   # doctest: +SKIP
        {'t': 0.2, 'u': 0.3, 'v': 50, ...}
    """
    doc = res.to_dict()
    if isinstance(located, LocateResult):
        doc["meta"] = {**doc.get("meta", {}), "selection": located.config.selection.to_dict()}
    return doc


def _budget_counts(budget: str | int, located: Located, ctx: LocatorContext, ids: Sequence[str]) -> dict[str, int]:
    """Each query's neuron budget: QRNCA's count (the run's, or QRNCA located now), the located's own, or k."""
    if budget == "qrnca":
        return qrnca_counts(ctx.qrnca_run(), ids)
    if budget == "own":
        return {i: len(located.qr_neurons(i)) for i in ids}
    assert isinstance(budget, int)
    return {i: budget for i in ids}


def _budget_note(budget: str | int) -> str:
    if budget == "qrnca":
        return "every method cut to QRNCA's count for each query (the paper's comparison)"
    if budget == "own":
        return "every method cut to the evaluated result's own count for each query"
    return f"every method cut to {budget} neurons per query"


def _empty_sets(sets: dict[str, dict[str, NeuronSet]], ids: Sequence[str]) -> dict[str, set[str]]:
    """Per method, the queries it found no neuron for; each such method is named in a warning."""
    empty = {m: {i for i in ids if not per[i]} for m, per in sets.items()}
    for m, e in empty.items():
        if e:
            shown = [i for i in ids if i in e]
            warnings.warn(f"evaluate: {m!r} has no neurons for {len(e)} of {len(ids)} queries ({', '.join(shown[:5])}"
                          f"{', ...' if len(shown) > 5 else ''}); they are left out of its numbers "
                          f"(pcr[{m!r}]['n_empty'])", stacklevel=4)
    return empty


def _symbol_binding(model: HookedModel, prompts: dict[str, list[Prompt]], sets: dict[str, dict[str, NeuronSet]],
                    empty: dict[str, set[str]], proxy: ProxyConfig, cfg: EvalConfig, ex: Any,
                    progress: bool = False) -> dict[str, Any]:
    """The letter control on each method's non-empty queries: one call per distinct set of such queries."""
    from .symbol_binding import symbol_binding

    parts: dict[frozenset[str], list[str]] = {}
    for m in sets:
        parts.setdefault(frozenset(empty[m]), []).append(m)
    merged: dict[str, Any] = {}
    for left_out, ms in parts.items():
        ps = {q: v for q, v in prompts.items() if q not in left_out}
        if not ps:
            continue
        got = symbol_binding(model, ps, {m: {q: sets[m][q] for q in ps} for m in ms}, seed=cfg.seed, proxy=proxy,
                             batch_size=cfg.batch_size, engine=cfg.engine, executor=ex, progress=progress).to_dict()
        if not merged:
            merged = got
            continue
        merged["per_method"].update(got["per_method"])
        merged["per_query"].update(got["per_query"])
        merged["per_prompt"].extend(got["per_prompt"])
    return merged


def _check_tokenizer(located: Located, ids: Sequence[str], model: HookedModel) -> None:
    """Stored token ids mean something only under the tokenizer that made them."""
    stored = located.stored_tokenizers(ids)
    if not stored:
        return
    mine = tokenizer_identity(tokenizer_of(model))
    if stored != {mine["vocab_sha256"]}:
        raise QrncaError(
            f"the run's prompts were tokenized by another tokenizer than this model's ({mine['name_or_path']!r}, "
            f"{mine['vocab_size']} tokens); evaluate with the model the run was made with ({located.model!r})"
        )


# ---------------------------------------------------------------- free-form check


def _greedy(model: HookedModel, items: Sequence[tuple[Prompt, Intervention]], batch_size: int,
            progress: bool = False, desc: str = "free-form greedy") -> list[tuple[int, ...]]:
    """Greedy continuation of each prompt, as many tokens as its target, intervening at every position.

    Incremental: a chunk of at most ``batch_size`` prompts runs once into a key/value cache, then one token
    per step behind it, the neurons scaled at every position (the new tokens too). On a bridge over
    transformers (``backend_of``: ``"packed"``) a chunk is any prompts (sorted by length), left-padded behind
    a 4D mask at per-row positions; on a HookedTransformer (``"batch"``) prompts of one length (no padding).
    The same tokens as the full-sequence loop (``_greedy_full``), which runs instead for a model without a
    cache path (``"full"``) or with hooks of the caller's on it (a cached step shows them other positions).
    One row per call (the most padded of the first chunk that decodes two tokens or more) is checked
    against an unpadded full forward; a cache that does not reproduce it falls back to the loop, with a warning.

    Example:
        >>> _greedy(model, [(prompt, (neurons, SUPPRESS))], batch_size=8)   # doctest: +SKIP
        [(412, 9, 2)]
    """
    from ..engine import backend_of
    from ..model.hooks import hooked_points

    backend = backend_of(model)
    if backend == "full" or hooked_points(model):
        return _greedy_full(model, items, batch_size, progress, desc)
    chunks: Any = _greedy_chunks([len(p.tokens) for p, _ in items], batch_size, same_length=backend == "batch")
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=desc, unit="batch")
    out: list[tuple[int, ...]] = [()] * len(items)
    checked = False
    for chunk in chunks:
        part = [items[i] for i in chunk]
        long = [b for b, (p, _) in enumerate(part) if len(p.target) > 1]
        watch = min(long, key=lambda b: len(part[b][0].tokens)) if long and not checked else 0
        gen, steps = _greedy_cached(model, backend, part, watch)
        if long and not checked:
            checked = True
            gap = _greedy_gap(model, part[watch], gen[watch], steps)
            if gap is not None:
                warnings.warn(f"free-form greedy: the cached decoding differs from a full forward by {gap[0]:.3g} "
                              f"nats (tolerance {gap[1]:.3g}); the full-sequence loop runs instead "
                              f"(slower, same tokens). Report the versions: {versions_line()}", stacklevel=3)
                return _greedy_full(model, items, batch_size, progress, desc)
        for i, g in zip(chunk, gen):
            out[i] = tuple(g)
    return out


def _greedy_chunks(lengths: Sequence[int], batch_size: int, same_length: bool) -> list[list[int]]:
    """Item indices in chunks of at most ``batch_size``, sorted by prompt length (the least padding);
    ``same_length``: no chunk mixes lengths.

    Example:
        >>> _greedy_chunks([5, 3, 5, 3, 4], 2, same_length=True)
        [[1, 3], [4], [0, 2]]
        >>> _greedy_chunks([5, 3, 5, 3, 4], 2, same_length=False)
        [[1, 3], [4, 0], [2]]
    """
    from itertools import groupby

    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    runs = [list(g) for _, g in groupby(order, key=lambda i: lengths[i])] if same_length else [order]
    return [run[s : s + batch_size] for run in runs for s in range(0, len(run), batch_size)]


def _greedy_cached(model: HookedModel, backend: str, chunk: Sequence[tuple[Prompt, Intervention]], watch: int = 0
                   ) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens of a chunk, one cached step per token; and row ``watch``'s log-probabilities at each of its
    steps ([len(target), vocab], float32), for the self-check.

    Rows are left-padded (with their first token: pad slots are attended by no real token), so every row's
    last prompt token sits at the same slot and each step appends one slot for all. The cache holds the
    slots before it (that pass stops before the unembedding); every step, the first included, feeds one token
    per row, so the logits are always the model's own at one position."""
    from ..model.hooks import hooked
    from ..model.readout import StopForward, final_residual_hook
    from ..model.surgery import prefix_cache_kwarg

    device = model_device(model)
    lengths = [len(p.tokens) for p, _ in chunk]
    S = max(lengths)
    pads = torch.tensor([S - n for n in lengths], device=device)
    ids = torch.tensor([[p.tokens[0]] * (S - len(p.tokens)) + list(p.tokens) for p, _ in chunk], device=device)
    n_new = [len(p.target) for p, _ in chunk]
    gen: list[list[int]] = [[] for _ in chunk]
    seen: list[torch.Tensor] = []
    if backend == "packed":
        from transformers import DynamicCache

        # No config: every layer keeps all its keys (as the row engine's prefix cache); the window of
        # sliding-window layers is in their mask.
        hf_cache: Any = DynamicCache()
        window = _sliding_window(model)

        def run(x: torch.Tensor, at: int, logits: bool) -> torch.Tensor | None:
            slots = torch.arange(at, at + x.shape[1], device=device)
            pos = (slots[None, :] - pads[:, None]).clamp(min=0)
            mask = _left_padded_mask(pads, slots, window, model_dtype(model))
            with prefix_cache_kwarg(model) as keyword:
                return model(x, return_type="logits" if logits else None, attention_mask=mask, position_ids=pos,
                             **{keyword: hf_cache})
    else:
        if bool(pads.any()):
            raise QrncaError("a HookedTransformer chunk of the cached greedy decoding needs prompts of one length")
        tl_cache = _tl_cache_class().init_cache(model.cfg, device, batch_size=len(chunk))

        def run(x: torch.Tensor, at: int, logits: bool) -> torch.Tensor | None:
            return model(x, return_type="logits" if logits else None, past_kv_cache=tl_cache)

    def stop(act: torch.Tensor, hook: Any) -> torch.Tensor:
        raise StopForward  # the cache is filled; the last prompt token's logits come from the first step

    factors = row_factors(model, [iv for _, iv in chunk])
    with torch.no_grad(), scale_rows(model, factors, None):
        if S > 1:
            try:
                with hooked(model, fwd=[(final_residual_hook(model), stop)]):
                    run(ids[:, :-1], 0, False)
            except StopForward:
                pass
        x = ids[:, -1:]
        for step in range(max(n_new)):
            logits = run(x, S - 1 + step, True)
            assert logits is not None
            last = logits[:, -1]
            nxt = last.argmax(-1)
            seen.append(torch.log_softmax(last[watch].float(), dim=-1))
            for b, t in enumerate(nxt.tolist()):
                if step < n_new[b]:
                    gen[b].append(int(t))
            x = nxt[:, None]
    return gen, torch.stack(seen[: n_new[watch]])


def _sliding_window(model: HookedModel) -> int | None:
    """The window of the model's sliding-window layers, if it has such layers (read as the row engine reads it)."""
    from ..model.access import hf_model

    hf_cfg = hf_model(model).config
    types = getattr(hf_cfg, "layer_types", None) or []
    return getattr(hf_cfg, "sliding_window", None) if "sliding_attention" in types else None


def _left_padded_mask(pads: torch.Tensor, slots: torch.Tensor, window: int | None, dtype: torch.dtype) -> Any:
    """The additive mask [rows, 1, len(slots), slots[-1] + 1] of queries at ``slots``: each sees its row's real
    slots up to itself (within ``window`` on sliding-window layers: a dict by layer type then), and a pad
    slot sees itself (a row with nothing to attend would be NaN, and 0 x NaN poisons every row reading it).

    Example:
        >>> m = _left_padded_mask(torch.tensor([0, 2]), torch.arange(3), None, torch.float32)
        >>> (m[:, 0] == 0).int().tolist()
        [[[1, 0, 0], [1, 1, 0], [1, 1, 1]], [[1, 0, 0], [0, 1, 0], [0, 0, 1]]]
    """
    keys = torch.arange(int(slots[-1]) + 1, device=slots.device)
    causal = keys[None, :] <= slots[:, None]
    allowed = (causal[None] & (keys[None, None, :] >= pads[:, None, None])) | (keys[None, :] == slots[:, None])[None]

    def additive(ok: torch.Tensor) -> torch.Tensor:
        m = torch.zeros(ok.shape, dtype=dtype, device=ok.device)
        m.masked_fill_(~ok, float("-inf") if dtype == torch.float32 else torch.finfo(dtype).min)
        return m[:, None]

    if window is None:
        return additive(allowed)
    near = (slots[:, None] - keys[None, :]) < window
    return {"full_attention": additive(allowed), "sliding_attention": additive(allowed & near[None])}


def _tl_cache_class() -> Any:
    """TL's own key/value cache class (named ``TransformerLensKeyValueCache`` since TL 4, as the row engine
    imports it; ``HookedTransformerKeyValueCache`` in TL 3's ``past_key_value_caching``)."""
    try:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    except ImportError:  # pragma: no cover - TL 3.x
        from transformer_lens.past_key_value_caching import HookedTransformerKeyValueCache

        return HookedTransformerKeyValueCache
    return TransformerLensKeyValueCache


def _greedy_gap(model: HookedModel, item: tuple[Prompt, Intervention], gen: Sequence[int],
                steps: torch.Tensor) -> tuple[float, float] | None:
    """(gap, tolerance) if the cached steps of one row differ from a full forward of its prompt and tokens with
    the same intervention (a cache that stayed empty, or positions that shifted), else None."""
    from ..engine.checks import check_tolerance, gap_to_plain

    p, iv = item
    seq = list(p.tokens) + list(gen[:-1])
    P = len(p.tokens)
    with torch.no_grad(), scale_rows(model, row_factors(model, [iv]), None):
        logits = model(torch.tensor([seq], device=model_device(model)), return_type="logits")
    plain = torch.log_softmax(logits[0, P - 1 :].float(), dim=-1)
    diff, spread = gap_to_plain(steps, plain, gen).tolist()
    tol = check_tolerance(model_dtype(model), spread)
    return None if diff <= tol else (diff, tol)


def _greedy_full(model: HookedModel, items: Sequence[tuple[Prompt, Intervention]], batch_size: int,
                 progress: bool = False, desc: str = "free-form greedy") -> list[tuple[int, ...]]:
    """``_greedy`` by the full-sequence loop: the whole right-padded batch runs once per new token (the oracle,
    and the path of a model without a cache)."""
    device, pad = model_device(model), pad_token_id(model)
    out: list[tuple[int, ...]] = []
    starts: Any = range(0, len(items), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    for start in starts:
        chunk = items[start : start + batch_size]
        seqs = [list(p.tokens) for p, _ in chunk]
        n_new = [len(p.target) for p, _ in chunk]
        factors = row_factors(model, [iv for _, iv in chunk])
        with torch.no_grad():
            for step in range(max(n_new)):
                with scale_rows(model, factors, None):
                    logits = model(pad_batch(seqs, pad, device), return_type="logits")
                for b, s in enumerate(seqs):
                    if step < n_new[b]:
                        s.append(int(logits[b, len(s) - 1].argmax()))
        out.extend(tuple(s[len(p.tokens):]) for s, (p, _) in zip(seqs, chunk))
    return out


def _free_form(model: HookedModel, queries: Sequence[Query], prompts: dict[str, list[Prompt]],
               sets: dict[str, dict[str, NeuronSet]], located: Located, ctx: LocatorContext, cfg: EvalConfig,
               progress: bool = False, clock: _Clock | None = None) -> dict[str, Any]:
    """Every method's neurons ablated at every position: log-likelihood drop, exact match (own vs random too);
    ``clock`` times the greedy decoding into ``free_form_greedy``."""
    decode = _greedy if cfg.engine else _greedy_full  # engine=False: the full-sequence oracle throughout
    greedy = clock.timed("free_form_greedy", decode) if clock is not None else decode
    # The evaluated method (QRNCA for a run) and random are always compared (drop_ratio); taken from the
    # evaluated methods or located here, to the same budget.
    own = located.locator_name()
    sets = dict(sets)
    if own not in sets:
        assert ctx.counts is not None  # evaluate set the budget
        found = {own: {q.id: located.qr_neurons(q.id) for q in queries}}
        sets[own] = neuron_sets([own], ctx)[own] if isinstance(located, LocateResult) else cut_to(found, ctx.counts)[own]
    if "random" not in sets:
        sets["random"] = neuron_sets(["random"], ctx)["random"]
    flat = [(q.id, p) for q in queries for p in prompts[q.id]]
    res: dict[str, Any] = {"intervention": "suppress (x0) at every position", "n_prompts": len(flat)}
    base = score_items(model, [(p, None) for _, p in flat], batch_size=cfg.batch_size, progress=progress)
    base_gen = greedy(model, [(p, None) for _, p in flat], cfg.batch_size, progress, "free-form greedy (clean)")
    res["exact_match_before"] = float(np.mean([g == tuple(p.target) for g, (_, p) in zip(base_gen, flat)]))
    drops: dict[str, float | None] = {}
    names: Any = list(sets)
    if progress:
        from tqdm.auto import tqdm

        names = tqdm(names, desc="free-form", unit="method")
    for name in names:
        rows = [k for k, (qid, _) in enumerate(flat) if sets[name][qid]]  # an empty set is left out, not scored
        if not rows:
            drops[name] = None
            res[name] = {"loglik_drop": None, "exact_match_after": None, "n_empty": len(queries)}
            continue
        items = [(flat[k][1], (sets[name][flat[k][0]], SUPPRESS)) for k in rows]
        after = score_items(model, items, every_position=True, batch_size=cfg.batch_size, progress=progress)
        gen = greedy(model, items, cfg.batch_size, progress, f"free-form greedy ({name})")
        d = [base[k].target_logprob - a.target_logprob for k, a in zip(rows, after)]
        drops[name] = float(np.mean(d))
        res[name] = {"loglik_drop": drops[name],
                     "exact_match_after": float(np.mean([g == tuple(flat[k][1].target) for g, k in zip(gen, rows)]))}
        n_empty = sum(not sets[name][q.id] for q in queries)
        if n_empty:
            res[name]["n_empty"] = n_empty
    # A ratio over a random drop that is not positive (ablating random neurons left the answers as likely, or
    # made them likelier) has no meaning: its sign and size are float noise.
    mine, rnd = drops[own], drops["random"]
    res["drop_ratio"] = mine / rnd if mine is not None and rnd is not None and rnd > 0 else None
    res["drop_ratio_of"] = own
    return res


# ---------------------------------------------------------------- neuron-based prediction


def _neuron_prediction(model: HookedModel, queries: Sequence[Query], prompts: dict[str, list[Prompt]],
                       own_sets: dict[str, NeuronSet], cfg: EvalConfig, own: str = "qrnca",
                       progress: bool = False) -> dict[str, Any]:
    """Our reconstruction (see the module docstring): group neurons from even queries, predict odd ones."""
    per_group: dict[str, Any] = {}
    totals: dict[str, list[float]] = {"neuron": [], "model": [], "agree": []}
    groups: Any = list(groups_of(queries).items())
    if progress:
        from tqdm.auto import tqdm

        groups = tqdm(groups, desc="neuron prediction", unit="group")
    for g, members in groups:
        train, test = members[0::2], members[1::2]
        group = top_pooled([own_sets[q.id] for q in train], cfg.group_neurons)
        if not group or not test:
            continue
        by_layer = group.by_layer()
        names = {layer: mlp_hook_name(model, layer) for layer in by_layer}
        hits: dict[str, list[float]] = {"neuron": [], "model": [], "agree": []}
        # Each candidate answer is a row behind its prompt: the group neurons' activation at the candidate's
        # last token and the model's own log-probability of the candidate, from one engine call per group.
        firsts = [prompts[q.id][0] for q in test]
        cands = [[tuple(o) for o in p.options] if p.options else _cloze_candidates(p) for p in firsts]
        rows = [Row(b, (p.tokens[-1], *c)) for b, (p, cs) in enumerate(zip(firsts, cands)) for c in cs]
        hook_names = list(names.values())

        def read(row: Row, lp: torch.Tensor, acts: dict[str, torch.Tensor], names: dict[int, str] = names,
                 by_layer: dict[int, list[int]] = by_layer) -> tuple[float, float]:
            c = row.tokens[1:]
            act = sum(float(acts[names[layer]][-1, idx].float().sum()) for layer, idx in by_layer.items())
            logp = float(sum(lp[t, tok] for t, tok in enumerate(c)))
            return act, logp

        got = run_rows(model, [list(p.tokens) for p in firsts], rows, read, capture_names=hook_names,
                       backend=None if cfg.engine else "full")
        k = 0
        for p, cs in zip(firsts, cands):
            vals = got[k : k + len(cs)]
            k += len(cs)
            correct = p.correct if p.options else 0
            n_pred = int(np.argmax([v[0] for v in vals]))
            m_pred = int(np.argmax([v[1] for v in vals]))
            hits["neuron"].append(float(n_pred == correct))
            hits["model"].append(float(m_pred == correct))
            hits["agree"].append(float(n_pred == m_pred))
        if hits["neuron"]:
            per_group[g] = {key: float(np.mean(v)) for key, v in hits.items()} | {"n": len(hits["neuron"])}
            for key in totals:
                totals[key].extend(hits[key])
    return {
        "note": "reconstruction: group neurons pooled from even-indexed queries, tested on odd-indexed ones",
        "method": own,
        "neuron_accuracy": mean_or_none(totals["neuron"]), "model_accuracy": mean_or_none(totals["model"]),
        "agreement": mean_or_none(totals["agree"]), "n": len(totals["neuron"]), "per_group": per_group,
    }


def _cloze_candidates(p: Prompt) -> list[tuple[int, ...]]:
    """The answer's tokens first, then the distractors the prompt stored (drawn when the run was made)."""
    if p.distractors is None:
        raise QrncaError(
            f"query {p.query_id!r}: its group had too few other answers to draw distractors from when the run "
            "was made, so neuron-based prediction has no candidates; use EvalConfig(neuron_prediction=False), "
            "or locate with a larger pool (--pool PATH)"
        )
    return [tuple(p.target)] + [tuple(d) for d in p.distractors]
