"""The offline HTML report of a run directory: one self-contained ``report.html``.

``write_report(DIR, model)`` reads ``DIR/neurons.json`` (and ``DIR/evaluation.json`` when ``qrnca-lens
evaluate`` has written it) and writes ``DIR/report.html``: the run summary, the maps (geographical heatmaps,
layer distributions, overlap matrix), vocabulary projections of the common neurons and of each group's top
QR neurons, the evaluation table, per-group summaries, and a few queries with their QR neurons and
circuitsvis views. Figures are inlined as base64 PNG, the circuitsvis bundle and the CSS are inlined too:
the file opens with no network. Without a model the weight- and forward-dependent parts (projections,
views) are skipped with a note.

Example:
    >>> model = load_model("smollm2")               # doctest: +SKIP
    >>> write_report("runs/facts", model)           # doctest: +SKIP
    PosixPath('runs/facts/report.html')
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import analysis as A
from ..atomic import write_text_atomic
from ..errors import QrncaError

__all__ = ["load_run", "report_html", "write_report"]

_esc = html.escape

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


# ---------------------------------------------------------------- small HTML helpers


def _fmt(x: Any, fmt: str = "{:.3g}") -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return "–" if not math.isfinite(x) else fmt.format(x)
    if isinstance(x, (list, tuple)) and all(isinstance(v, (int, float)) for v in x) and len(x) <= 4:
        return "[" + ", ".join(_fmt(v, fmt) for v in x) + "]"
    return _esc(str(x))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], num: Sequence[bool] | None = None) -> str:
    """Cells are HTML already (escape before); ``num`` marks right-aligned columns."""
    num = num or [False] * len(header)
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td{" class=num" if n else ""}>{c}</td>' for c, n in zip(r, num)) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv(pairs: Sequence[tuple[str, str]]) -> str:
    return '<dl class="kv">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in pairs) + "</dl>"


def _note(text: str) -> str:
    return f'<div class="note">{text}</div>'


def _img(png: bytes, alt: str) -> str:
    return f'<img class="fig" alt="{_esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


_GLYPHS = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}


def _tok(s: str) -> str:
    """A token as a chip, its whitespace made visible (" the" and "the" are different tokens); long runs of one
    whitespace character are counted ("␣×24") so an indentation token stays one chip wide."""
    shown = []
    for ch in s:
        if ch in _GLYPHS:
            shown.append(_GLYPHS[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp"):
            shown.append(f"\\u{ord(ch):04x}")
        else:
            shown.append(ch)
    text = re.sub(r"([␣↵⇥␍])\1{3,}", lambda m: f"{m.group(1)}×{len(m.group(0))}", "".join(shown))
    if len(text) > 24:
        text = text[:22] + "…"
    return f'<code class="tok">{_esc(text) if text else "∅"}</code>'


def _neuron(layer: int, n: int) -> str:
    return f"L{layer}.N{n}"


# ---------------------------------------------------------------- sections


def _summary(doc: Mapping[str, Any], shape: tuple[int, int], shape_note: str) -> str:
    cfg = doc.get("config") or {}
    proxy = cfg.get("proxy") or {}
    ig = cfg.get("ig") or {}
    sel = cfg.get("selection") or {}
    s = A.run_summary(doc)
    shots = proxy.get("n_shots")
    if shots is None and proxy.get("kind"):
        from ..proxies import DEFAULT_SHOTS

        shots = DEFAULT_SHOTS.get(proxy["kind"])
    layers = doc.get("layers") or []
    layer_text = (f"{min(layers)}–{max(layers)} ({len(layers)})" if layers and
                  list(layers) == list(range(min(layers), max(layers) + 1)) else _esc(str(layers)))
    acc = s["accuracy"]
    pairs = [
        ("model", f"<b>{_esc(str(doc.get('model')))}</b> ({shape[0]} layers × {shape[1]} MLP neurons{shape_note})"),
        ("data", _esc(str(doc.get("data")))),
        ("proxy", f"{_esc(str(proxy.get('kind', '–')))}: |Q| = {_fmt(proxy.get('n_prompts'))} prompts per query, "
                  f"{_fmt(shots)} in-context examples, seed {_fmt(proxy.get('seed'))}"
                  + (", chat template" if proxy.get("chat_template") else "")),
        ("attribution", f"integrated gradients, m = {_fmt(ig.get('steps'))} steps ({_esc(str(ig.get('alpha_schedule', '–')))}), "
                        f"layers {layer_text}" if ig else f"layers {layer_text}"),
        ("selection", ", ".join(f"{k} = {_fmt(v)}" for k, v in sel.items()) or "–"),
        ("queries", f"{s['n_queries']} in {s['n_groups']} groups"),
        ("QR neurons per query", f"{_fmt(s['mean_qr_neurons'], '{:.1f}')} on average; "
                                 f"{s['empty_queries']} queries kept none"),
        ("common neurons", f"{s['n_common_neurons']} (found for more than u × N queries; removed from the QR sets)"),
        ("model accuracy on the prompts", f"<b>{_fmt(acc, '{:.1%}')}</b>, mean target probability "
                                          f"{_fmt(s['mean_target_prob'], '{:.3f}')}"),
    ]
    honest = ("Accuracy is the share of the attributed prompts on which the unmodified model's prediction was the "
              "target (cloze: top-1 first answer token; MCQA: best-scoring option), recorded at locate time on the "
              "very prompts whose neurons were attributed. It is a competence check of the model on this proxy, not "
              "a held-out benchmark and not a measure of the neurons; QR neurons of prompts the model gets wrong "
              "explain a wrong or unsure answer.")
    return "<h2 id=summary>Run</h2>" + _kv(pairs) + f'<p class="muted">{honest}</p>'


def _maps(doc: Mapping[str, Any], shape: tuple[int, int]) -> str:
    from .figures import heatmap_figure, layer_distribution_figure, overlap_figure, png_bytes

    n_layers, d_mlp = shape
    gs = A.groups(doc)
    out = ["<h2 id=maps>Maps</h2>"]
    maps = {g: A.heatmap(doc, n_layers, d_mlp, group=g) for g in gs}
    if len(gs) > 1:
        maps = {"all groups": A.heatmap(doc, n_layers, d_mlp), **maps}
    out.append("<h3>Where the QR neurons are (accumulated naica, per group)</h3>")
    out.append(_img(png_bytes(heatmap_figure(maps)), "geographical heatmaps of QR neurons"))
    out.append('<p class="muted">Each cell sums naica over the group\'s queries and over a bin of adjacent '
               "neurons; each panel is scaled to its own maximum (square-root brightness). Layer 0 is at the bottom."
               "</p>")
    dist = A.layer_distribution(doc, n_layers)
    out.append("<h3>Layer distribution (distinct QR neurons per layer)</h3>")
    out.append(_img(png_bytes(layer_distribution_figure(dist)), "layer distribution of QR neurons"))
    if len(gs) > 1:
        names, m = A.overlap_matrix(doc)
        out.append("<h3>Overlap between groups</h3>")
        out.append(_img(png_bytes(overlap_figure(names, m)), "overlap matrix"))
        out.append('<p class="muted">Overlap rate of groups A and B = |A ∩ B| / |A ∪ B|, A and B being the pooled '
                   "(union over queries) QR neurons of each group.</p>")
    shared = A.most_shared_neurons(doc, 10, min_groups=2)
    if shared:
        out.append("<h3>QR neurons shared by several groups</h3>")
        out.append(_table(["neuron", "groups", "queries"],
                          [[_neuron(*nn), g, q] for nn, g, q in shared], [False, True, True]))
    return "\n".join(out)


def _projection_cells(p: A.VocabProjection, k: int) -> list[str]:
    return ["".join(_tok(t) for t in p.tokens[:k]), "".join(_tok(t) for t in p.bottom_tokens[:max(3, k // 2)])]


def _projections(doc: Mapping[str, Any], model: Any, shown: Sequence[str], k: int) -> dict[A.Neuron, A.VocabProjection]:
    """Every projection the report shows, in one call (on a bridge each layer's W_out costs a stack of all
    layers, so asking once per neuron list would repeat that work)."""
    want: list[A.Neuron] = [(int(a), int(b)) for a, b in (doc.get("common_neurons") or [])[:_MAX_COMMON]]
    for g in A.groups(doc):
        want += [nn for nn, _ in A.top_group_neurons(doc, g, 3)]
    for q in shown:
        want += A.query_neurons(doc["queries"][q]).pairs()
    want = list(dict.fromkeys(want))
    return {(p.layer, p.neuron): p for p in A.project_neurons(model, want, k)}


_MAX_COMMON = 40


def _vocab(doc: Mapping[str, Any], model: Any, k: int, projs: Mapping[A.Neuron, A.VocabProjection]) -> str:
    out = ["<h2 id=vocab>Vocabulary projections</h2>"]
    common = [(int(a), int(b)) for a, b in doc.get("common_neurons") or []]
    if model is None:
        out.append(_note("No model given: vocabulary projections need its weights (W_out, W_U). "
                         "Rerun with a model (<code>qrnca-lens report DIR</code> loads the run's model)."))
        if common:
            out.append("<p>Common neurons: " + ", ".join(_neuron(*c) for c in common) + "</p>")
        return "\n".join(out)
    out.append('<p class="muted">Top tokens of W_out[l, i] · diag(final-norm weight) · W_U: what the neuron writes '
               "into the residual stream promotes (and, right column, demotes) these tokens. Weights only, no "
               "forward pass. ␣ marks a leading space.</p>")
    out.append("<h3>Common neurons</h3>")
    if common:
        out.append(_table(["neuron", f"top {k} tokens", "most demoted"],
                          [[projs[c].name, *_projection_cells(projs[c], k)] for c in common[:_MAX_COMMON]]))
        if len(common) > _MAX_COMMON:
            out.append(f'<p class="muted">{len(common) - _MAX_COMMON} more common neurons not shown.</p>')
        out.append('<p class="muted">The paper finds that common neurons (in its Llama-2-7B runs, top-layer ones) '
                   "project to letters, punctuation and stop words: neurons every query uses, not knowledge of one. "
                   "The direct projection of an early-layer neuron is rarely readable: many layers still transform "
                   "what it writes before the unembedding sees it.</p>")
    else:
        out.append("<p>This run has no common neurons.</p>")
    out.append("<h3>Top QR neurons of each group (by accumulated naica)</h3>")
    rows = []
    for g in A.groups(doc):
        for nn, acc in A.top_group_neurons(doc, g, 3):
            rows.append([_esc(g), projs[nn].name, _fmt(acc), *_projection_cells(projs[nn], k)])
    out.append(_table(["group", "neuron", "Σ naica", f"top {k} tokens", "most demoted"], rows,
                      [False, False, True, False, False]))
    return "\n".join(out)


def _evaluation(ev: Mapping[str, Any] | None) -> str:
    if ev is None:
        return ""
    out = ["<h2 id=evaluation>Evaluation</h2>"]
    if "_error" in ev:
        return out[0] + _note(_esc(ev["_error"]))
    pcr: Mapping[str, Any] = ev["pcr"] if isinstance(ev.get("pcr"), Mapping) else {}
    editing: Mapping[str, Any] = ev["editing"] if isinstance(ev.get("editing"), Mapping) else {}
    methods = list(dict.fromkeys([*pcr, *editing]))
    if methods:
        rows = []
        for m in methods:
            r: Mapping[str, Any] = pcr[m] if isinstance(pcr.get(m), Mapping) else {}
            e: Mapping[str, Any] = editing[m] if isinstance(editing.get(m), Mapping) else {}
            rows.append([
                f"<b>{_esc(str(m))}</b>",
                _with_ci(r.get("boost"), r.get("boost_ci")), _with_ci(r.get("suppress"), r.get("suppress_ci")),
                _pair(r.get("boost_related_mean"), r.get("boost_unrelated_mean")),
                _pair(r.get("suppress_related_mean"), r.get("suppress_unrelated_mean")),
                _fmt(e.get("boost"), "{:.1%}"), _fmt(e.get("suppress"), "{:.1%}"), _fmt(r.get("mean_neurons"), "{:.1f}"),
            ])
        out.append(_table(["method", "PCR boost [95% CI]", "PCR suppress [95% CI]", "Δp% boost rel / unrel",
                           "Δp% suppress rel / unrel", "edit boost", "edit suppress", "neurons"], rows,
                          [False] + [True] * 7))
        out.append('<p class="muted">PCR = mean |relative change of p(target)| on the query\'s own prompts / the same '
                   "on an unrelated control query's prompts, after boosting (×2) or suppressing (×0) the neurons. "
                   "Editing: share of wrong prompts made right by boosting, of right prompts made wrong by "
                   "suppressing.</p>")
    per_group = ev.get("per_group")
    if isinstance(per_group, Mapping) and per_group:
        out.append("<h3>PCR per group</h3>")
        ms = list(dict.fromkeys(m for g in per_group.values() if isinstance(g, Mapping)
                                for m in (g.get("pcr") or {})))
        rows = []
        for g, d in per_group.items():
            gp = (d.get("pcr") or {}) if isinstance(d, Mapping) else {}
            rows.append([_esc(str(g))] + [f"{_fmt((gp.get(m) or {}).get('boost'))} / {_fmt((gp.get(m) or {}).get('suppress'))}"
                                          for m in ms])
        out.append(_table(["group"] + [f"{_esc(str(m))}<br><span class=muted>boost / suppress</span>" for m in ms],
                          rows, [False] + [True] * len(ms)))
    for key, title in (("free_form", "Free-form check"), ("neuron_prediction", "Neuron-based prediction")):
        d = ev.get(key)
        if isinstance(d, Mapping) and d:
            out.append(f"<h3>{title}</h3>" + _generic(d))
    if len(out) == 1:
        out.append(_note("evaluation.json holds none of the parts this report knows (pcr, editing, per_group, "
                         "free_form, neuron_prediction)."))
    return "\n".join(out)


def _with_ci(x: Any, ci: Any) -> str:
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return f"{_fmt(x, '{:.2f}')} <span class=muted>[{_fmt(ci[0], '{:.2f}')}, {_fmt(ci[1], '{:.2f}')}]</span>"
    return _fmt(x, "{:.2f}")


def _pair(a: Any, b: Any) -> str:
    if a is None and b is None:
        return "–"
    return f"{_fmt(a, '{:+.1f}')} / {_fmt(b, '{:+.1f}')}"


def _generic(d: Mapping[str, Any]) -> str:
    """Scalars as a key/value list; sub-dicts of scalars as one table (a row each); a sub-dict of such dicts
    (e.g. ``per_group``) as a table of its own; anything deeper or list-valued is left out."""
    scalars = [(k, v) for k, v in d.items() if not isinstance(v, (Mapping, list))]
    flat = {k: v for k, v in d.items() if isinstance(v, Mapping) and v and not _all_maps(v)}
    nested = {k: v for k, v in d.items() if isinstance(v, Mapping) and v and _all_maps(v)}
    out = []
    if scalars:
        out.append(_kv([(_esc(str(k)), _fmt(v)) for k, v in scalars]))
    if flat:
        out.append(_rows_table(flat))
    for k, v in nested.items():
        out.append(f"<h4>{_esc(str(k))}</h4>" + _rows_table(v))
    return "\n".join(out)


def _all_maps(d: Mapping[str, Any]) -> bool:
    return all(isinstance(v, Mapping) for v in d.values())


def _rows_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    cols = list(dict.fromkeys(c for v in rows.values() for c, x in v.items() if not isinstance(x, (Mapping, list))))
    return _table([""] + [_esc(str(c)) for c in cols],
                  [[_esc(str(k))] + [_fmt(v.get(c)) for c in cols] for k, v in rows.items()],
                  [False] + [True] * len(cols))


def _groups_section(doc: Mapping[str, Any], n_layers: int) -> str:
    rows = []
    for r in A.group_summaries(doc, n_layers):
        top = A.top_group_neurons(doc, r["group"], 3)
        rows.append([f"<b>{_esc(r['group'])}</b>", r["n_queries"], _fmt(r["mean_qr_neurons"], "{:.1f}"),
                     r["empty_queries"], r["pooled_neurons"], _fmt(r["peak_layer"]),
                     _fmt(r["accuracy"], "{:.0%}"), _fmt(r["mean_target_prob"], "{:.3f}"),
                     ", ".join(f"{_neuron(*nn)} ({x:.2g})" for nn, x in top) or "–"])
    return ("<h2 id=groups>Groups</h2>" +
            _table(["group", "queries", "QR neurons / query", "queries with none", "distinct neurons",
                    "peak layer", "model accuracy", "mean p(target)", "top neurons (Σ naica)"], rows,
                   [False, True, True, True, True, True, True, True, False]))


def _pick_queries(doc: Mapping[str, Any], n: int) -> list[str]:
    """One query per group first (the first with QR neurons), then more in file order, ``n`` in all."""
    qs = doc["queries"]
    picked: list[str] = []
    for g in A.groups(doc):
        mine = [q for q, e in qs.items() if str(e.get("group", "-")) == g]
        best = next((q for q in mine if A.query_neurons(qs[q])), mine[0] if mine else None)
        if best is not None:
            picked.append(best)
    for q in qs:
        if q not in picked:
            picked.append(q)
    return picked[:n]


def _run_prompts(run_dir: str | Path, doc: Mapping[str, Any], model: Any, ids: Sequence[str], queries: Any,
                 pool: Any) -> tuple[dict[str, Any], str, str]:
    """``(prompts, why none, caveat)``: the shown queries' prompts as the run stored them when it attributed them.

    A run made before prompts were stored (or a hand-made neurons.json) gets them rebuilt from the data,
    with a caveat shown in the report: the views are illustrations, so a flagged rebuild beats none.
    """
    stored = _stored_prompts(run_dir, ids)
    if stored:
        return stored, "", ""
    prompts, why = _rebuild_prompts(doc, model, ids, queries, pool)
    caveat = ("" if why else "this run stores no prompts (made before qrnca-lens stored them), so the views show "
              "prompts rebuilt from the data and the recorded proxy config; they differ from the attributed ones "
              "if the data or the pool changed since")
    return prompts, why, caveat


def _stored_prompts(run_dir: str | Path, ids: Sequence[str]) -> dict[str, Any]:
    """The stored prompts of the shown queries, or {} when the directory holds none (not a store, old run)."""
    from ..locate import prompts_from_info
    from ..store import RunStore

    try:
        store = RunStore.load(run_dir)
        return {q: prompts_from_info(store.read_info(q), q, str(run_dir)) for q in ids}
    except QrncaError:
        return {}


def _rebuild_prompts(doc: Mapping[str, Any], model: Any, ids: Sequence[str], queries: Any, pool: Any) -> tuple[dict[str, Any], str]:
    """The shown queries' prompts, rebuilt as locate built them (recorded proxy config, the given pool)."""
    from ..data import load_data
    from ..models import default_prepend_bos, tokenizer_of
    from ..proxies import ProxyConfig, build_all_prompts

    try:
        if queries is None:
            if not doc.get("data"):
                return {}, "the run records no data spec, so its prompts cannot be rebuilt (pass queries=...)"
            queries = load_data(doc["data"])
        pool = list(pool) if pool is not None else list(queries)
        by_id = {q.id: q for q in queries}
        shown = [by_id[q] for q in ids if q in by_id]
        if not shown:
            return {}, f"none of the shown queries is in {_esc(str(doc.get('data')))}"
        cfg = ProxyConfig.from_dict((doc.get("config") or {}).get("proxy") or {})
        return build_all_prompts(shown, cfg, tokenizer_of(model), pool=pool,
                                 prepend_bos=default_prepend_bos(model)), ""
    except (QrncaError, OSError, KeyError, TypeError) as e:
        return {}, f"the prompts could not be rebuilt ({_esc(str(e))})"


def _queries_section(run_dir: str | Path, doc: Mapping[str, Any], model: Any, ids: Sequence[str], queries: Any,
                     pool: Any, projs: Mapping[A.Neuron, A.VocabProjection]) -> str:
    from ..models import tokenizer_of

    out = [f"<h2 id=queries>Queries ({len(ids)} of {len(doc['queries'])})</h2>"]
    prompts: dict[str, Any] = {}
    if model is None:
        out.append(_note("No model given: the circuitsvis views (activations over the prompt, top tokens, target "
                         "log-probabilities) need a forward pass and are skipped."))
    else:
        prompts, why, caveat = _run_prompts(run_dir, doc, model, ids, queries, pool)
        if why:
            out.append(_note(f"Views skipped: {why}."))
        else:
            if caveat:
                out.append(_note(f"Prompts rebuilt: {caveat}."))
            out.append('<p class="muted">Views: (1) activation (<code>hook_post</code>, the value W_out multiplies) '
                       "of each QR neuron over every token of the query's prompts; pick the neuron in the drop-down. "
                       "(2) the prompt tokens that activate each QR neuron most and least (columns in the order "
                       "listed above them). (3) log p(token | prefix) over the first prompt followed by the answer: "
                       "the answer tokens come last; hover for the model's top guesses.</p>")
    from .views import query_views

    for q in ids:
        e = doc["queries"][q]
        neurons = A.query_neurons(e)
        out.append(f'<div class="query"><h3 id="q-{_esc(q)}">{_esc(q)} <span class=muted>({_esc(str(e.get("group")))})'
                   f"</span></h3>")
        out.append(f'<p>p(target) {_fmt(e.get("target_prob"), "{:.3f}")}, model accuracy on its prompts '
                   f'{_fmt(e.get("accuracy"), "{:.0%}")}, {len(neurons)} QR neurons.</p>')
        rows = [[i, _neuron(a, b), _fmt(x, "{:.4f}"),
                 "".join(_tok(t) for t in projs[(a, b)].tokens[:6]) if (a, b) in projs else "–"]
                for i, (a, b, x) in enumerate(neurons)]
        if rows:
            out.append(_table(["#", "neuron", "naica", "top tokens (projection)"], rows, [True, False, True, False]))
        ps = prompts.get(q)
        if ps:
            tok = tokenizer_of(model)
            answer = tok.decode(list(ps[0].target))
            out.append(f"<pre class=prompt>{_esc(ps[0].text)}<b>{_esc(answer)}</b></pre>")
            views = query_views(model, ps, neurons)
            for key in ("activations", "topk", "target"):
                if key in views:
                    v = views[key]
                    legend = (" <span class=muted>columns: " + ", ".join(f"{i}={_neuron(a, b)}" for i, (a, b, _) in
                                                                          enumerate(neurons)) + "</span>"
                              if key == "topk" else "")
                    out.append(f"<h4>{_esc(v.title)}{legend}</h4>" + v.fragment())
        out.append("</div>")
    return "\n".join(out)


# ---------------------------------------------------------------- the report


def _provenance(manifest: Mapping[str, Any] | None, model: Any) -> str:
    """What the run was measured with (from the manifest) and what drew this report."""
    from ..versions import library_versions, model_identity

    def line(label: str, versions: Mapping[str, Any] | None, identity: Mapping[str, Any] | None) -> str:
        if not versions:
            return f"<li>{label}: not recorded (a run made before qrnca-lens recorded versions)</li>"
        v = ", ".join(f"{k} {val}" for k, val in versions.items())
        ident = ", ".join(f"{k} {val}" for k, val in (identity or {}).items())
        return f"<li>{label}: {_esc(v)}" + (f"; model: {_esc(ident)}" if ident else "") + "</li>"

    m = manifest or {}
    now_identity = model_identity(model) if model is not None else None
    return ('<ul class="sub provenance">' + line("measured with", m.get("versions"), m.get("model_identity"))
            + line("report drawn with", library_versions(), now_identity) + "</ul>")


def _shape(doc: Mapping[str, Any], model: Any, manifest: Mapping[str, Any] | None) -> tuple[tuple[int, int], str]:
    from ..models import d_mlp, n_layers

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


def report_html(
    run_dir: str | Path,
    model: Any = None,
    *,
    queries: Any = None,
    pool: Any = None,
    n_queries: int | None = None,
    k: int = 10,
) -> str:
    """The report as one HTML string; see ``write_report``."""
    from ..versions import PACKAGE_VERSION
    from .views import bundle_js

    doc, ev, manifest = load_run(run_dir)
    shape, shape_note = _shape(doc, model, manifest)
    n_queries = min(6, max(len(A.groups(doc)), 1)) if n_queries is None else n_queries
    shown = _pick_queries(doc, n_queries)
    projs = _projections(doc, model, shown, k) if model is not None else {}
    proxy = ((doc.get("config") or {}).get("proxy") or {}).get("kind", "")
    title = f"QRNCA report: {doc.get('model')} on {doc.get('data')}" + (f" ({proxy})" if proxy else "")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in
                  (("summary", "run"), ("maps", "maps"), ("vocab", "vocabulary"),
                   *((("evaluation", "evaluation"),) if ev is not None else ()), ("groups", "groups"),
                   ("queries", "queries")))
    parts = [
        f"<h1>{_esc(title)}</h1>",
        f'<p class="sub">{_esc(str(Path(run_dir).resolve()))} · generated {stamp} by qrnca-lens {PACKAGE_VERSION}</p>',
        _provenance(manifest, model),
        f"<nav>{nav}</nav>",
        _summary(doc, shape, shape_note),
        _maps(doc, shape),
        _vocab(doc, model, k, projs),
        _evaluation(ev),
        _groups_section(doc, shape[0]),
        _queries_section(run_dir, doc, model, shown, queries, pool, projs),
    ]
    # The circuitsvis bundle goes at the end of <head> only when a view needs it (1.3 MB).
    body = "\n".join(p for p in parts if p)
    bundle = f"<script>{bundle_js()}</script>" if 'class="cv-view"' in body else ""
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_esc(title)}</title><style>{CSS}</style>\n{bundle}\n</head>\n<body><main>\n{body}\n"
            f"</main></body></html>\n")


def write_report(
    run_dir: str | Path,
    model: Any = None,
    *,
    queries: Any = None,
    pool: Any = None,
    n_queries: int | None = None,
    k: int = 10,
    out: str | Path | None = None,
) -> Path:
    """Write ``run_dir/report.html`` (or ``out``): one self-contained, offline HTML file. Returns its path.

    ``model`` (the one the run was made with) enables vocabulary projections and circuitsvis views, shown
    on the prompts the run stored for each query. Only for a run that stores none (made before prompts were
    stored) are they rebuilt, with a note saying so, from ``queries`` (default: ``load_data(doc["data"])``)
    with ``pool`` (default: those queries) and the recorded proxy config.
    ``n_queries`` queries are shown (default: one per group, at most 6); ``k`` tokens per projection.
    """
    text = report_html(run_dir, model, queries=queries, pool=pool, n_queries=n_queries, k=k)
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    # Written atomically, so a browser never opens half a report.
    return write_text_atomic(path, text)
