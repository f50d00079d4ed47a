"""Which field a run is mapped and judged by: ``group``, ``language`` or ``relation``. Pure, no model.

A ``Query`` has one ``group`` (the field prompts draw in-context examples and distractors from, which never
changes) and, optionally, a ``language`` and a ``relation``. ``regroup(x, by)`` relabels each query's group
with the chosen field, for a list of queries or a ``neurons.json`` dict; every map (``analysis``), the
report and ``evaluate``'s per-group numbers and unrelated controls then follow the chosen field without
knowing about it. This is the one place the relabelling happens.

``group_specificity`` (with the maps of ``analysis``) says how many of each group's pooled QR neurons are
found in that group only, and how many in every group.

Example:
    >>> doc = {"queries": {"a": {"group": "capital-de", "language": "de", "qr_neurons": [[0, 1, 0.5]]},
    ...                    "b": {"group": "capital-fr", "language": "fr", "qr_neurons": [[0, 1, 1.0], [1, 2, 1.0]]}}}
    >>> [e["group"] for e in regroup(doc, "language")["queries"].values()]
    ['de', 'fr']
    >>> group_specificity(regroup(doc, "language"))["fr"]["specific"]
    1
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, get_args, overload

from ..config import Config
from ..errors import QrncaError
from .queries import Query

__all__ = ["GroupBy", "GROUP_BY", "GroupingConfig", "check_group_by", "group_key", "regroup"]

GroupBy = Literal["group", "language", "relation"]
GROUP_BY: tuple[str, ...] = get_args(GroupBy)
# Where the original ``Query.group`` of a regrouped neurons.json entry is kept (competence is recorded by it).
QUERY_GROUP = "query_group"

T = TypeVar("T")


def check_group_by(by: str | None, what: str = "group_by") -> None:
    """Refuse anything but ``GROUP_BY`` (or None, meaning: the run's recorded choice)."""
    if by is not None and by not in GROUP_BY:
        raise QrncaError(f"{what} must be one of {list(GROUP_BY)}, got {by!r}")


@dataclasses.dataclass(frozen=True)
class GroupingConfig(Config):
    """Which query field a run is mapped by; ``--group-by`` of ``locate`` and ``report`` is generated from it.

    ``None``: the run's recorded choice (``LocateResult.group_by``, ``neurons.json``'s ``group_by``); a new
    run records ``"group"``. ``EvalConfig.group_by`` is the same field for ``evaluate``.
    """

    group_by: GroupBy | None = dataclasses.field(default=None, metadata={
        "help": "the query field the maps, per-group numbers and controls group by (default: the run's; a new "
                "run: group)"})

    def validate(self) -> None:
        check_group_by(self.group_by)


def group_key(item: Query | Mapping[str, Any], by: str) -> str | None:
    """The group ``item`` (a ``Query`` or a neurons.json query entry) falls in under ``by``; None if it lacks the field.

    Example:
        >>> group_key(Query("q", "capital-de", "Berlin is in [Y].", "Germany", language="de"), "language")
        'de'
    """
    check_group_by(by)
    value = getattr(item, by) if isinstance(item, Query) else item.get(by)
    return str(value) if value not in (None, "") else None


def _missing(ids: Sequence[str], n: int, by: str, fix: str) -> QrncaError:
    shown = ", ".join(repr(q) for q in ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
    return QrncaError(f"cannot group by {by!r}: {len(ids)} of {n} queries have no {by!r} field ({shown}); {fix}")


@overload
def regroup(x: Sequence[Query], by: str) -> list[Query]: ...
@overload
def regroup(x: Mapping[str, Any], by: str) -> dict[str, Any]: ...
def regroup(x: Any, by: str) -> Any:
    """``x`` with every query's group replaced by its ``by`` field (``"group"``: ``x`` unchanged).

    Args:
        x: queries (a list of ``Query``), or a ``neurons.json`` dict (its ``queries`` entries carry ``group``
            and, since qrnca-lens records them, ``language`` and ``relation``).
        by: ``"group"``, ``"language"`` or ``"relation"``.

    Returns:
        New queries (each keeps its original group in ``meta["query_group"]``), or a new dict whose entries
        keep theirs under ``"query_group"`` and which records ``"group_by": by``. The input is not changed.

    Raises:
        QrncaError: naming the queries that lack the field, and the fix.

    Example:
        >>> qs = [Query("a", "capital-de", "x [Y]", "y", language="de", relation="capital")]
        >>> regroup(qs, "relation")[0].group
        'capital'
    """
    check_group_by(by)
    if isinstance(x, Mapping):
        return _regroup_doc(x, by)
    queries = list(x)
    if by == "group":
        return queries
    lacking = [q.id for q in queries if group_key(q, by) is None]
    if lacking:
        raise _missing(lacking, len(queries), by,
                       f"add a {by!r} field to these rows of the data file (our JSONL: \"{by}\": \"...\"; mLAMA-style "
                       "rows keep theirs), or group by 'group' (--group-by group)")
    return [dataclasses.replace(q, group=group_key(q, by), meta={**q.meta, QUERY_GROUP: q.group}) for q in queries]


def _regroup_doc(doc: Mapping[str, Any], by: str) -> dict[str, Any]:
    queries = doc.get("queries")
    if not isinstance(queries, Mapping):
        raise QrncaError("not a neurons.json dict: it has no 'queries' mapping")
    if by == "group":
        return {**doc, "group_by": by}
    lacking = [q for q, e in queries.items() if group_key(e, by) is None]
    if lacking:
        raise _missing(lacking, len(queries), by,
                       f"the run was made before neurons.json recorded {by!r} (rerun `qrnca-lens reduce DIR`, which "
                       f"rewrites it from the stored queries), or its data has no {by!r} field (add one and locate "
                       "again); or group by 'group'")
    out = {q: {**e, "group": group_key(e, by), QUERY_GROUP: e.get(QUERY_GROUP, e.get("group"))}
           for q, e in queries.items()}
    return {**doc, "queries": out, "group_by": by}
