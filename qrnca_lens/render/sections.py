"""The report's sections: summary, maps, vocabulary projections, evaluation, groups, queries with views."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import QrncaError
from ..evaluation.result import comparison_table
from ..html import esc, html_fmt, html_img, html_kv, html_neuron, html_note, html_table, html_tok
from ..protocols import HookedModel
from ..render import analysis as A

__all__ = ["summary_section", "maps_section", "projection_cells", "neuron_projections", "vocab_section", "evaluation_section", "generic", "all_maps", "rows_table", "groups_section", "pick_queries", "run_prompts", "stored_prompts", "rebuild_prompts", "queries_section"]


def summary_section(doc: Mapping[str, Any], shape: tuple[int, int], shape_note: str) -> str:
    cfg = doc.get("config") or {}
    proxy = cfg.get("proxy") or {}
    ig = cfg.get("ig") or {}
    sel = cfg.get("selection") or {}
    s = A.run_summary(doc)
    shots = proxy.get("n_shots")
    if shots is None and proxy.get("kind"):
        from ..data.prompts import DEFAULT_SHOTS

        shots = DEFAULT_SHOTS.get(proxy["kind"])
    layers = doc.get("layers") or []
    layer_text = (f"{min(layers)}–{max(layers)} ({len(layers)})" if layers and
                  list(layers) == list(range(min(layers), max(layers) + 1)) else esc(str(layers)))
    acc = s["accuracy"]
    pairs = [
        ("model", f"<b>{esc(str(doc.get('model')))}</b> ({shape[0]} layers × {shape[1]} MLP neurons{shape_note})"),
        ("data", esc(str(doc.get("data")))),
        ("proxy", f"{esc(str(proxy.get('kind', '–')))}: |Q| = {html_fmt(proxy.get('n_prompts'))} prompts per query, "
                  f"{html_fmt(shots)} in-context examples, seed {html_fmt(proxy.get('seed'))}"
                  + (", chat template" if proxy.get("chat_template") else "")),
        ("attribution", f"integrated gradients, m = {html_fmt(ig.get('steps'))} steps ({esc(str(ig.get('alpha_schedule', '–')))}), "
                        f"layers {layer_text}" if ig else f"layers {layer_text}"),
        ("selection", ", ".join(f"{k} = {html_fmt(v)}" for k, v in sel.items()) or "–"),
        ("queries", f"{s['n_queries']} in {s['n_groups']} groups"),
        ("QR neurons per query", f"{html_fmt(s['mean_qr_neurons'], '{:.1f}')} on average; "
                                 f"{s['empty_queries']} queries kept none"),
        ("common neurons", f"{s['n_common_neurons']} (found for more than u × N queries; removed from the QR sets)"),
        ("model accuracy on the prompts", f"<b>{html_fmt(acc, '{:.1%}')}</b>, mean target probability "
                                          f"{html_fmt(s['mean_target_prob'], '{:.3f}')}"),
    ]
    honest = ("Accuracy is the share of the attributed prompts on which the unmodified model's prediction was the "
              "target (cloze: top-1 first answer token; MCQA: best-scoring option), recorded at locate time on the "
              "very prompts whose neurons were attributed. It is a competence check of the model on this proxy, not "
              "a held-out benchmark and not a measure of the neurons; QR neurons of prompts the model gets wrong "
              "explain a wrong or unsure answer.")
    return "<h2 id=summary>Run</h2>" + html_kv(pairs) + f'<p class="muted">{honest}</p>'


def maps_section(doc: Mapping[str, Any], shape: tuple[int, int]) -> str:
    from .figures import heatmap_figure, layer_distribution_figure, overlap_figure, png_bytes

    n_layers, d_mlp = shape
    gs = A.groups(doc)
    out = ["<h2 id=maps>Maps</h2>"]
    maps = {g: A.heatmap(doc, n_layers, d_mlp, group=g) for g in gs}
    if len(gs) > 1:
        maps = {"all groups": A.heatmap(doc, n_layers, d_mlp), **maps}
    out.append("<h3>Where the QR neurons are (accumulated naica, per group)</h3>")
    out.append(html_img(png_bytes(heatmap_figure(maps)), "geographical heatmaps of QR neurons"))
    out.append('<p class="muted">Each cell sums naica over the group\'s queries and over a bin of adjacent '
               "neurons; each panel is scaled to its own maximum (square-root brightness). Layer 0 is at the bottom."
               "</p>")
    dist = A.layer_distribution(doc, n_layers)
    out.append("<h3>Layer distribution (distinct QR neurons per layer)</h3>")
    out.append(html_img(png_bytes(layer_distribution_figure(dist)), "layer distribution of QR neurons"))
    if len(gs) > 1:
        names, m = A.overlap_matrix(doc)
        out.append("<h3>Overlap between groups</h3>")
        out.append(html_img(png_bytes(overlap_figure(names, m)), "overlap matrix"))
        out.append('<p class="muted">Overlap rate of groups A and B = |A ∩ B| / |A ∪ B|, A and B being the pooled '
                   "(union over queries) QR neurons of each group.</p>")
    shared = A.most_shared_neurons(doc, 10, min_groups=2)
    if shared:
        out.append("<h3>QR neurons shared by several groups</h3>")
        out.append(html_table(["neuron", "groups", "queries"],
                          [[html_neuron(*nn), g, q] for nn, g, q in shared], [False, True, True]))
    return "\n".join(out)


def projection_cells(p: A.VocabProjection, k: int) -> list[str]:
    return ["".join(html_tok(t) for t in p.tokens[:k]), "".join(html_tok(t) for t in p.bottom_tokens[:max(3, k // 2)])]


def neuron_projections(doc: Mapping[str, Any], model: HookedModel, shown: Sequence[str], k: int) -> dict[A.Neuron, A.VocabProjection]:
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


def vocab_section(doc: Mapping[str, Any], model: HookedModel | None, k: int, projs: Mapping[A.Neuron, A.VocabProjection]) -> str:
    out = ["<h2 id=vocab>Vocabulary projections</h2>"]
    common = [(int(a), int(b)) for a, b in doc.get("common_neurons") or []]
    if model is None:
        out.append(html_note("No model given: vocabulary projections need its weights (W_out, W_U). "
                         "Rerun with a model (<code>qrnca-lens report DIR</code> loads the run's model)."))
        if common:
            out.append("<p>Common neurons: " + ", ".join(html_neuron(*c) for c in common) + "</p>")
        return "\n".join(out)
    out.append('<p class="muted">Top tokens of W_out[l, i] · diag(post-MLP norm gain, where blocks have one) · '
               "diag(final-norm gain) · W_U: what the neuron writes into the residual stream promotes (and, right "
               "column, demotes) these tokens. Weights only, no forward pass. ␣ marks a leading space.</p>")
    out.append("<h3>Common neurons</h3>")
    if common:
        out.append(html_table(["neuron", f"top {k} tokens", "most demoted"],
                          [[projs[c].name, *projection_cells(projs[c], k)] for c in common[:_MAX_COMMON]]))
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
            rows.append([esc(g), projs[nn].name, html_fmt(acc), *projection_cells(projs[nn], k)])
    out.append(html_table(["group", "neuron", "Σ naica", f"top {k} tokens", "most demoted"], rows,
                      [False, False, True, False, False]))
    return "\n".join(out)


def evaluation_section(ev: Mapping[str, Any] | None) -> str:
    if ev is None:
        return ""
    out = ["<h2 id=evaluation>Evaluation</h2>"]
    if "_error" in ev:
        return out[0] + html_note(esc(ev["_error"]))
    from ..evaluation.result import EvaluationResult

    known = {k: ev[k] for k in EvaluationResult.__dataclass_fields__ if isinstance(ev.get(k), Mapping)}
    try:
        table = comparison_table(EvaluationResult(**{"pcr": {}, "editing": {}, "per_group": {}, **known}))
    except QrncaError as e:  # a hand-edited or foreign file: the other parts are still shown
        table = ""
        out.append(html_note(f"The comparison table cannot be drawn from evaluation.json: {esc(str(e))}"))
    if table:
        out.append(table)
        out.append('<p class="muted">One row per locator. PCR = mean |relative change of p(target)| on the query\'s '
                   "own prompts / the same on an unrelated control query's prompts, after boosting (×2) or "
                   "suppressing (×0) the neurons, with 95% bootstrap intervals. Editing: share of wrong prompts made "
                   "right by boosting, of right prompts made wrong by suppressing. Free-form drop: log-likelihood "
                   "drop of the answer when the neurons are zeroed at every position. GT: agreement with exact "
                   "single-neuron zero-ablation (precision / recall at k, Spearman ρ, false-negative rate). Content "
                   "share: of a boost's rise on re-lettered options, the share that follows the content (1) rather "
                   "than the letter (0). s/query: seconds per query on the measuring machine.</p>")
    per_group = ev.get("per_group")
    if isinstance(per_group, Mapping) and per_group:
        out.append("<h3>PCR per group</h3>")
        ms = list(dict.fromkeys(m for g in per_group.values() if isinstance(g, Mapping)
                                for m in (g.get("pcr") or {})))
        rows = []
        for g, d in per_group.items():
            gp = (d.get("pcr") or {}) if isinstance(d, Mapping) else {}
            rows.append([esc(str(g))] + [f"{html_fmt((gp.get(m) or {}).get('boost'))} / {html_fmt((gp.get(m) or {}).get('suppress'))}"
                                          for m in ms])
        out.append(html_table(["group"] + [f"{esc(str(m))}<br><span class=muted>boost / suppress</span>" for m in ms],
                          rows, [False] + [True] * len(ms)))
    for key, title in (("free_form", "Free-form check"), ("neuron_prediction", "Neuron-based prediction")):
        d = ev.get(key)
        if isinstance(d, Mapping) and d:
            out.append(f"<h3>{title}</h3>" + generic(d))
    if len(out) == 1:
        out.append(html_note("evaluation.json holds none of the parts this report knows (pcr, editing, per_group, "
                         "free_form, neuron_prediction)."))
    return "\n".join(out)


def generic(d: Mapping[str, Any]) -> str:
    """Scalars as a key/value list; sub-dicts of scalars as one table (a row each); a sub-dict of such dicts
    (e.g. ``per_group``) as a table of its own; anything deeper or list-valued is left out."""
    scalars = [(k, v) for k, v in d.items() if not isinstance(v, (Mapping, list))]
    flat = {k: v for k, v in d.items() if isinstance(v, Mapping) and v and not all_maps(v)}
    nested = {k: v for k, v in d.items() if isinstance(v, Mapping) and v and all_maps(v)}
    out = []
    if scalars:
        out.append(html_kv([(esc(str(k)), html_fmt(v)) for k, v in scalars]))
    if flat:
        out.append(rows_table(flat))
    for k, v in nested.items():
        out.append(f"<h4>{esc(str(k))}</h4>" + rows_table(v))
    return "\n".join(out)


def all_maps(d: Mapping[str, Any]) -> bool:
    return all(isinstance(v, Mapping) for v in d.values())


def rows_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    cols = list(dict.fromkeys(c for v in rows.values() for c, x in v.items() if not isinstance(x, (Mapping, list))))
    return html_table([""] + [esc(str(c)) for c in cols],
                  [[esc(str(k))] + [html_fmt(v.get(c)) for c in cols] for k, v in rows.items()],
                  [False] + [True] * len(cols))


def groups_section(doc: Mapping[str, Any], n_layers: int) -> str:
    rows = []
    for r in A.group_summaries(doc, n_layers):
        top = A.top_group_neurons(doc, r["group"], 3)
        rows.append([f"<b>{esc(r['group'])}</b>", r["n_queries"], html_fmt(r["mean_qr_neurons"], "{:.1f}"),
                     r["empty_queries"], r["pooled_neurons"], html_fmt(r["peak_layer"]),
                     html_fmt(r["accuracy"], "{:.0%}"), html_fmt(r["mean_target_prob"], "{:.3f}"),
                     ", ".join(f"{html_neuron(*nn)} ({x:.2g})" for nn, x in top) or "–"])
    return ("<h2 id=groups>Groups</h2>" +
            html_table(["group", "queries", "QR neurons / query", "queries with none", "distinct neurons",
                    "peak layer", "model accuracy", "mean p(target)", "top neurons (Σ naica)"], rows,
                   [False, True, True, True, True, True, True, True, False]))


def pick_queries(doc: Mapping[str, Any], n: int) -> list[str]:
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


def run_prompts(run_dir: str | Path | Any, doc: Mapping[str, Any], model: HookedModel, ids: Sequence[str], queries: Any,
                 pool: Any) -> tuple[dict[str, Any], str, str]:
    """``(prompts, why none, caveat)``: the shown queries' prompts as the run stored them when it attributed them.

    A run made before prompts were stored (or a hand-made neurons.json) gets them rebuilt from the data,
    with a caveat shown in the report: the views are illustrations, so a flagged rebuild beats none.
    """
    stored = stored_prompts(run_dir, ids)
    if stored:
        return stored, "", ""
    prompts, why = rebuild_prompts(doc, model, ids, queries, pool)
    caveat = ("" if why else "this run stores no prompts (made before qrnca-lens stored them), so the views show "
              "prompts rebuilt from the data and the recorded proxy config; they differ from the attributed ones "
              "if the data or the pool changed since")
    return prompts, why, caveat


def stored_prompts(run_dir: str | Path | Any, ids: Sequence[str]) -> dict[str, Any]:
    """The stored prompts of the shown queries, or {} when there are none (not a store, old run).

    ``run_dir`` is the run directory, or a result in memory that stores its prompts (``LocateResult``).
    """
    from ..qrnca.locate import prompts_from_info
    from ..qrnca.store import RunStore

    if not isinstance(run_dir, (str, Path)):
        read = getattr(run_dir, "stored_prompts", None)
        try:
            return read(ids) if callable(read) else {}
        except QrncaError:  # a result made before prompts were stored
            return {}
    try:
        store = RunStore.load(run_dir)
        return {q: prompts_from_info(store.read_info(q), q, str(run_dir)) for q in ids}
    except QrncaError:
        return {}


def rebuild_prompts(doc: Mapping[str, Any], model: HookedModel, ids: Sequence[str], queries: Any, pool: Any) -> tuple[dict[str, Any], str]:
    """The shown queries' prompts, rebuilt as locate built them (recorded proxy config, the given pool)."""
    from ..data.prompts import ProxyConfig, build_all_prompts
    from ..data.queries import load_data
    from ..model.access import default_prepend_bos, tokenizer_of

    try:
        if queries is None:
            if not doc.get("data"):
                return {}, "the run records no data spec, so its prompts cannot be rebuilt (pass queries=...)"
            queries = load_data(doc["data"])
        pool = list(pool) if pool is not None else list(queries)
        by_id = {q.id: q for q in queries}
        shown = [by_id[q] for q in ids if q in by_id]
        if not shown:
            return {}, f"none of the shown queries is in {esc(str(doc.get('data')))}"
        cfg = ProxyConfig.from_dict((doc.get("config") or {}).get("proxy") or {})
        return build_all_prompts(shown, cfg, tokenizer_of(model), pool=pool,
                                 prepend_bos=default_prepend_bos(model)), ""
    except (QrncaError, OSError, KeyError, TypeError) as e:
        return {}, f"the prompts could not be rebuilt ({esc(str(e))})"


def queries_section(run_dir: str | Path | Any, doc: Mapping[str, Any], model: HookedModel | None, ids: Sequence[str], queries: Any,
                     pool: Any, projs: Mapping[A.Neuron, A.VocabProjection]) -> str:
    from ..model.access import tokenizer_of

    out = [f"<h2 id=queries>Queries ({len(ids)} of {len(doc['queries'])})</h2>"]
    prompts: dict[str, Any] = {}
    if model is None:
        out.append(html_note("No model given: the circuitsvis views (activations over the prompt, top tokens, target "
                         "log-probabilities) need a forward pass and are skipped."))
    else:
        prompts, why, caveat = run_prompts(run_dir, doc, model, ids, queries, pool)
        if why:
            out.append(html_note(f"Views skipped: {why}."))
        else:
            if caveat:
                out.append(html_note(f"Prompts rebuilt: {caveat}."))
            out.append('<p class="muted">Views: (1) activation (<code>hook_post</code>, the value W_out multiplies) '
                       "of each QR neuron over every token of the query's prompts; pick the neuron in the drop-down. "
                       "(2) the prompt tokens that activate each QR neuron most and least (columns in the order "
                       "listed above them). (3) log p(token | prefix) over the first prompt followed by the answer: "
                       "the answer tokens come last; hover for the model's top guesses.</p>")
    from .views import query_views

    for q in ids:
        e = doc["queries"][q]
        neurons = A.query_neurons(e)
        out.append(f'<div class="query"><h3 id="q-{esc(q)}">{esc(q)} <span class=muted>({esc(str(e.get("group")))})'
                   f"</span></h3>")
        out.append(f'<p>p(target) {html_fmt(e.get("target_prob"), "{:.3f}")}, model accuracy on its prompts '
                   f'{html_fmt(e.get("accuracy"), "{:.0%}")}, {len(neurons)} QR neurons.</p>')
        rows = [[i, html_neuron(a, b), html_fmt(x, "{:.4f}"),
                 "".join(html_tok(t) for t in projs[(a, b)].tokens[:6]) if (a, b) in projs else "–"]
                for i, (a, b, x) in enumerate(neurons)]
        if rows:
            out.append(html_table(["#", "neuron", "naica", "top tokens (projection)"], rows, [True, False, True, False]))
        ps = prompts.get(q)
        if ps and model is not None:  # prompts are only run with a model
            tok = tokenizer_of(model)
            answer = tok.decode(list(ps[0].target))
            out.append(f"<pre class=prompt>{esc(ps[0].text)}<b>{esc(answer)}</b></pre>")
            views = query_views(model, ps, neurons)
            for key in ("activations", "topk", "target"):
                if key in views:
                    v = views[key]
                    legend = (" <span class=muted>columns: " + ", ".join(f"{i}={html_neuron(a, b)}" for i, (a, b, _) in
                                                                          enumerate(neurons)) + "</span>"
                              if key == "topk" else "")
                    out.append(f"<h4>{esc(v.title)}{legend}</h4>" + v.fragment())
        out.append("</div>")
    return "\n".join(out)
