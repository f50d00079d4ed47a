"""``Located``: what a locator found, per query: the one result type of ``locate`` (QRNCA) and ``lens_locate``.

A ``Located`` answers ``qr_neurons(query_id)`` with a ``NeuronSet`` (best first), knows each query's group,
and writes the ``neurons.json`` document that ``analysis``, ``evaluate`` and the report read. ``LocateResult``
(QRNCA: scores, clusters, common neurons; saves a resumable run) and ``LensResult`` (the log-probability lens:
certified top-k, target log-probabilities) are its two kinds.

Example:
    >>> res = lens_locate(model, queries, ProxyConfig("cloze"), progress=False)   # doctest: +SKIP
    >>> res.qr_neurons(queries[0].id)[:2], res.to_dataframe().columns.tolist()      # doctest: +SKIP
    (NeuronSet([(27, 1410, 0.93), (3, 88, 0.51)]), ['query_id', 'group', 'rank', 'layer', 'neuron', 'score'])
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar

from .atomic import write_json_atomic
from .neurons import NeuronSet

__all__ = ["Located"]


class Located(abc.ABC):
    """Per-query neurons with what produced them (see the module docstring).

    Example:
        >>> res = locate(model, queries, LocateConfig(), progress=False)   # doctest: +SKIP
        >>> isinstance(res, Located), res.neuron_sets().keys() == set(res.query_ids)  # doctest: +SKIP
        (True, True)
    """

    method: ClassVar[str] = "?"
    score_name: ClassVar[str] = "score"  # the DataFrame's name for a neuron's score

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
