"""``Located``: what a locator found, per query: the one result type of every locator ``locate`` dispatches to.

A ``Located`` answers ``qr_neurons(query_id)`` with a ``NeuronSet`` (best first), knows each query's group,
and writes the ``neurons.json`` document that ``analysis``, ``evaluate`` and the report read. It also answers
what ``evaluate`` needs to judge it: the prompts it located on (``stored_prompts``, reused as they are, never
rebuilt), the queries as they were (``stored_queries``), the proxy, the layers, the model's dtype and device,
its registered method name (``locator_name``) and its directory if it has one (``run_dir``).

Three kinds: ``LocateResult`` (QRNCA: scores, clusters, common neurons; saves a resumable run), ``LensResult``
(the log-probability lens: certified top-k, target log-probabilities) and ``RankedResult`` (any other
registered method through ``locate(..., method=NAME)``: atp, dla, activation, logprob, random, kn, no-ica,
with-common; saves to and loads from a directory).

Example:
    >>> res = lens_locate(model, queries, ProxyConfig("cloze"), progress=False)   # doctest: +SKIP
    >>> res.qr_neurons(queries[0].id)[:2], res.to_dataframe().columns.tolist()      # doctest: +SKIP
    (NeuronSet([(27, 1410, 0.93), (3, 88, 0.51)]), ['query_id', 'group', 'rank', 'layer', 'neuron', 'score'])
"""

from __future__ import annotations

import abc
import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .atomic import write_json_atomic
from .errors import QrncaError, StoreError
from .neurons import NeuronSet

if TYPE_CHECKING:  # proxies and data load torch and tokenizers; the annotations alone need them
    from .data.prompts import Prompt, ProxyConfig
    from .data.queries import Query

__all__ = ["Located", "RankedResult", "RANKED_FORMAT"]

RANKED_FORMAT = 1  # the version of neurons.json's "ranked" section (what RankedResult.load reads back)


class Located(abc.ABC):
    """Per-query neurons with what produced them (see the module docstring).

    Example:
        >>> res = locate(model, queries, LocateConfig(), progress=False)   # doctest: +SKIP
        >>> isinstance(res, Located), res.neuron_sets().keys() == set(res.query_ids)  # doctest: +SKIP
        (True, True)
    """

    method: ClassVar[str] = "?"
    score_name: ClassVar[str] = "score"  # the DataFrame's name for a neuron's score
    # What evaluate reads besides the neurons; the kinds that record them override these.
    model: str
    layers: list[int]
    group_by: str = "group"
    dtype: str | None = None
    device: str | None = None

    @property
    @abc.abstractmethod
    def query_ids(self) -> list[str]:
        """The located queries, in run order."""

    @abc.abstractmethod
    def group_of(self, query_id: str) -> str:
        """The query's group."""

    @abc.abstractmethod
    def qr_neurons(self, query_id: str) -> NeuronSet:
        """The query's neurons, best first, with their scores."""

    @abc.abstractmethod
    def neurons_json(self) -> dict[str, Any]:
        """The ``neurons.json`` document (``config``, ``model``, ``layers``, ``common_neurons``, ``queries``, ...)."""

    @abc.abstractmethod
    def locator_name(self) -> str:
        """The registered method that found these neurons (``"qrnca"``, ``"logprob"``, ``"atp"``...)."""

    def stored_prompts(self, query_ids: Iterable[str] | None = None) -> dict[str, list[Prompt]]:
        """The very prompts each query was located on (all queries by default)."""
        raise QrncaError(f"this {type(self).__name__} stores no prompts, so it cannot be evaluated on the prompts it "
                         "was located on; locate again with qrnca-lens's locate(..., method=NAME)")

    def stored_queries(self, query_ids: Iterable[str] | None = None) -> list[Query]:
        """The queries as they were when located."""
        raise QrncaError(f"this {type(self).__name__} stores no queries; locate again with locate(..., method=NAME)")

    def stored_tokenizers(self, query_ids: Iterable[str]) -> set[str]:
        """The vocabulary hashes of the tokenizers that made the stored prompts (empty: not recorded)."""
        return set()

    def proxy_config(self) -> ProxyConfig:
        """The proxy the prompts were built with."""
        raise QrncaError(f"this {type(self).__name__} records no proxy")

    @property
    def run_dir(self) -> Path | None:
        """The directory this result lives in (evaluate writes ``evaluation.json`` there), or None."""
        return None

    def neuron_sets(self) -> dict[str, NeuronSet]:
        """``{query_id: NeuronSet}`` for every query: what a registered locator returns."""
        return {q: self.qr_neurons(q) for q in self.query_ids}

    def to_dataframe(self) -> Any:
        """One row per (query, neuron): query_id, group, rank, layer, neuron and the score (``score_name``)."""
        import pandas as pd

        cols = ["query_id", "group", "rank", "layer", "neuron", self.score_name]
        rows = [dict(zip(cols, (q, self.group_of(q), r, layer, n, x)))
                for q in self.query_ids for r, (layer, n, x) in enumerate(self.qr_neurons(q))]
        return pd.DataFrame(rows, columns=cols)

    def write_neurons(self, path: str | Path) -> Path:
        """Write ``neurons.json`` to ``path`` (a file, or a directory to put it in), atomically."""
        p = Path(path)
        if p.is_dir() or not p.suffix:
            p.mkdir(parents=True, exist_ok=True)
            p = p / "neurons.json"
        write_json_atomic(p, self.neurons_json(), indent=2)
        return p

    def _group_counts(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for q in self.query_ids:
            out.setdefault(self.group_of(q), []).append(len(self.qr_neurons(q)))
        return out

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{g}</td><td>{len(v)}</td><td>{sum(v) / len(v):.1f}</td></tr>"
                       for g, v in self._group_counts().items())
        return (f"<b>{self.method}</b>: {len(self.query_ids)} queries<table><tr><th>group</th><th>queries</th>"
                f"<th>neurons</th></tr>{rows}</table>")


def query_record(query: Query) -> dict[str, Any]:
    """A query as JSON (a loader's odd meta value becomes its string rather than breaking the write)."""
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(query), default=str))


@dataclass(eq=False)
class RankedResult(Located):
    """What a registered method other than QRNCA found (``locate(..., method="atp")``): a ``Located``.

    It holds everything ``evaluate`` needs to judge it without rebuilding anything: the method (``locator``),
    its config (``config``, as a dict), the queries and the exact prompts used, the layers searched, the proxy,
    each query's ranked ``NeuronSet`` with its scores, what it cost (``costs``: ``seconds``,
    ``seconds_per_query``, ``passes``), and the model's name, dtype and device. ``save(DIR)`` writes
    ``DIR/neurons.json`` (the shared schema, plus a ``ranked`` section with the prompts and the rest);
    ``RankedResult.load(DIR)`` reads it back with equal neurons.

    Example:
        >>> res = locate(model, queries, RankConfig(ProxyConfig("cloze")), method="atp")   # doctest: +SKIP
        >>> res.save("runs/atp"); RankedResult.load("runs/atp").neurons == res.neurons                  # doctest: +SKIP
        True
    """

    method: ClassVar[str] = "ranked"

    locator: str
    config: dict[str, Any]
    model: str
    layers: list[int]
    groups: dict[str, str]
    neurons: dict[str, NeuronSet]
    prompts: dict[str, list[Prompt]] = field(repr=False)
    query_records: dict[str, Query] = field(repr=False)
    proxy: ProxyConfig
    costs: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    group_by: str = "group"
    dtype: str | None = None
    device: str | None = None
    model_identity: dict[str, Any] = field(default_factory=dict, repr=False)
    tokenizer: dict[str, Any] = field(default_factory=dict, repr=False)
    versions: dict[str, Any] = field(default_factory=dict, repr=False)
    meta: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None

    @property
    def query_ids(self) -> list[str]:
        return list(self.neurons)

    def group_of(self, query_id: str) -> str:
        return self.groups[query_id]

    def qr_neurons(self, query_id: str) -> NeuronSet:
        return self.neurons[query_id]

    def locator_name(self) -> str:
        return self.locator

    def stored_prompts(self, query_ids: Iterable[str] | None = None) -> dict[str, list[Prompt]]:
        ids = self.query_ids if query_ids is None else list(query_ids)
        missing = [q for q in ids if q not in self.prompts]
        if missing:
            raise QrncaError(f"this {self.locator} result holds no prompts for queries {missing[:3]}")
        return {q: list(self.prompts[q]) for q in ids}

    def stored_queries(self, query_ids: Iterable[str] | None = None) -> list[Query]:
        ids = self.query_ids if query_ids is None else list(query_ids)
        missing = [q for q in ids if q not in self.query_records]
        if missing:
            raise QrncaError(f"this {self.locator} result holds no queries {missing[:3]}")
        return [self.query_records[q] for q in ids]

    def stored_tokenizers(self, query_ids: Iterable[str]) -> set[str]:
        sha = self.tokenizer.get("vocab_sha256")
        return {sha} if sha else set()

    def proxy_config(self) -> ProxyConfig:
        return self.proxy

    @property
    def run_dir(self) -> Path | None:
        return self.out

    def neurons_json(self) -> dict[str, Any]:
        qs = {q: {"group": self.groups[q], **_fields(self.query_records.get(q)),
                  "qr_neurons": self.neurons[q].to_list()} for q in self.neurons}
        n = max(1, len(qs))
        return {
            "config": self.config, "method": self.locator, "versions": self.versions,
            "model_identity": self.model_identity, "model": self.model, "data": self.data, "layers": self.layers,
            "group_by": self.group_by, "dtype": self.dtype, "device": self.device, "common_neurons": [],
            "queries": qs,
            "summary": {"n_queries": len(qs), "mean_qr_neurons": sum(len(v) for v in self.neurons.values()) / n,
                        "n_common_neurons": 0, "n_empty": sum(not v for v in self.neurons.values())},
            # What load reads back (and evaluate judges on): the prompts as used, the queries as they were.
            "ranked": {
                "format": RANKED_FORMAT, "locator": self.locator, "proxy": self.proxy.to_dict(),
                "groups": self.groups, "costs": self.costs, "tokenizer": self.tokenizer, "meta": self.meta,
                "queries": {q: query_record(r) for q, r in self.query_records.items()},
                "prompts": {q: [p.to_dict() for p in ps] for q, ps in self.prompts.items()},
            },
        }

    def save(self, out: str | Path) -> Path:
        """Write ``out/neurons.json`` (created if missing) and remember ``out`` as this result's directory.

        A directory holding a QRNCA run or another kind of ``neurons.json`` is refused; saving over an earlier
        ``RankedResult`` replaces it (with a warning when an ``evaluation.json`` there judged other neurons).

        Args:
            out: the directory.

        Returns:
            The directory, as a ``Path``.

        Example:
            >>> res.save("runs/atp")   # doctest: +SKIP
            PosixPath('runs/atp')
        """
        root = Path(out)
        if (root / "manifest.json").exists():
            raise StoreError(f"{root} holds a QRNCA run (manifest.json); save the {self.locator} result to another "
                             "directory")
        path = root / "neurons.json"
        old = _read_json(path) if path.exists() else None
        if old is not None and "ranked" not in old:
            raise StoreError(f"{path} was not written by a RankedResult; save the {self.locator} result to another "
                             "directory")
        doc = self.neurons_json()
        if old is not None and old.get("queries") != json.loads(json.dumps(doc["queries"])) \
                and (root / "evaluation.json").exists():
            warnings.warn(f"{root / 'evaluation.json'} judged the neurons this save replaces; rerun "
                          f"`qrnca-lens evaluate {root}` before reading it or the report", stacklevel=2)
        root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, doc, indent=2)
        self.out = root
        return root

    @classmethod
    def load(cls, out: str | Path) -> RankedResult:
        """The result ``save`` wrote to ``out``.

        Args:
            out: the directory (with ``neurons.json``).

        Returns:
            The ``RankedResult``, its ``out`` set to ``out``.

        Example:
            >>> RankedResult.load("runs/atp").locator   # doctest: +SKIP
            'atp'
        """
        from .data.prompts import Prompt, ProxyConfig
        from .data.queries import Query

        root = Path(out)
        path = root / "neurons.json"
        if not path.exists():
            raise StoreError(f"{path} does not exist: run `qrnca-lens locate --method NAME ... --out {root}` first")
        doc = _read_json(path)
        r = doc.get("ranked")
        if not isinstance(r, dict):
            kind = "a QRNCA run (load it with LocateResult.load)" if (root / "manifest.json").exists() else \
                "not a RankedResult (it records no ranked section)"
            raise StoreError(f"{path} is {kind}")
        if r.get("format") != RANKED_FORMAT:
            raise StoreError(f"{path}: ranked format {r.get('format')!r}, this qrnca-lens reads {RANKED_FORMAT}; "
                             "locate again")
        return cls(
            locator=r["locator"], config=doc.get("config") or {}, model=doc["model"], layers=list(doc["layers"]),
            groups=dict(r["groups"]),
            neurons={q: NeuronSet.from_list(e["qr_neurons"]) for q, e in doc["queries"].items()},
            prompts={q: [Prompt.from_dict(p) for p in ps] for q, ps in r["prompts"].items()},
            query_records={q: Query.from_dict(d) for q, d in r["queries"].items()},
            proxy=ProxyConfig.from_dict(r["proxy"]), costs=dict(r.get("costs") or {}), data=doc.get("data"),
            group_by=doc.get("group_by") or "group", dtype=doc.get("dtype"), device=doc.get("device"),
            model_identity=doc.get("model_identity") or {}, tokenizer=r.get("tokenizer") or {},
            versions=doc.get("versions") or {}, meta=dict(r.get("meta") or {}), out=root,
        )

    def __repr__(self) -> str:
        s = self.neurons_json()["summary"]
        return (f"RankedResult({self.locator}, {self.model}, {s['n_queries']} queries, "
                f"{s['mean_qr_neurons']:.1f} neurons/query)")

    def _repr_html_(self) -> str:
        return super()._repr_html_().replace(f"<b>{self.method}</b>", f"<b>{self.locator}</b>", 1)


def _fields(query: Query | None) -> dict[str, str]:
    """The query's language and relation, if it has them (the report regroups by these)."""
    if query is None:
        return {}
    return {k: v for k in ("language", "relation") if (v := getattr(query, k, None))}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{path} cannot be read as JSON ({e}); locate again into this directory") from None
    if not isinstance(doc, dict):
        raise StoreError(f"{path} is not a neurons.json document (not a JSON object)")
    return doc
