"""QRNCA end to end: prompts -> IG scores per query (stored) -> clusters -> selection -> QR neurons.

``locate(model, queries, cfg, out=DIR)`` attributes query by query and writes each query's scores atomically
into a run store, so an interrupted run resumes where it stopped and shards can share one directory. When
every query of the run is done, the collection-level reduce (clusters, ICA, common neurons, top v) runs
from the stored scores and writes ``DIR/neurons.json``. ``reduce(DIR, selection)`` reruns just that step in
seconds, with other t/u/v if asked (t re-thresholds the stored scores; nothing is re-attributed).

Other locators (atp, dla, the lens, ...) are reached through ``qrnca_lens.locate(..., method=NAME)``
(``locators.registry.locate``), which calls this ``locate`` for QRNCA.

Example:
    >>> from qrnca_lens import load_data, load_model
    >>> model = load_model("smollm2")                                        # doctest: +SKIP
    >>> pool = load_data("builtin:facts")
    >>> cfg = LocateConfig(proxy=ProxyConfig("cloze"))
    >>> res = locate(model, pool[:10], cfg, pool=pool, out="runs/facts")     # doctest: +SKIP
    >>> res.to_dataframe().head()                                            # doctest: +SKIP
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from jaxtyping import Float
from torch import Tensor

from ..config import Config
from ..data.grouping import check_group_by, regroup
from ..data.prompts import Prompt, ProxyConfig, build_all_prompts, tokenizer_identity
from ..data.queries import QueriesLike, Query, as_queries
from ..errors import QrncaError, StoreError
from ..located import Located
from ..model.access import d_mlp, default_prepend_bos, model_name, model_numerics, tokenizer_of
from ..model.loading import ModelRef, model_source
from ..neurons import NeuronSet
from ..protocols import HookedModel
from ..versions import library_versions, model_identity
from .executors import Executor, SerialExecutor
from .ig import IGConfig, resolve_layers
from .selection import Cluster, Selection, SelectionConfig, query_cluster, select, warn_if_degenerate
from .store import RunStore

__all__ = ["LocateConfig", "LocateResult", "locate", "reduce", "parse_shard", "prompts_from_info", "query_from_info"]


@dataclass(frozen=True)
class LocateConfig(Config):
    """Everything that defines a QRNCA run: proxy (|Q|, templates, shots, seed), IG (m), selection (t, u, v).

    ``to_dict`` / ``from_dict`` are the base's: nested configs as dicts, ``layers`` as a list (or None).

    Example:
        >>> cfg = LocateConfig(ProxyConfig("cloze"), IGConfig(steps=8), SelectionConfig(v=10), layers=(0, 1))
        >>> d = cfg.to_dict()
        >>> d["ig"]["steps"], d["layers"], LocateConfig.from_dict(d) == cfg
        (8, [0, 1], True)
    """

    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    ig: IGConfig = field(default_factory=IGConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    layers: tuple[int, ...] | None = None


@dataclass(eq=False)
class LocateResult(Located):
    """QR neurons of a collection, with what produced them. Saves/loads as a run directory.

    A ``Located``: ``qr_neurons(qid)`` is a ``NeuronSet`` of ``(layer, neuron, naica)``, best first;
    ``to_dataframe()`` gives one row per QR neuron; ``neurons_json()`` is the ``neurons.json`` schema.

    ``group_by``: the query field the run is mapped by (``grouping``), recorded at creation: evaluate and the
    report default to it. ``dtype`` and ``device``: the weights' dtype and device the run was made with
    (``"bfloat16"``, ``"cuda:0"``); None for a run made before they were recorded. evaluate refuses a model of
    another dtype unless asked. ``model``: the model's name, a ``ModelRef`` that also carries how to reload it
    (``model_source``: the embedded name or the checkpoint's absolute path) and the run's dtype, so
    ``load_model(run.model)`` gives the run's model back.

    Example:
        >>> run = LocateResult.load("runs/facts")                                  # doctest: +SKIP
        >>> top = run.qr_neurons("capital-01").pairs()[:2]   # (layer, neuron), best first  # doctest: +SKIP
        >>> run.reselect(SelectionConfig(v=5)).selection.mean_qr_count() <= 5      # doctest: +SKIP
        True
    """

    method: ClassVar[str] = "QRNCA"
    score_name: ClassVar[str] = "naica"

    config: LocateConfig
    model: str
    data: str | None
    layers: list[int]
    groups: dict[str, str]
    info: dict[str, dict[str, Any]]
    clusters: dict[str, Cluster]
    selection: Selection
    scores: dict[str, Tensor] = field(default_factory=dict, repr=False)
    out: Path | None = None
    group_by: str = "group"
    dtype: str | None = None
    device: str | None = None
    model_source: dict[str, str] | None = None

    def __post_init__(self) -> None:
        # Still the display name (compares, prints and serialises as the string), now also loadable again.
        self.model_source = self.model_source or model_source(self.model)
        self.model = ModelRef(self.model, source=self.model_source, dtype=self.dtype)

    def _layer(self, i: int) -> int:
        return self.layers[i]

    @property
    def query_ids(self) -> list[str]:
        return list(self.selection.qr)

    def group_of(self, query_id: str) -> str:
        return self.groups[query_id]

    def stored_prompts(self, query_ids: Iterable[str] | None = None) -> dict[str, list[Prompt]]:
        """The very prompts each query was attributed on, as the run stored them (all queries by default)."""
        where = str(self.out) if self.out is not None else "this run"
        return {q: prompts_from_info(self.info.get(q, {}), q, where)
                for q in (self.groups if query_ids is None else query_ids)}

    def stored_queries(self, query_ids: Iterable[str] | None = None) -> list[Query]:
        """The queries as they were when attributed (the data file may have changed since)."""
        where = str(self.out) if self.out is not None else "this run"
        return [query_from_info(self.info.get(q, {}), q, where)
                for q in (self.groups if query_ids is None else query_ids)]

    def locator_name(self) -> str:
        return "qrnca"

    def stored_tokenizers(self, query_ids: Iterable[str]) -> set[str]:
        return {sha for q in query_ids if (sha := (self.info.get(q, {}).get("tokenizer") or {}).get("vocab_sha256"))}

    def proxy_config(self) -> ProxyConfig:
        return self.config.proxy

    @property
    def run_dir(self) -> Path | None:
        return self.out

    def qr_neurons(self, query_id: str) -> NeuronSet:
        """A query's QR neurons, best first, with the model's layer numbers and their naica as scores.

        Example:
            >>> run.qr_neurons("capital-01")[:2]   # doctest: +SKIP
            NeuronSet([(29, 1197, 0.84), (24, 1005, 0.61)])
        """
        idx, val = self.selection.qr[query_id]
        # The selection indexes the attributed layers; the set names the model's own layer numbers.
        return NeuronSet([(self._layer(a), b, float(x)) for (a, b), x in zip(idx.tolist(), val.tolist())])

    @property
    def common_neurons(self) -> list[tuple[int, int]]:
        return [(self._layer(a), b) for a, b in self.selection.common.tolist()]

    def neurons_json(self) -> dict[str, Any]:
        targets = [p for i in self.info.values() for p in i.get("target_probs", [])]
        correct = [c for i in self.info.values() for c in i.get("correct", [])]
        return {
            "config": self.config.to_dict(),
            "versions": library_versions(),
            "model": self.model,
            "data": self.data,
            "layers": self.layers, "group_by": self.group_by,
            "dtype": self.dtype, "device": self.device,
            "common_neurons": [list(x) for x in self.common_neurons],
            "queries": {
                q: {"group": self.groups[q], **_fields(self.info[q]),  # the report regroups by these
                    "qr_neurons": self.qr_neurons(q).to_list(),
                    "target_prob": _mean(self.info[q].get("target_probs", [])),
                    "accuracy": _mean([float(c) for c in self.info[q].get("correct", [])])}
                for q in self.selection.qr
            },
            "summary": {
                "n_queries": len(self.selection.qr),
                "mean_qr_neurons": self.selection.mean_qr_count(),
                "n_common_neurons": len(self.common_neurons),
                "mean_target_prob": _mean(targets),
                "accuracy": _mean([float(c) for c in correct]),
            },
        }

    def reselect(self, selection: SelectionConfig) -> "LocateResult":
        """The same run with other t/u/v (needs the scores: in memory, or in ``out``)."""
        scores = {q: scores_of(self, q) for q in self.groups}
        clusters = {q: query_cluster(scores[q], selection.t, selection.cluster_mode) for q in self.groups}
        warn_if_degenerate(len(clusters), selection)
        return replace(self, config=replace(self.config, selection=selection), clusters=clusters,
                       selection=select(clusters, selection), scores=scores)

    def save(self, out: str | Path) -> Path:
        """Write the run directory (manifest, per-query scores, neurons.json)."""
        if not self.scores:
            raise QrncaError("this result holds no scores to save; it already lives in its run directory")
        store = RunStore.open(out, _manifest(self.model, self.data, self.config, self.layers, self.groups,
                                             self.info_shape(), None, group_by=self.group_by,
                                             numerics={"dtype": self.dtype, "device": self.device}))
        for q, s in self.scores.items():
            store.write_query(q, s, self.info[q])
        store.write_neurons(self.neurons_json())
        return Path(out)

    def info_shape(self) -> list[int]:
        any_scores = next(iter(self.scores.values()))
        return [len(self.layers), int(any_scores.shape[-1])]

    @classmethod
    def load(cls, out: str | Path, selection: SelectionConfig | None = None) -> "LocateResult":
        return reduce(out, selection, write=False)

    def __repr__(self) -> str:
        s = self.neurons_json()["summary"]
        return (f"LocateResult({self.model}, {s['n_queries']} queries, {s['mean_qr_neurons']:.1f} QR neurons/query, "
                f"{s['n_common_neurons']} common neurons)")

    def _repr_html_(self) -> str:
        s = self.neurons_json()["summary"]
        rows = "".join(f"<tr><td>{g}</td><td>{len(v)}</td><td>{sum(v) / len(v):.1f}</td></tr>"
                       for g, v in self._group_counts().items())
        return (f"<b>QRNCA</b> on {self.model}: {s['n_queries']} queries, {s['mean_qr_neurons']:.1f} QR neurons per "
                f"query, {s['n_common_neurons']} common neurons; model accuracy on the prompts {s['accuracy']:.2f}, "
                f"mean target p {s['mean_target_prob']:.3f}<table><tr><th>group</th><th>queries</th>"
                f"<th>QR neurons</th></tr>{rows}</table>")


def _mean(xs: Sequence[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def _fields(info: dict[str, Any]) -> dict[str, Any]:  # the stored query's language and relation, if it has them
    return {k: v for k, v in (info.get("query") or {}).items() if k in ("language", "relation") and v}


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"I/N"`` (0-based I) -> (I, N): this process does every N-th query starting at I.

    Args:
        spec: ``"I/N"`` with 0 <= I < N, or None for the whole run.

    Returns:
        ``(I, N)``; ``(0, 1)`` for None.

    Example:
        >>> parse_shard("1/4")
        (1, 4)
    """
    if spec is None:
        return 0, 1
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise QrncaError(f"a shard must look like I/N (e.g. 0/4), got {spec!r}") from None
    if n < 1 or not 0 <= i < n:
        raise QrncaError(f"shard {spec}: need 0 <= I < N")
    return i, n


def _manifest(model: str, data: str | None, cfg: LocateConfig, layers: list[int], groups: dict[str, str],
              shape: list[int], identity: dict[str, Any] | None, pool: str | None = None,
              group_by: str = "group", numerics: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    d = cfg.to_dict()
    # versions and model_identity say what the run was made with; each query file also records its own.
    # pool: where in-context examples and distractors came from (each query file stores the prompts made).
    # dtype and device: the weights' (a rerun in another dtype is refused unless asked; the device is free).
    # model_source: how load_model(run.model) finds the model again (not identity: a checkpoint may move).
    return {"model": str(model), "model_source": model_source(model, identity), "data": data, "proxy": d["proxy"],
            "ig": d["ig"], "layers": layers, "model_shape": shape, "selection": d["selection"], "queries": groups,
            "versions": library_versions(), "model_identity": identity, "pool": pool, "group_by": group_by,
            **(numerics or {"dtype": None, "device": None})}


# ---------------------------------------------------------------- the prompts a run stores
# Each query's file records its prompts (ids, targets, options, template, examples), the query as it was,
# the proxy config and the tokenizer that made them, in the same atomic write as its scores: a finished
# query always has exactly the prompts its scores were computed on, and later stages (evaluate, report,
# the lens inside evaluate) read them instead of rebuilding from a data file that may have changed.

_NO_PROMPTS = ("{where}: query {qid!r} has no stored prompts: the run was made before qrnca-lens stored the "
               "prompts it attributed, and rebuilding them could silently differ (other pool, edited data); "
               "rerun locate into a new directory (`qrnca-lens locate ... --out NEW_DIR`)")


def _prompt_record(query: Query, prompts: Sequence[Prompt], proxy: ProxyConfig, tokenizer: dict[str, Any]) -> dict[str, Any]:
    q = json.loads(json.dumps(asdict(query), default=str))  # a loader's odd meta value must not break the write
    return {"query": q, "prompts": [p.to_dict() for p in prompts], "proxy": proxy.to_dict(), "tokenizer": tokenizer}


def prompts_from_info(info: dict[str, Any], query_id: str, where: str = "this run") -> list[Prompt]:
    """A query's stored prompts from its file's metadata; a clear error for runs that predate storing them."""
    if not info.get("prompts"):
        raise StoreError(_NO_PROMPTS.format(where=where, qid=query_id))
    return [Prompt.from_dict(p) for p in info["prompts"]]


def query_from_info(info: dict[str, Any], query_id: str, where: str = "this run") -> Query:
    if not info.get("query"):
        raise StoreError(_NO_PROMPTS.format(where=where, qid=query_id))
    return Query.from_dict(info["query"])


def _check_queries(queries: Sequence[Query]) -> None:
    if not queries:
        raise QrncaError("no queries to locate (the data set is empty)")
    ids = [q.id for q in queries]
    if len(set(ids)) != len(ids):
        raise QrncaError("query ids repeat; every query needs its own id")


def locate(
    model: HookedModel,
    queries: QueriesLike,
    cfg: LocateConfig = LocateConfig(),
    *,
    pool: Sequence[Query] | None = None,
    out: str | Path | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    name: str | None = None,
    data: str | None = None,
    executor: Executor | None = None,
    pool_spec: str | None = None,
    group_by: str | None = None,
    allow_dtype_change: bool = False,
    prompts: Mapping[str, Sequence[Prompt]] | None = None,
) -> LocateResult | None:
    """QRNCA: attribute every query (resuming from ``out`` if given) and select the QR neurons of the collection.

    Each query's prompts are stored with its scores (``LocateResult.stored_prompts``). With shards, the last one
    to finish writes ``neurons.json`` (``reduce(out)`` can also be run by hand).

    Args:
        model: the TL model.
        queries: the queries to locate (distinct ids); together they are the collection N.
        cfg: proxy, IG and selection settings, and the layers (default: all).
        pool: in-context examples and distractors (default: ``queries``).
        out: run directory: scores are stored per query and an interrupted run resumes (None: in memory).
        shard: ``(i, n)``: this process attributes the i-th of n disjoint shares of the queries.
        progress: show a progress bar.
        name: the model's name in the manifest (default: from the model).
        data: the data spec recorded in the manifest (e.g. ``"builtin:facts"``).
        executor: where attribution runs (default: this process, on ``model``; or a ``RayExecutor``).
        pool_spec: the pool's data spec, recorded in the manifest.
        group_by: ``"group"`` (default), ``"language"`` or ``"relation"``: recorded as the run's mapping.
        allow_dtype_change: extend a run made in another dtype (e.g. a float32 run with a bfloat16 model);
            without it that is refused in one line. The change is recorded in the manifest's ``dtype_changes``
            and every query file records its own dtype and device.
        prompts: query id -> its prompts, used as they are instead of building them (every query needs its own).

    Returns:
        The ``LocateResult`` (QR neurons of every query), or None when ``out`` is given and other shards still
        have queries to do.

    Example:
        >>> cfg = LocateConfig(ProxyConfig("cloze"), IGConfig(steps=8))
        >>> run = locate(model, pool[:10], cfg, pool=pool, out="runs/facts")   # doctest: +SKIP
        >>> len(run.qr_neurons(pool[0].id)) <= cfg.selection.v               # doctest: +SKIP
        True
    """
    queries = as_queries(queries)
    cfg, built, records, store, name, by, held = _prepare_run(
        model, queries, cfg, pool=pool, out=out, name=name, data=data, pool_spec=pool_spec, group_by=group_by,
        allow_dtype_change=allow_dtype_change, prompts=prompts)
    # One process per shard: a second one on the same shard is refused; other shards run alongside.
    with store.shard_lock(*shard) if store else nullcontext():
        return _attribute_and_reduce(model, queries, built, records, cfg, store, shard=shard, progress=progress,
                                     executor=executor, name=name, data=data, group_by=by, held=held)


def _prepare_run(model: HookedModel, queries: list[Query], cfg: LocateConfig, *, pool: Sequence[Query] | None,
                 out: str | Path | None, name: str | None, data: str | None, pool_spec: str | None,
                 group_by: str | None, allow_dtype_change: bool, prompts: Mapping[str, Sequence[Prompt]] | None,
                 ) -> tuple[LocateConfig, dict[str, list[Prompt]], dict[str, dict[str, Any]], RunStore | None, str,
                            str, dict[str, str]]:
    """QRNCA's run before any attribution: checks, resolved layers and proxy, prompts, records, the open store.

    Returns:
        ``(cfg, prompts, records, store, name, group_by, numerics)``: the config as recorded (layers and BOS
        resolved), each query's prompts and stored record, the run store (None without ``out``), the model's
        name, the grouping and the model's dtype and device.
    """
    _check_queries(queries)
    check_group_by(group_by)
    regroup(queries, by := group_by or "group")  # a query without the field fails now, not after the attribution
    name = name or model_name(model)
    layers = resolve_layers(model, cfg.layers)  # recorded non-negative: the manifest says 29, not -1
    bos = cfg.proxy.prepend_bos if cfg.proxy.prepend_bos is not None else default_prepend_bos(model)
    proxy = replace(cfg.proxy, prepend_bos=bos)  # recorded resolved, so a rerun on another model cannot drift
    cfg = replace(cfg, proxy=proxy, layers=tuple(layers))
    if prompts is None:
        built = build_all_prompts(queries, proxy, tokenizer_of(model), pool=pool)
    else:
        missing = [q.id for q in queries if not prompts.get(q.id)]
        if missing:
            raise QrncaError(f"no prompts given for queries {missing[:3]}; pass every query's prompts, or none")
        built = {q.id: list(prompts[q.id]) for q in queries}
    tok_id = tokenizer_identity(tokenizer_of(model))
    by_id = {q.id: q for q in queries}
    groups = {q.id: q.group for q in queries}
    identity = model_identity(model)
    held = model_numerics(model)
    store = RunStore.open(out, _manifest(name, data, cfg, layers, groups, [len(layers), d_mlp(model)], identity,
                                         pool_spec, by, numerics=held),
                          allow_dtype_change=allow_dtype_change) if out else None
    # What each query file stores next to its scores: the very prompts attributed, the query, the proxy.
    records = {q.id: _prompt_record(by_id[q.id], built[q.id], proxy, tok_id) for q in queries}
    return cfg, built, records, store, name, by, held


def _attribute_and_reduce(model: HookedModel, queries: Sequence[Query], prompts: dict[str, Any],
                          records: dict[str, dict[str, Any]], cfg: LocateConfig, store: RunStore | None, *,
                          shard: tuple[int, int], progress: bool, executor: Executor | None, name: str,
                          data: str | None, group_by: str, held: dict[str, str]) -> LocateResult | None:
    """locate once the run is open and this shard held: attribute what is missing, then reduce."""
    out = store.root if store else None
    layers = list(cfg.layers or ())
    groups = {q.id: q.group for q in queries}
    done, corrupt = store.scan() if store else (set(), [])
    for e in corrupt:  # a damaged file (truncated, overwritten) is a query still to do
        warnings.warn(f"{e.path} is corrupt ({e.reason}): recomputing that query", stacklevel=3)
    unknown = done - set(groups)
    if unknown:
        raise StoreError(f"{out} holds queries that are not part of this run: {sorted(unknown)[:5]}")
    i, n = shard
    mine = [q for k, q in enumerate(queries) if k % n == i and q.id not in done]
    scores: dict[str, Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    ex = executor if executor is not None else SerialExecutor(model)
    results: Any = ex.attribute([(q.id, prompts[q.id]) for q in mine], cfg.ig, layers)
    if progress:
        from tqdm.auto import tqdm

        results = tqdm(results, total=len(mine), desc=f"locate{f' shard {i}/{n}' if n > 1 else ''}", unit="query")
    for qid, s, qi in results:
        qi = {**qi, "versions": library_versions(), **held, **records[qid]}
        if store:
            store.write_query(qid, s, qi)  # as each query arrives: nothing finished is lost
        else:
            scores[qid], info[qid] = s, qi
    if store:
        # The manifest's set, not ours: another process may have extended the run meanwhile.
        left = len(set(RunStore.load(store.root).manifest["queries"]) - store.done())
        if left:
            print(f"[qrnca-lens] {left} queries of this run are still to do (other shards); "
                  f"neurons.json is written when the last one finishes, or run `qrnca-lens reduce {out}`")
            return None
        return reduce(store.root, cfg.selection)
    clusters = {q.id: query_cluster(scores[q.id], cfg.selection.t, cfg.selection.cluster_mode) for q in queries}
    warn_if_degenerate(len(clusters), cfg.selection)
    return LocateResult(cfg, name, data, layers, groups, info, clusters, select(clusters, cfg.selection), scores,
                        group_by=group_by, dtype=held["dtype"], device=held["device"],
                        model_source=model_source(name, model_identity(model)))


def reduce(out: str | Path, selection: SelectionConfig | None = None, *, write: bool = True) -> LocateResult:
    """The collection-level step from a run directory alone: clusters, ICA, commons, top v -> ``neurons.json``.

    ``selection=None`` is the run's recorded selection: the one of the latest reduce that wrote. With
    ``write=True`` the selection used is recorded in the manifest, then ``neurons.json`` is written, so
    ``evaluate``, the report and a later ``reduce(out)`` all see this one selection.

    Args:
        out: the run directory (every query attributed).
        selection: t, u, v and switches to reselect with (t re-thresholds the stored scores); None: the
            run's recorded selection.
        write: record the selection and write ``neurons.json``; False only returns the result.

    Returns:
        The ``LocateResult`` under that selection.

    Example:
        >>> run = reduce("runs/facts", SelectionConfig(v=10), write=False)   # doctest: +SKIP
        >>> run.selection.config.v                                            # doctest: +SKIP
        10
    """
    store = RunStore.load(out)
    man = store.manifest
    # The manifest holds the config's fields among others (model, queries, versions, ...); its "layers" are
    # the resolved ones, which the config takes.
    cfg = LocateConfig.from_dict({"proxy": man["proxy"], "ig": man["ig"], "layers": man.get("layers"),
                                  "selection": selection.to_dict() if selection else man["selection"]})
    groups: dict[str, str] = man["queries"]
    done, corrupt = store.scan()
    if corrupt:
        raise StoreError(f"{corrupt[0]}" + (f" ({len(corrupt) - 1} more query files are corrupt too)"
                                            if len(corrupt) > 1 else ""))
    missing = set(groups) - done
    if missing:
        raise StoreError(f"{out}: {len(missing)} of {len(groups)} queries are not attributed yet "
                         f"(e.g. {sorted(missing)[:3]}); finish the run (rerun locate) before reducing")
    scores, info, clusters = {}, {}, {}
    for q in groups:
        s, qi = store.read_query(q)
        scores[q], info[q] = s, qi
        clusters[q] = query_cluster(s, cfg.selection.t, cfg.selection.cluster_mode)
    warn_if_degenerate(len(clusters), cfg.selection)
    res = LocateResult(cfg, man["model"], man.get("data"), list(man["layers"]), dict(groups), info, clusters,
                       select(clusters, cfg.selection), scores={}, out=Path(out), group_by=man.get("group_by", "group"),
                       dtype=store.dtype, device=store.device, model_source=store.model_source)
    if write:
        # Record first: if killed in between, a plain `reduce(out)` rewrites neurons.json to match the record.
        store.record_selection(cfg.selection.to_dict())
        store.write_neurons(res.neurons_json())
        _warn_if_stale_evaluation(store.root, cfg.selection)
    return res


def _warn_if_stale_evaluation(root: Path, selection: SelectionConfig) -> None:
    """evaluation.json judges the neurons of one selection; after a reduce with another, it judges other neurons."""
    path = root / "evaluation.json"
    if not path.exists():
        return
    try:
        used = json.loads(path.read_text()).get("meta", {}).get("selection")
    except (OSError, ValueError, AttributeError):
        used = None
    if used != selection.to_dict():
        warnings.warn(f"{path} evaluated the neurons of another selection ({used or 'not recorded'}), not of this "
                      f"reduce ({selection.to_dict()}); rerun `qrnca-lens evaluate {root}` before reading it or the "
                      "report", stacklevel=3)


def scores_of(result: LocateResult, query_id: str) -> Float[Tensor, "prompt layer d_mlp"]:
    """A query's IG scores, from memory or the run directory."""
    if query_id in result.scores:
        return result.scores[query_id]
    if result.out is None:
        raise QrncaError(f"no scores for {query_id!r}")
    return RunStore.load(result.out).read_query(query_id)[0]
