"""The verdict of ``evaluate``: ``EvaluationResult`` and its one comparison table of locators.

Rows are locators; columns are what a reviewer asks first: PCR after boosting (x2) and suppressing (x0) with
95% bootstrap intervals, editing flip rates, the free-form log-likelihood drop, agreement with exact
single-neuron ablations (ground truth), how much of a boost follows the option letter rather than the
content (the symbol-binding control, letter MCQA only), and cost. ``comparison_rows`` builds the rows once;
``table()`` (text), ``to_dataframe()`` and the report's HTML table all read them, so they cannot disagree.

Example:
    >>> res = EvaluationResult(pcr={"qrnca": {"boost": 3.0, "suppress": 2.0, "mean_neurons": 12.0}},
    ...                        editing={"qrnca": {"boost": 0.5, "suppress": 0.25}}, per_group={})
    >>> comparison_rows(res)[0]["pcr_boost"], comparison_rows(res)[0]["edit_suppress"]
    (3.0, 0.25)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import Config

__all__ = ["EvaluationResult", "comparison_rows", "COLUMNS"]

# (key, header, format): the comparison table's columns, in order.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("pcr_boost", "PCR boost", "{:.2f}"),
    ("pcr_suppress", "PCR suppress", "{:.2f}"),
    ("edit_boost", "edit boost", "{:.1%}"),
    ("edit_suppress", "edit suppr.", "{:.1%}"),
    ("free_form_drop", "free-form drop", "{:+.3f}"),
    ("gt_precision", "GT P@k", "{:.2f}"),
    ("gt_recall", "GT R@k", "{:.2f}"),
    ("gt_spearman", "GT rho", "{:+.2f}"),
    ("gt_false_negative_rate", "GT FN", "{:.2f}"),
    ("content_share", "content share", "{:.2f}"),
    ("seconds_per_query", "s/query", "{:.2f}"),
    ("passes_per_prompt", "passes/prompt", "{:.0f}"),
    ("mean_neurons", "neurons", "{:.1f}"),
)


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, Mapping) or key not in d:
            return None
        d = d[key]
    return d


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def comparison_rows(res: EvaluationResult) -> list[dict[str, Any]]:
    """One dict per locator: every ``COLUMNS`` key (None where not measured) plus the PCR intervals.

    Args:
        res: an evaluation (``evaluate``'s result, or ``EvaluationResult.from_dict`` of evaluation.json).

    Returns:
        Rows in the order the methods were evaluated; ``boost_ci`` / ``suppress_ci`` are ``[low, high]``.

    Example: see the module docstring.
    """
    n_prompts = _num(_get(res.meta, "n_prompts"))
    rows = []
    for m in dict.fromkeys([*res.pcr, *res.editing]):
        p, cost = res.pcr.get(m, {}), res.costs.get(m, {})
        passes = _num(_get(cost, "passes"))
        seconds = _num(_get(cost, "seconds_per_query"))
        stored = _num(_get(cost, "stored_attribution_seconds"))
        if stored is not None:  # an IG-based locator: its cost is the attribution locate ran, not the re-read
            seconds, passes = stored, None
        rows.append({
            "method": m,
            "pcr_boost": _num(p.get("boost")), "boost_ci": p.get("boost_ci"),
            "pcr_suppress": _num(p.get("suppress")), "suppress_ci": p.get("suppress_ci"),
            "edit_boost": _num(_get(res.editing, m, "boost")), "edit_suppress": _num(_get(res.editing, m, "suppress")),
            "free_form_drop": _num(_get(res.free_form, m, "loglik_drop")),
            "gt_precision": _num(_get(res.ground_truth, "methods", m, "precision")),
            "gt_recall": _num(_get(res.ground_truth, "methods", m, "recall")),
            "gt_spearman": _num(_get(res.ground_truth, "methods", m, "spearman")),
            "gt_false_negative_rate": _num(_get(res.ground_truth, "methods", m, "false_negative_rate")),
            "content_share": _num(_get(res.symbol_binding, "per_method", m, "content_share")),
            "seconds_per_query": seconds,
            "passes_per_prompt": passes / n_prompts if passes is not None and n_prompts else None,
            "mean_neurons": _num(p.get("mean_neurons")),
        })
    return rows


def _fmt(x: Any, fmt: str) -> str:
    return "-" if x is None else fmt.format(x)


def _with_ci(x: Any, ci: Any) -> str:
    if x is None:
        return "-"
    lo, hi = (ci if isinstance(ci, (list, tuple)) and len(ci) == 2 else (None, None))
    return f"{x:.2f} [{_fmt(_num(lo), '{:.2f}')}, {_fmt(_num(hi), '{:.2f}')}]"


@dataclass
class EvaluationResult(Config):
    """evaluation.json as an object: ``to_dict()``, ``table()``, ``to_dataframe()``, notebook display.

    ``pcr`` / ``editing`` / ``free_form`` / ``ground_truth`` / ``symbol_binding`` / ``costs`` are keyed by
    method (``free_form`` also holds its totals; ``ground_truth`` is a ``GroundTruthResult.to_dict()``,
    ``symbol_binding`` a ``SymbolBindingResult.to_dict()``). ``to_dict`` / ``from_dict`` are the base's
    (plain dicts; unknown keys refused, the version key accepted).

    Example:
        >>> res = EvaluationResult(pcr={"random": {"boost": 1.0}}, editing={}, per_group={})
        >>> res.to_dataframe()["pcr_boost"].tolist()
        [1.0]
    """

    pcr: dict[str, dict[str, Any]]
    editing: dict[str, dict[str, Any]]
    per_group: dict[str, dict[str, Any]]
    free_form: dict[str, Any] = field(default_factory=dict)
    neuron_prediction: dict[str, Any] = field(default_factory=dict)
    ground_truth: dict[str, Any] = field(default_factory=dict)
    symbol_binding: dict[str, Any] = field(default_factory=dict)
    costs: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """The comparison table as text: one row per locator (``COLUMNS``; "-" where not measured)."""
        rows = comparison_rows(self)
        shown = [c for c in COLUMNS if any(r[c[0]] is not None for r in rows)]
        width = {"pcr_boost": 20, "pcr_suppress": 20}
        head = f"{'method':<12} " + " ".join(f"{h:>{max(width.get(k, 0), len(h))}}" for k, h, _ in shown)
        lines = [head, "-" * len(head)]
        for r in rows:
            cells = []
            for k, h, fmt in shown:
                text = _with_ci(r[k], r[k.replace("pcr_", "") + "_ci"]) if k in width else _fmt(r[k], fmt)
                cells.append(f"{text:>{max(width.get(k, 0), len(h))}}")
            lines.append(f"{r['method']:<12} " + " ".join(cells))
        notes = []
        if self.ground_truth:
            notes.append(f"GT: agreement with exact single-neuron zero-ablation on each query's candidates "
                         f"(union of the locators' top-{self.ground_truth.get('k')} + as many random)")
        if self.costs:
            notes.append("s/query: the locator's seconds per query on this machine (IG-based ones: the attribution "
                         "locate stored); passes/prompt: forward or backward passes over one prompt")
        if self.symbol_binding:
            notes.append("content share: share of a boost's rise that follows the content, not the letter "
                         "(re-lettered options; 1 = content, 0 = letter)")
        return "\n".join(lines + notes)

    def to_dataframe(self) -> Any:
        """One row per locator: the comparison columns, the PCR intervals and every other PCR number."""
        import pandas as pd

        out = []
        for r in comparison_rows(self):
            extra = {k: v for k, v in self.pcr.get(r["method"], {}).items() if not isinstance(v, list)}
            out.append({**{f"pcr_{k}": v for k, v in extra.items() if k not in ("boost", "suppress", "mean_neurons")},
                        **r})
        return pd.DataFrame(out)

    def _repr_html_(self) -> str:
        return "<pre>" + self.table() + "</pre>"

    def __str__(self) -> str:
        return self.table()
