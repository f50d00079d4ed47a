"""The offline HTML report of a run: one self-contained ``report.html``.

``write_report(DIR, model)`` reads ``DIR/neurons.json`` (and ``DIR/evaluation.json`` when ``qrnca-lens
evaluate`` or ``EvaluationResult.save`` has written it) and writes ``DIR/report.html``. It also takes the
result in memory: ``write_report(run, model, evaluation=res)`` with a ``LocateResult`` (or any ``Located``),
saved or not, and optionally the ``EvaluationResult``. The report holds the run summary, the maps
(geographical heatmaps, layer distributions, overlap matrix), vocabulary projections of the common neurons
and of each group's top QR neurons, the evaluation table, per-group summaries, and a few queries with their
QR neurons and circuitsvis views. Figures are inlined as base64 PNG, the circuitsvis bundle and the CSS are inlined too:
the file opens with no network. Without a model the weight- and forward-dependent parts (projections,
views) are skipped with a note.

Groups are those of ``group_by`` (``group``, ``language`` or ``relation``; default: the run's recorded
choice), applied once by ``grouping.regroup``; the group maps section (``render.groups``) adds QR neurons per
query per group, group-specific and shared neurons, and, with a competence record, each group's accuracy
and chance level, marking groups at chance in every table and figure.

Example:
    >>> model = load_model("smollm2")               # doctest: +SKIP
    >>> write_report("runs/facts", model)           # doctest: +SKIP
    PosixPath('runs/facts/report.html')
    >>> write_report(run, model, evaluation=res, out="facts.html")   # in memory  # doctest: +SKIP
    PosixPath('facts.html')
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from ..atomic import write_text_atomic
from ..data.grouping import check_group_by, regroup
from ..errors import QrncaError
from ..html import esc, html_note
from ..protocols import HookedModel
from ..render import analysis as A
from .competence import competence_record, group_competence
from .groups import group_labels, group_maps_section, relabel, relabel_evaluation
from .sections import (
    evaluation_section,
    groups_section,
    maps_section,
    neuron_projections,
    pick_queries,
    queries_section,
    summary_section,
    vocab_section,
)

__all__ = ["load_run", "report_html", "write_report", "RunLike"]

# A run directory, or a located result in memory (``LocateResult``, ``LensResult``; with or without ``.out``).
RunLike = Union[str, Path, Any]


CSS = """
body{font:14px/1.45 -apple-system,'Segoe UI',Roboto,'Helvetica Neue',Arial,sans-serif;color:#1d1d1f;
 margin:0;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:18px 28px 60px;background:#fff;min-height:100vh}
h1{font-size:24px;margin:8px 0 2px} h2{font-size:19px;margin:30px 0 8px;padding-top:8px;border-top:1px solid #e3e5e8}
h3{font-size:15px;margin:20px 0 6px} .sub{color:#666;margin:0 0 12px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid #dfe2e6;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f1f3f5;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;margin:8px 0;font-size:13px}
.muted{color:#777;font-size:12.5px}
img.fig{max-width:100%;border:1px solid #eceef0;margin:6px 0}
code.tok{background:#eef1f5;border-radius:3px;padding:0 4px;margin:0 2px 2px 0;display:inline-block;
 font:12px/1.5 ui-monospace,Menlo,Consolas,monospace;white-space:pre}
pre.prompt{background:#f6f8fa;border:1px solid #e3e5e8;padding:8px;white-space:pre-wrap;font-size:12px;
 max-height:220px;overflow:auto}
nav a{margin-right:12px} .query{border:1px solid #e3e5e8;border-radius:6px;padding:4px 14px 10px;margin:14px 0}
.cv-view{margin:6px 0 14px}
dl.kv{display:grid;grid-template-columns:max-content auto;gap:2px 16px;margin:8px 0}
dl.kv dt{color:#555} dl.kv dd{margin:0}
"""


# ---------------------------------------------------------------- loading


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]:
    """``(neurons.json, evaluation.json or None, manifest.json or None)`` of a run directory."""
    run_dir = Path(run_dir)
    path = run_dir / "neurons.json"
    if not path.exists():
        raise QrncaError(f"{path} does not exist: run `qrnca-lens locate ... --out {run_dir}` first "
                         f"(or `qrnca-lens reduce {run_dir}` if every query is attributed)")
    try:
        doc = json.loads(path.read_text())
    except ValueError as e:
        raise QrncaError(f"{path} is not valid JSON ({e}); rerun `qrnca-lens reduce {run_dir}`") from None
    A.groups(doc)  # fails clearly if this is not a neurons.json
    return doc, _optional_json(run_dir / "evaluation.json"), _optional_json(run_dir / "manifest.json")


def _optional_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
    except ValueError:
        return {"_error": f"{path.name} is not valid JSON"}
    return d if isinstance(d, dict) else None

# ---------------------------------------------------------------- the report


def _provenance(manifest: Mapping[str, Any] | None, model: HookedModel | None) -> str:
    """What the run was measured with (from the manifest) and what drew this report."""
    from ..versions import library_versions, model_identity

    def line(label: str, versions: Mapping[str, Any] | None, identity: Mapping[str, Any] | None) -> str:
        if not versions:
            return f"<li>{label}: not recorded (a run made before qrnca-lens recorded versions)</li>"
        v = ", ".join(f"{k} {val}" for k, val in versions.items())
        ident = ", ".join(f"{k} {val}" for k, val in (identity or {}).items())
        return f"<li>{label}: {esc(v)}" + (f"; model: {esc(ident)}" if ident else "") + "</li>"

    m = manifest or {}
    now_identity = model_identity(model) if model is not None else None
    if model is not None:
        from ..model.access import model_numerics

        now_identity = {**(now_identity or {}), **model_numerics(model)}
    run_identity = m.get("model_identity")
    held = {k: m[k] for k in ("dtype", "device") if m.get(k)}  # recorded since runs record how weights are held
    if held:
        run_identity = {**(run_identity or {}), **held}
    return ('<ul class="sub provenance">' + line("measured with", m.get("versions"), run_identity)
            + line("report drawn with", library_versions(), now_identity) + "</ul>")


def _shape(doc: Mapping[str, Any], model: HookedModel | None, manifest: Mapping[str, Any] | None) -> tuple[tuple[int, int], str]:
    from ..model.access import d_mlp, n_layers

    used = A.infer_n_layers(doc)
    top_neuron = max([int(r[1]) for e in doc["queries"].values() for r in (e.get("qr_neurons") or [])] +
                     [int(r[1]) for r in doc.get("common_neurons") or []] + [-1])
    if model is not None:
        shape = (n_layers(model), d_mlp(model))
        if used > shape[0] or top_neuron >= shape[1]:
            raise QrncaError(f"the run ({doc.get('model')}) has neurons up to layer {used - 1}, neuron {top_neuron}, "
                             f"outside the given model's {shape[0]} layers x {shape[1]} neurons: pass the model the "
                             "run was made with")
        return shape, ""
    ms = (manifest or {}).get("model_shape")
    if isinstance(ms, list) and len(ms) == 2 and int(ms[1]) > top_neuron:
        return (used, int(ms[1])), ""
    return (used, top_neuron + 1), "; d_mlp unknown without the model: the maps stop at the highest neuron found"


@dataclass
class _Source:
    """What a report draws: the neurons.json dict, evaluation.json's, the manifest's, where the run lives."""

    doc: dict[str, Any]
    ev: dict[str, Any] | None
    manifest: dict[str, Any] | None
    where: Path | None  # the run directory (None: a result held only in memory)
    prompts_from: Any  # the run directory or the in-memory result: where the stored prompts are read


def _memory_manifest(run: Any, doc: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest fields the report reads, from an unsaved result."""
    out: dict[str, Any] = {"versions": doc.get("versions"), "dtype": doc.get("dtype"), "device": doc.get("device")}
    try:
        out["model_shape"] = list(run.info_shape())  # [layers, d_mlp] while the scores are in memory
    except (AttributeError, StopIteration, QrncaError):
        pass
    return out


def _evaluation_doc(evaluation: Any) -> dict[str, Any]:
    from ..evaluation.result import EvaluationResult

    if isinstance(evaluation, (str, Path)):
        return EvaluationResult.load(evaluation).to_dict()
    if isinstance(evaluation, Mapping):
        return dict(evaluation)
    if isinstance(evaluation, EvaluationResult):
        return evaluation.to_dict()
    raise QrncaError(f"evaluation must be an EvaluationResult, its dict or an evaluation.json path, got "
                     f"{type(evaluation).__name__}")


def _source(run: RunLike, evaluation: Any = None) -> _Source:
    from ..located import Located

    if isinstance(run, (str, Path)):
        doc, ev, manifest = load_run(run)
        src = _Source(doc, ev, manifest, Path(run), run)
    elif isinstance(run, Located):
        doc = run.neurons_json()
        A.groups(doc)
        out = getattr(run, "out", None)
        where = Path(out) if out is not None else None
        on_disk = _optional_json(where / "manifest.json") if where is not None else None
        src = _Source(doc, _optional_json(where / "evaluation.json") if where is not None else None,
                      on_disk or _memory_manifest(run, doc), where, run)
    else:
        raise QrncaError(f"write_report takes a run directory or a located result (LocateResult, LensResult), got "
                         f"{type(run).__name__}")
    if evaluation is not None:
        src.ev = _evaluation_doc(evaluation)
    return src


def _stale_note(doc: Mapping[str, Any], ev: Mapping[str, Any] | None) -> str:
    """A note when the evaluation judged other QR neurons than the run shown (it was reselected since)."""
    judged = ((ev or {}).get("meta") or {}).get("selection") if isinstance(ev, Mapping) else None
    shown = (doc.get("config") or {}).get("selection")
    if isinstance(judged, Mapping) and isinstance(shown, Mapping) and dict(judged) != dict(shown):
        return html_note(f"The evaluation judged the QR neurons of another selection ({esc(json.dumps(judged))}) "
                         f"than this report shows ({esc(json.dumps(shown))}); evaluate the run again.")
    return ""


def report_html(
    run: RunLike,
    model: HookedModel | None = None,
    *,
    evaluation: Any = None,
    queries: Any = None,
    pool: Any = None,
    n_queries: int | None = None,
    k: int = 10,
    group_by: str | None = None,
) -> str:
    """The report as one HTML string; see ``write_report``."""
    from ..versions import PACKAGE_VERSION
    from .views import bundle_js

    src = _source(run, evaluation)
    doc, ev, manifest = src.doc, src.ev, src.manifest
    # The one regrouping, then the at-chance labels: every section below draws the relabelled run.
    check_group_by(group_by, "group_by")
    by = group_by or doc.get("group_by") or "group"
    doc = regroup(doc, by)
    record = competence_record(src.where, doc) if src.where is not None else None
    competence = group_competence(record, doc)
    labels = group_labels(A.groups(doc), competence)
    eval_by = None if ev is None or "_error" in ev else str((ev.get("meta") or {}).get("group_by") or "group")
    group_maps = group_maps_section(doc, by, labels, competence, record, eval_by)
    doc = relabel(doc, labels)
    if eval_by == by:
        ev = relabel_evaluation(ev, labels)
    shape, shape_note = _shape(doc, model, manifest)
    n_queries = min(6, max(len(A.groups(doc)), 1)) if n_queries is None else n_queries
    shown = pick_queries(doc, n_queries)
    projs = neuron_projections(doc, model, shown, k) if model is not None else {}
    proxy = ((doc.get("config") or {}).get("proxy") or {}).get("kind", "")
    title = f"QRNCA report: {doc.get('model')} on {doc.get('data')}" + (f" ({proxy})" if proxy else "")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    place = str(src.where.resolve()) if src.where is not None else "a result in memory (not saved to a run directory)"
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in
                  (("summary", "run"), ("maps", "maps"), ("group-maps", f"by {by}"), ("vocab", "vocabulary"),
                   *((("evaluation", "evaluation"),) if ev is not None else ()), ("groups", "groups"),
                   ("queries", "queries")))
    evaluation_html = evaluation_section(ev)
    stale = _stale_note(doc, ev) if evaluation_html else ""
    if stale:  # right under the section's heading
        evaluation_html = evaluation_html.replace("</h2>", "</h2>" + stale, 1)
    parts = [
        f"<h1>{esc(title)}</h1>",
        f'<p class="sub">{esc(place)} · generated {stamp} by qrnca-lens {PACKAGE_VERSION}</p>',
        _provenance(manifest, model),
        f"<nav>{nav}</nav>",
        summary_section(doc, shape, shape_note),
        maps_section(doc, shape),
        group_maps,
        vocab_section(doc, model, k, projs),
        evaluation_html,
        groups_section(doc, shape[0]),
        queries_section(src.prompts_from, doc, model, shown, queries, pool, projs),
    ]
    # The circuitsvis bundle goes at the end of <head> only when a view needs it (1.3 MB).
    body = "\n".join(p for p in parts if p)
    bundle = f"<script>{bundle_js()}</script>" if 'class="cv-view"' in body else ""
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style>\n{bundle}\n</head>\n<body><main>\n{body}\n"
            f"</main></body></html>\n")


def write_report(
    run: RunLike,
    model: HookedModel | None = None,
    *,
    evaluation: Any = None,
    queries: Any = None,
    pool: Any = None,
    n_queries: int | None = None,
    k: int = 10,
    out: str | Path | None = None,
    group_by: str | None = None,
) -> Path:
    """Write the report of a run (``run/report.html``, or ``out``): one self-contained, offline HTML file.

    ``model`` (the one the run was made with) enables vocabulary projections and circuitsvis views, shown
    on the prompts the run stored for each query. Only for a run that stores none (made before prompts were
    stored) are they rebuilt, with a note saying so, from ``queries`` (default: ``load_data(doc["data"])``)
    with ``pool`` (default: those queries) and the recorded proxy config.
    ``n_queries`` queries are shown (default: one per group, at most 6); ``k`` tokens per projection.

    Args:
        run: the run directory (with ``neurons.json``), or the result in memory: a ``LocateResult`` (from
            ``locate``, ``LocateResult.load`` or ``reselect``) or any ``Located``, saved (``.out``) or not.
        model: the run's model, for projections and circuitsvis views (None: maps and tables only).
        evaluation: an ``EvaluationResult`` (or its dict, or an evaluation.json path) to show; default: the
            run directory's ``evaluation.json`` when there is one.
        queries: queries to rebuild prompts from, for a run that stores none.
        pool: distractors and examples for that rebuild (default: ``queries``).
        n_queries: queries shown in detail (default: one per group, at most 6).
        k: top tokens per vocabulary projection.
        out: where to write (default: ``report.html`` in the run directory; needed for a result that was never
            saved).
        group_by: ``"group"``, ``"language"`` or ``"relation"`` (default: the run's ``LocateResult.group_by``):
            the query field the maps and tables group by; with a competence record (``competence``), groups
            the model answers at chance are marked in every table and figure.

    Returns:
        The path of the written HTML file.

    Example:
        >>> write_report("runs/facts", model)     # doctest: +SKIP
        PosixPath('runs/facts/report.html')
        >>> run = locate(model, queries, cfg)                                            # doctest: +SKIP
        >>> write_report(run, model, evaluation=evaluate(model, run), out="report.html")  # doctest: +SKIP
        PosixPath('report.html')
    """
    if out is None:
        where = Path(run) if isinstance(run, (str, Path)) else getattr(run, "out", None)
        if where is None:
            raise QrncaError("this result was never saved to a run directory, so the report has no default place: "
                             "pass out=PATH (e.g. write_report(run, model, out='report.html'))")
        out = Path(where) / "report.html"
    text = report_html(run, model, evaluation=evaluation, queries=queries, pool=pool, n_queries=n_queries, k=k,
                       group_by=group_by)
    # Written atomically, so a browser never opens half a report.
    return write_text_atomic(Path(out), text)
