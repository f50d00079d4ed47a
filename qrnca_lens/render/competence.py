"""Is the model competent on each group? Reading a competence record and marking groups at chance. Pure.

A competence record is what ``qrnca-lens accuracy`` measures (``scoring.AccuracyResult``): accuracy over
prompts, the chance level and, per ``Query.group``, accuracy and the number of prompts ``n``. The report
looks for it as ``accuracy.json`` in the run directory, then in its parent (where ``qrnca-lens demo`` writes
it), in either form: one ``AccuracyResult.to_dict()``, or the demo's ``{"runs": [...]}`` whose entries also
name their ``data`` and ``proxy``. An entry is used only if its proxy kind and data match the run's (in the
parent directory it must name the run's data).

**At chance.** A group is marked *at chance* when its accuracy is at most ``chance + 2 s.e.``, with the
binomial standard error under chance, ``s.e. = sqrt(chance (1 - chance) / n)`` over its ``n`` prompts: its
accuracy is not credibly above guessing (one-sided, about 2.3% false alarms for independent prompts). The
prompts of one query share its fact, so they are not independent and the true s.e. is larger: the margin
marks too few groups rather than too many, and a group just above it is weak evidence of competence. For a
cloze proxy (top-1 of the answer's first token over the vocabulary) chance is guessing a random answer of
the group (``proxies.cloze_chance``, stored per group by ``scoring.accuracy``); a cloze record from before
that (no chance) gets 0, so only a group that never answers right is marked; other records without a
chance level mark nothing. A group's own chance, where the record has one, is used over the record's.

When the report groups by another field than ``Query.group`` (``grouping.regroup``), each new group's
accuracy is the prompt-weighted mean over the query groups that make it up (weights ``n``); a query group
that feeds several new groups cannot be split, and those groups get no competence.

Example:
    >>> at_chance(0.30, 0.25, 20)   # 0.30 <= 0.25 + 2 * sqrt(0.25 * 0.75 / 20) = 0.444
    True
    >>> at_chance(0.60, 0.25, 20)
    False
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..data.grouping import QUERY_GROUP

__all__ = ["COMPETENCE_FILE", "Z_MARGIN", "chance_margin", "at_chance", "competence_record", "group_competence"]

COMPETENCE_FILE = "accuracy.json"
Z_MARGIN = 2.0


def chance_margin(chance: float, n: int | float) -> float:
    """``Z_MARGIN`` binomial standard errors of an accuracy over ``n`` prompts when the true rate is ``chance``."""
    return Z_MARGIN * math.sqrt(chance * (1.0 - chance) / n) if n > 0 else math.inf


def at_chance(accuracy: float, chance: float, n: int | float) -> bool:
    """Whether ``accuracy`` over ``n`` prompts is not above ``chance`` by more than ``chance_margin``.

    Example:
        >>> at_chance(0.0, 0.0, 10), at_chance(0.1, 0.0, 10)
        (True, False)
    """
    return accuracy <= chance + chance_margin(chance, n)


def _kind(entry: Mapping[str, Any]) -> str | None:
    p = entry.get("proxy")
    return p.get("kind") if isinstance(p, Mapping) else p if isinstance(p, str) else None


def _matches(entry: Any, kind: str | None, data: str | None, strict: bool) -> bool:
    """Same proxy kind and data where both are known; ``strict`` (a parent directory's record, which may hold
    other runs' checks): the entry must name the run's data."""
    if not isinstance(entry, Mapping) or not isinstance(entry.get("per_group"), Mapping):
        return False
    k, d = _kind(entry), entry.get("data")
    if strict and (d is None or d != data):
        return False
    return (k is None or kind is None or k == kind) and (d is None or data is None or d == data)


def competence_record(run_dir: str | Path, doc: Mapping[str, Any]) -> dict[str, Any] | None:
    """The competence record of the run in ``run_dir`` (``doc`` is its neurons.json), or None if there is none.

    Returns:
        The matching entry (``accuracy``, ``chance``, ``per_group``, ...) plus ``"source"``: the file read.
        ``chance`` is 0.0 for a cloze record that gives none (see the module docstring).
    """
    kind = ((doc.get("config") or {}).get("proxy") or {}).get("kind")
    data = doc.get("data")
    here = Path(run_dir).resolve()
    for path, strict in ((here / COMPETENCE_FILE, False), (here.parent / COMPETENCE_FILE, True)):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        runs = rec.get("runs") if isinstance(rec, Mapping) else None
        entries: list[Any] = runs if isinstance(runs, list) else [rec]
        entry = next((e for e in entries if _matches(e, kind, data, strict)), None)
        if entry is not None:
            out = {**entry, "source": str(path)}
            if out.get("chance") is None and (_kind(entry) or kind) == "cloze":
                out["chance"] = 0.0
            return out
    return None


def group_competence(record: Mapping[str, Any] | None, doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each group's competence: ``{group: {"accuracy", "chance", "n", "margin", "at_chance"}}``.

    Args:
        record: a ``competence_record`` (None: no competence, an empty dict is returned).
        doc: the neurons.json dict as the report shows it, regrouped or not (``grouping.regroup`` keeps each
            entry's ``Query.group``, by which the record counts).

    Returns:
        Groups of ``doc`` with a record; ``at_chance`` is None where the record has no chance level.
    """
    if not record:
        return {}
    per = record.get("per_group") or {}
    feeds: dict[str, set[str]] = {}  # query group -> the doc's groups it falls into
    for e in (doc.get("queries") or {}).values():
        feeds.setdefault(str(e.get(QUERY_GROUP, e.get("group"))), set()).add(str(e.get("group")))
    chance = record.get("chance")
    out: dict[str, dict[str, Any]] = {}
    for g in dict.fromkeys(g for gs in feeds.values() for g in gs):
        parts = [qg for qg, gs in feeds.items() if g in gs]
        if any(len(feeds[qg]) > 1 for qg in parts):
            continue  # a query group split over several of the doc's groups: its accuracy cannot be split
        rows = [per[qg] for qg in parts if isinstance(per.get(qg), Mapping) and per[qg].get("n")]
        n = float(sum(r["n"] for r in rows))
        if not n:
            continue
        acc = sum(float(r["accuracy"]) * float(r["n"]) for r in rows) / n
        own = chance
        if all(r.get("chance") is not None for r in rows):  # per-group chance, prompt-weighted like accuracy
            own = sum(float(r["chance"]) * float(r["n"]) for r in rows) / n
        out[g] = {"accuracy": acc, "chance": own, "n": n,
                  "margin": chance_margin(own, n) if own is not None else None,
                  "at_chance": at_chance(acc, own, n) if own is not None else None}
    return out
