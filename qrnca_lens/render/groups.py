"""The report's group maps: how the run looks when grouped by ``group``, ``language`` or ``relation``.

The report regroups the run once (``grouping.regroup``); the maps of the Maps section (heatmaps, layer
distributions, overlap matrix) and every per-group table then follow that grouping. This module adds what
only makes sense across groups: QR neurons per query per group (the paper's Table 3), the share of each
group's QR neurons found in that group only or in every group, and the model's competence per group from
a competence record (``competence``). A group whose accuracy is not above chance is labelled
``"<group> (at chance)"`` everywhere: ``relabel`` renames it in the run and in the evaluation before any
section draws, so every table and figure carries the mark.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..html import esc, html_fmt, html_note, html_table
from ..render import analysis as A
from .analysis import group_specificity
from .competence import Z_MARGIN, chance_margin

__all__ = ["AT_CHANCE", "group_labels", "relabel", "relabel_evaluation", "group_maps_section"]

AT_CHANCE = " (at chance)"


def group_labels(groups: list[str], competence: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Group -> its label: the name, with ``AT_CHANCE`` appended when its competence says so.

    Example:
        >>> group_labels(["de", "fr"], {"de": {"at_chance": True}, "fr": {"at_chance": False}})
        {'de': 'de (at chance)', 'fr': 'fr'}
    """
    return {g: g + AT_CHANCE if (competence.get(g) or {}).get("at_chance") else g for g in groups}


def relabel(doc: Mapping[str, Any], labels: Mapping[str, str]) -> dict[str, Any]:
    """A copy of the neurons.json dict whose query entries carry their group's label as ``group``."""
    qs = {q: {**e, "group": labels.get(str(e.get("group", "-")), e.get("group"))} for q, e in doc["queries"].items()}
    return {**doc, "queries": qs}


def relabel_evaluation(ev: dict[str, Any] | None, labels: Mapping[str, str]) -> dict[str, Any] | None:
    """evaluation.json with its per-group keys (PCR, neuron-based prediction) replaced by their labels."""
    if not isinstance(ev, dict) or "_error" in ev:
        return ev

    def keys(d: Any) -> Any:
        return {labels.get(k, k): v for k, v in d.items()} if isinstance(d, Mapping) else d

    out = {**ev, "per_group": keys(ev.get("per_group"))}
    npred = ev.get("neuron_prediction")
    if isinstance(npred, Mapping):
        out["neuron_prediction"] = {**npred, "per_group": keys(npred.get("per_group"))}
    return out


def _share(n: int, share: float | None) -> str:
    return f"{n} ({html_fmt(share, '{:.0%}')})"


def group_maps_section(doc: Mapping[str, Any], by: str, labels: Mapping[str, str],
                       competence: Mapping[str, Mapping[str, Any]], record: Mapping[str, Any] | None,
                       eval_by: str | None) -> str:
    """Table 3 (QR neurons per query), group-specific and shared neurons, and competence, one row per group.

    Args:
        doc: the run's neurons.json dict, regrouped by ``by`` (not relabelled).
        by: the field it is grouped by.
        labels: group -> label (``group_labels``).
        competence: ``competence.group_competence`` of the run (empty without a record).
        record: the competence record (its ``source`` is named), or None.
        eval_by: the field evaluation.json grouped its numbers by (None: no evaluation).
    """
    gs = A.groups(doc)
    title = {"group": "Group maps"}.get(by, f"{by.capitalize()} maps")
    out = [f"<h2 id=group-maps>{esc(title)}</h2>",
           f'<p class="sub">Queries grouped by their <code>{esc(by)}</code> field: the maps above (heatmaps, layer '
           f"distribution, overlap matrix) and every per-group table show one {esc(by)} per panel or row.</p>"]
    if eval_by is not None and eval_by != by:
        out.append(html_note(f"evaluation.json grouped its per-group numbers (and drew its unrelated controls) by "
                             f"<code>{esc(eval_by)}</code>, not <code>{esc(by)}</code>: rerun <code>qrnca-lens evaluate "
                             f"DIR --group-by {esc(by)}</code> for per-{esc(by)} PCR."))
    spec = group_specificity(doc)
    summaries = {r["group"]: r for r in A.group_summaries(doc)}
    rows = []
    overall: dict[str, Any] = {}
    if record is not None and record.get("accuracy") is not None and record.get("n"):
        ch = record.get("chance")
        overall = {"accuracy": record["accuracy"], "chance": ch, "n": record["n"],
                   "margin": chance_margin(ch, float(record["n"])) if ch is not None else None}
    for g in [*gs, "all groups"]:
        s, sp = summaries.get(g), spec[g]
        c = overall if g == "all groups" else (competence.get(g) or {})
        n_q = s["n_queries"] if s else len(doc["queries"])
        mean = s["mean_qr_neurons"] if s else A.run_summary(doc)["mean_qr_neurons"]
        chance = c.get("chance")
        rows.append([f"<b>{esc(labels.get(g, g))}</b>", n_q, html_fmt(mean, "{:.1f}"), sp["pooled"],
                     _share(sp["specific"], sp["share_specific"]), _share(sp["shared_all"], sp["share_shared_all"]),
                     html_fmt(c.get("accuracy"), "{:.1%}"), html_fmt(chance, "{:.1%}"),
                     html_fmt(chance + c["margin"] if chance is not None and c.get("margin") is not None else None,
                              "{:.1%}"),
                     html_fmt(c.get("n"), "{:.0f}")])
    out.append(html_table([esc(by), "queries", "QR neurons / query", "distinct neurons", f"only in this {esc(by)}",
                           f"in every {esc(by)}", "competence accuracy", "chance", "at chance below", "prompts"],
                          rows, [False] + [True] * 9))
    out.append(f'<p class="muted">QR neurons / query: the mean number of QR neurons per query (the paper\'s Table 3). '
               f"Distinct neurons: the union of the {esc(by)}'s QR neurons; of these, <i>only in this {esc(by)}</i> "
               f"are found for no other {esc(by)}, <i>in every {esc(by)}</i> are found for all {len(gs)} (shares of the "
               f"{esc(by)}'s distinct neurons; with one {esc(by)} both are all of them).</p>")
    if record is None:
        out.append(html_note("No competence record found (<code>accuracy.json</code> in the run directory, or in its "
                             "parent for the run's data and proxy), so no group is checked against chance. Write one "
                             "with <code>qrnca-lens accuracy --model M --data D --proxy P --json | tail -n 1 &gt; "
                             "DIR/accuracy.json</code>."))
    else:
        out.append(f'<p class="muted">Competence: accuracy of the unmodified model per {esc(by)} from '
                   f"<code>{esc(str(record.get('source')))}</code> (prompt-weighted over the query groups that make up "
                   f"each {esc(by)}). A {esc(by)} is marked <b>{esc(AT_CHANCE.strip())}</b> in every table and figure "
                   f"when its accuracy is at most chance + {Z_MARGIN:g} binomial standard errors under chance, "
                   "sqrt(chance (1 − chance) / prompts) (column <i>at chance below</i>); prompts of one query are not "
                   "independent, so the margin is narrow: it marks too few groups rather than too many. Neurons of a group the model cannot answer explain "
                   "guessing, not knowledge.</p>")
    return "\n".join(out)
