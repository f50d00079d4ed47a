"""Prove the neurons: every locator's neurons judged by the same metrics, in one table (METHOD section 4).

For each method and query (neurons cut to QRNCA's count for that query):

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

**Groups.** ``EvalConfig.group_by`` (default: the run's recorded ``LocateResult.group_by``) picks the query field
that makes the groups: ``group``, ``language`` or ``relation`` (``grouping.regroup``). It decides the per-group
numbers, the group neurons of neuron-based prediction, and where unrelated controls come from: grouped by
language, a query's control is from *another language* (it may share the relation), so PCR asks whether the
neurons are specific to the language; grouped by relation, the control is another relation, possibly in the
same language. Prompts are the stored ones either way (examples and distractors from ``Query.group``).

Example:
    >>> res = evaluate(model, run, cfg=EvalConfig())   # the run's stored prompts  # doctest: +SKIP
    >>> print(res.table())                                        # doctest: +SKIP
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .comparison import EvaluationResult
from .config import Config
from .data import Query, groups_of
from .engine import Row, run_rows
from .errors import QrncaError
from .grouping import GroupBy, check_group_by, regroup
from .interventions import BOOST, SUPPRESS, Intervention, row_factors, scale_rows
from .locate import LocateResult
from .locators import LocatorContext, cut_to_qrnca, neuron_sets
from .metrics import bootstrap_ci, editing_rates, mean_or_none, pcr, relative_change_log
from .models import dtype_name, mlp_hook_name, model_device, model_dtype, pad_batch, pad_token_id, tokenizer_of
from .neurons import NeuronSet
from .protocols import HookedModel
from .proxies import Prompt, tokenizer_identity
from .scoring import ItemScore, score_items
from .store import check_run_dtype
from .versions import library_versions, model_identity

if TYPE_CHECKING:  # executors imports evaluation's neighbours; the class is only needed for the annotation
    from .executors import Executor

__all__ = ["EvalConfig", "EvaluationResult", "evaluate", "control_queries", "score_items", "ItemScore",
           "DEFAULT_METHODS"]

DEFAULT_METHODS = ("qrnca", "no-ica", "with-common", "kn", "activation", "random")


@dataclass(frozen=True)
class EvalConfig(Config):
    """What ``evaluate`` judges and how: the locators compared, seeds, bootstrap size, batching.

    Example:
        >>> cfg = EvalConfig(methods=("qrnca", "random"), n_boot=200)
        >>> cfg.to_dict()["methods"], cfg.every_position
        (['qrnca', 'random'], False)
    """

    methods: tuple[str, ...] = field(default=DEFAULT_METHODS,
                                     metadata={"help": "comma-separated locators (also: logprob)"})
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

    def validate(self) -> None:
        check_group_by(self.group_by)
        if not self.methods:
            raise QrncaError("no methods to evaluate")
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


def evaluate(
    model: HookedModel,
    run: LocateResult,
    queries: Sequence[Query | str] | None = None,
    pool: Sequence[Query] | None = None,
    cfg: EvalConfig = EvalConfig(),
    *,
    progress: bool = True,
    executor: Executor | None = None,
    allow_dtype_change: bool = False,
) -> EvaluationResult:
    """Judge every method's neurons on PCR, editing, neuron-based prediction and the free-form check.

    Every stage reads the prompts the run stored when it attributed each query (``run.stored_prompts``),
    never rebuilt ones, so the data file may change or vanish after ``locate`` without changing the
    verdict; ``pool`` is therefore ignored (examples and distractors are those the run drew).

    Args:
        model: the TL model the run was made with.
        run: the ``LocateResult`` (from ``locate`` or ``LocateResult.load``).
        queries: queries or ids of the run to judge (default: all; their stored form is used); PCR needs
            at least two groups.
        pool: ignored (kept so that older calls keep working).
        cfg: locators compared, seed, bootstrap size, batching, which checks run.
        progress: show progress bars.
        executor: where the batched scoring runs (default: this process).
        allow_dtype_change: judge a run with a model of another dtype than the run's (refused in one line
            without it; a run that predates recording its dtype is said to be unknown and not checked). The
            device may differ freely; both are recorded in ``meta`` (``dtype``, ``device``, ``run_dtype``,
            ``run_device``).

    Returns:
        An ``EvaluationResult``: PCR (boost/suppress, 95% CIs), editing rates, neuron-based prediction and
        the free-form check per method, overall and per group.

    Example:
        >>> res = evaluate(model, run, cfg=EvalConfig(methods=("qrnca", "random")))   # doctest: +SKIP
        >>> sorted(res.pcr), sorted(res.pcr["qrnca"])[:2]                             # doctest: +SKIP
        (['qrnca', 'random'], ['boost', 'boost_ci'])
    """
    from .executors import SerialExecutor

    dtype, device = dtype_name(model_dtype(model)), str(model_device(model))
    if run.out is not None or run.dtype is not None:  # an in-memory result built by hand records no dtype
        check_run_dtype(run.out if run.out is not None else run.model, run.dtype, dtype, allow_dtype_change)
    ex = executor if executor is not None else SerialExecutor(model)
    asked = list(run.groups) if queries is None else [q if isinstance(q, str) else q.id for q in queries]
    ids = [q for q in asked if q in run.selection.qr]
    if not ids:
        raise QrncaError("none of the queries belongs to this run")
    by = cfg.group_by or run.group_by
    # The one relabelling: from here on a query's group is its ``by`` field (its prompts are the stored ones).
    queries = regroup(run.stored_queries(ids), by)
    prompts = run.stored_prompts(ids)
    _check_tokenizer(run, ids, model)
    controls = control_queries(queries, cfg.seed)
    proxy = run.config.proxy
    ctx = LocatorContext(model, queries, prompts, run, cfg.seed)
    # Whole rankings once: ground truth compares each locator's top-k; every other judge gets QRNCA's count.
    uncut = neuron_sets(cfg.methods, ctx, cut=False)
    sets = cut_to_qrnca(uncut, run)
    by_id = {q.id: q for q in queries}

    def bar(it: Any, desc: str) -> Any:
        if not progress:
            return it
        from tqdm.auto import tqdm

        return tqdm(it, desc=desc, unit="step")

    # Every scored row of the evaluation in one call: the clean prompts, then each (method, boost/suppress)'s
    # related and unrelated rows. The engine then runs each prompt's prefix once for all of them.
    flat = [(q.id, i, p) for q in queries for i, p in enumerate(prompts[q.id])]
    items: list[tuple[Prompt, Any]] = [(p, None) for _, _, p in flat]
    blocks = []
    steps = [(m, f) for m in cfg.methods for f in ("boost", "suppress")]
    for m, kind in steps:
        factor = BOOST if kind == "boost" else SUPPRESS
        keys, owners, related = [], [], []
        start = len(items)
        for q in queries:
            iv = (sets[m][q.id], factor)  # one object per (method, kind, query): scoring runs it once per row
            for target_q, is_rel in ((q.id, True), (controls[q.id], False)):
                for i, p in enumerate(prompts[target_q]):
                    items.append((p, iv))
                    keys.append((target_q, i))
                    owners.append(q.id)
                    related.append(is_rel)
        blocks.append((m, kind, start, keys, owners, related))
    if progress:
        print(f"evaluate: {len(items)} scored rows ({len(cfg.methods)} methods x boost/suppress x related/unrelated "
              f"+ {len(flat)} clean prompts)")
    scored = ex.score_items(items, every_position=cfg.every_position, batch_size=cfg.batch_size, engine=cfg.engine)
    clean = scored[: len(flat)]
    before = {(qid, i): s.target_logprob for (qid, i, _), s in zip(flat, clean)}
    correct_before = {(qid, i): s.correct for (qid, i, _), s in zip(flat, clean)}

    pcr_out: dict[str, dict[str, Any]] = {}
    edit_out: dict[str, dict[str, Any]] = {}
    group_out: dict[str, dict[str, Any]] = {g: {"pcr": {}, "editing": {}} for g in groups_of(queries)}
    for m, kind, start, keys, owners, related in bar(blocks, "evaluate"):
        scores = scored[start : start + len(keys)]
        after = [s.target_logprob for s in scores]
        rel_idx = [i for i, r in enumerate(related) if r]
        unr_idx = [i for i, r in enumerate(related) if not r]
        rel = _query_changes(before, [after[i] for i in rel_idx], [keys[i] for i in rel_idx], [owners[i] for i in rel_idx])
        unr = _query_changes(before, [after[i] for i in unr_idx], [keys[i] for i in unr_idx], [owners[i] for i in unr_idx])
        ids = [q.id for q in queries]
        r_vals, u_vals = [rel[i] for i in ids], [unr[i] for i in ids]
        entry = pcr_out.setdefault(m, {"mean_neurons": float(np.mean([len(sets[m][i]) for i in ids]))})
        entry[kind] = pcr(r_vals, u_vals)
        ci = bootstrap_ci(r_vals, u_vals, n_boot=cfg.n_boot, seed=cfg.seed)
        entry[f"{kind}_ci"], entry[f"{kind}_ci_dropped"] = list(ci), ci.dropped
        entry[f"{kind}_related_mean"] = float(np.mean(r_vals))
        entry[f"{kind}_unrelated_mean"] = float(np.mean(u_vals))
        entry[f"{kind}_related_abs"] = float(np.mean(np.abs(r_vals)))
        entry[f"{kind}_unrelated_abs"] = float(np.mean(np.abs(u_vals)))
        # Editing: the related rows only.
        flips = {(keys[i]): scores[i].correct for i in rel_idx}
        edit_out.setdefault(m, {})[kind] = flips
        for g, members in groups_of(queries).items():
            gid = [q.id for q in members]
            gr, gu = [rel[i] for i in gid], [unr[i] for i in gid]
            group_out[g]["pcr"].setdefault(m, {})[kind] = pcr(gr, gu) if gu else None
            group_out[g]["pcr"][m][f"{kind}_related_mean"] = float(np.mean(gr))
    editing: dict[str, dict[str, Any]] = {}
    for m, d in edit_out.items():
        ks = sorted(d["boost"])
        editing[m] = editing_rates([correct_before[k] for k in ks], [d["boost"][k] for k in ks],
                                   [d["suppress"][k] for k in ks])
        for g in groups_of(queries):
            gk = [k for k in ks if by_id[k[0]].group == g]
            group_out[g]["editing"][m] = editing_rates([correct_before[k] for k in gk],
                                                       [d["boost"][k] for k in gk], [d["suppress"][k] for k in gk])
    result = EvaluationResult(
        pcr=pcr_out, editing=editing, per_group=group_out,
        meta={"config": cfg.to_dict(), "n_queries": len(queries), "n_prompts": len(flat),
              "model_accuracy": float(np.mean(list(correct_before.values()))),
              "mean_target_prob": float(np.mean([np.exp(v) for v in before.values()])),
              "proxy": proxy.kind, "controls": controls, "group_by": by,
              "versions": library_versions(), "model_identity": model_identity(model),
              "dtype": dtype, "device": device, "run_dtype": run.dtype, "run_device": run.device},
    )
    result.costs = {m: dict(ctx.costs.get(m, {})) for m in cfg.methods}
    if cfg.free_form and proxy.kind in ("cloze", "mcqa-text"):
        result.free_form = _free_form(model, queries, prompts, sets, run, cfg)
    if cfg.neuron_prediction:
        result.neuron_prediction = _neuron_prediction(model, queries, prompts, run, cfg)
    if cfg.symbol_binding and proxy.kind == "mcqa-letter":
        from .symbol_binding import symbol_binding

        result.symbol_binding = symbol_binding(model, prompts, sets, seed=cfg.seed, proxy=proxy,
                                               batch_size=cfg.batch_size, engine=cfg.engine, executor=ex).to_dict()
    if cfg.ground_truth:
        from .data import limit_per_group
        from .ground_truth import ground_truth

        chosen = limit_per_group(queries, cfg.ground_truth_queries)
        if progress:
            print(f"ground truth: {len(chosen)} queries, each locator's top-{cfg.ground_truth_k} + as many random "
                  "neurons, zero-ablated and doubled one at a time")
        gt = ground_truth(model, chosen, {q.id: prompts[q.id] for q in chosen},
                          {m: {q.id: uncut[m][q.id] for q in chosen} for m in cfg.methods},
                          k=cfg.ground_truth_k, seed=cfg.seed, layers=run.layers, progress=progress)
        result.ground_truth = gt.to_dict()
    return result


def _check_tokenizer(run: LocateResult, ids: Sequence[str], model: HookedModel) -> None:
    """Stored token ids mean something only under the tokenizer that made them."""
    stored = {(run.info[q].get("tokenizer") or {}).get("vocab_sha256") for q in ids} - {None}
    if not stored:
        return
    mine = tokenizer_identity(tokenizer_of(model))
    if stored != {mine["vocab_sha256"]}:
        raise QrncaError(
            f"the run's prompts were tokenized by another tokenizer than this model's ({mine['name_or_path']!r}, "
            f"{mine['vocab_size']} tokens); evaluate with the model the run was made with ({run.model!r})"
        )


# ---------------------------------------------------------------- free-form check


def _greedy(model: HookedModel, items: Sequence[tuple[Prompt, Intervention]], batch_size: int) -> list[tuple[int, ...]]:
    """Greedy continuation of each prompt, as many tokens as its target, intervening at every position."""
    device, pad = model_device(model), pad_token_id(model)
    out: list[tuple[int, ...]] = []
    for start in range(0, len(items), batch_size):
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
               sets: dict[str, dict[str, NeuronSet]], run: LocateResult, cfg: EvalConfig) -> dict[str, Any]:
    """Every method's neurons ablated at every position: log-likelihood drop, exact match (QRNCA vs random too)."""
    # QRNCA and random are always compared (drop_ratio); taken from the evaluated methods or located here.
    need = [m for m in ("qrnca", "random") if m not in sets]
    if need:
        sets = {**sets, **neuron_sets(need, LocatorContext(model, queries, prompts, run, cfg.seed))}
    flat = [(q.id, p) for q in queries for p in prompts[q.id]]
    res: dict[str, Any] = {"intervention": "suppress (x0) at every position", "n_prompts": len(flat)}
    base = score_items(model, [(p, None) for _, p in flat], batch_size=cfg.batch_size)
    base_gen = _greedy(model, [(p, None) for _, p in flat], cfg.batch_size)
    res["exact_match_before"] = float(np.mean([g == tuple(p.target) for g, (_, p) in zip(base_gen, flat)]))
    drops = {}
    for name in sets:
        items = [(p, (sets[name][qid], SUPPRESS)) for qid, p in flat]
        after = score_items(model, items, every_position=True, batch_size=cfg.batch_size)
        gen = _greedy(model, items, cfg.batch_size)
        d = [b.target_logprob - a.target_logprob for b, a in zip(base, after)]
        drops[name] = float(np.mean(d))
        res[name] = {"loglik_drop": drops[name],
                     "exact_match_after": float(np.mean([g == tuple(p.target) for g, (_, p) in zip(gen, flat)]))}
    # A ratio over a random drop that is not positive (ablating random neurons left the answers as likely, or
    # made them likelier) has no meaning: its sign and size are float noise.
    res["drop_ratio"] = drops["qrnca"] / drops["random"] if drops["random"] > 0 else None
    return res


# ---------------------------------------------------------------- neuron-based prediction


def _neuron_prediction(model: HookedModel, queries: Sequence[Query], prompts: dict[str, list[Prompt]],
                       run: LocateResult, cfg: EvalConfig) -> dict[str, Any]:
    """Our reconstruction (see the module docstring): group neurons from even queries, predict odd ones."""
    per_group: dict[str, Any] = {}
    totals: dict[str, list[float]] = {"neuron": [], "model": [], "agree": []}
    for g, members in groups_of(queries).items():
        train, test = members[0::2], members[1::2]
        group = _group_neurons([run.qr_neurons(q.id) for q in train], cfg.group_neurons)
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
            own = float(sum(lp[t, tok] for t, tok in enumerate(c)))
            return act, own

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
        "neuron_accuracy": mean_or_none(totals["neuron"]), "model_accuracy": mean_or_none(totals["model"]),
        "agreement": mean_or_none(totals["agree"]), "n": len(totals["neuron"]), "per_group": per_group,
    }


def _group_neurons(sets: Sequence[NeuronSet], k: int) -> NeuronSet:
    """The ``k`` neurons with the largest summed score over ``sets`` (ties: (layer, neuron) ascending)."""
    pooled: dict[tuple[int, int], float] = {}
    for ns in sets:
        for layer, n, x in ns:
            pooled[(layer, n)] = pooled.get((layer, n), 0.0) + x
    top = sorted(pooled, key=lambda key: (-pooled[key], key))[:k]
    return NeuronSet([(layer, n, pooled[(layer, n)]) for layer, n in top])


def _cloze_candidates(p: Prompt) -> list[tuple[int, ...]]:
    """The answer's tokens first, then the distractors the prompt stored (drawn when the run was made)."""
    if p.distractors is None:
        raise QrncaError(
            f"query {p.query_id!r}: its group had too few other answers to draw distractors from when the run "
            "was made, so neuron-based prediction has no candidates; use EvalConfig(neuron_prediction=False), "
            "or locate with a larger pool (--pool PATH)"
        )
    return [tuple(p.target)] + [tuple(d) for d in p.distractors]
