"""render/: PNG figures, offline circuitsvis views, and the one-file report (also opened in headless Chromium)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from qrnca_lens.render import analysis as A
from qrnca_lens.data.queries import load_data
from qrnca_lens.errors import QrncaError
from qrnca_lens.data.prompts import ProxyConfig, build_prompts
from qrnca_lens.render import figures as F
from qrnca_lens.render import views as V
from qrnca_lens.cli.commands import cmd_report
from qrnca_lens.render.report import report_html, write_report

from test_analysis import DOC

# What a browser would fetch: a src/href/url(...) to the network, or the package hosts circuitsvis links to.
_FETCH = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//|@import""", re.I)
_HOSTS = re.compile(r"cdn|unpkg|jsdelivr", re.I)


def _external_refs(html: str) -> list[str]:
    # Base64 image data can spell "cdn" by chance; it fetches nothing, so it is left out of the search.
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:", html)
    return [m.group(0) for m in _FETCH.finditer(text)] + [m.group(0) for m in _HOSTS.finditer(text)]


def _is_png(b: bytes) -> bool:
    return b[:8] == F.PNG_SIGNATURE and len(b) > 1000


# ---------------------------------------------------------------- figures


def test_heatmap_figure_bins_1536_neurons_into_visible_columns():
    doc = {"layers": list(range(30)), "queries": {
        "q1": {"group": "g", "qr_neurons": [[3, 1535, 0.7], [20, 0, 0.2]]},
        "q2": {"group": "h", "qr_neurons": [[29, 800, 1.0]]}}}
    maps = {g: A.heatmap(doc, 30, 1536, group=g) for g in A.groups(doc)}
    fig = F.heatmap_figure(maps, n_bins=192)
    img = fig.axes[0].images[0].get_array()
    assert img.shape == (30, 192) and img[3, 191] == pytest.approx(0.7)
    assert "max Σnaica 0.7" in fig.axes[0].get_title(loc="left")
    assert _is_png(F.png_bytes(fig))


def test_layer_distribution_and_overlap_figures_are_png():
    fig = F.layer_distribution_figure(A.layer_distribution(DOC, 3))
    titles = [ax.get_title(loc="left") for ax in fig.axes if ax.get_visible()]
    assert titles == ["all groups (5)", "A (3)", "B (2)", "C (0)"]
    assert _is_png(F.png_bytes(fig))
    names, m = A.overlap_matrix(DOC)  # C's self-overlap is NaN: drawn as a dash
    fig = F.overlap_figure(names, m)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["1.00", "0.25", "0.00", "0.25", "1.00", "0.00", "0.00", "0.00", "–"]
    assert _is_png(F.png_bytes(fig))


# ---------------------------------------------------------------- views


def test_bundle_is_inlinable_and_offline():
    js = V.bundle_js()
    assert "var CircuitsVis" in js and len(js) > 100_000
    assert not re.search(r"</script", js, re.I) and "sourceMappingURL" not in js


def test_view_html_is_offline_and_well_formed(tmp_path):
    tokens = [["The", " cat", "</s>"], ["A", " dog"]]
    acts = [np.array([[0.1, 1.0], [0.5, -0.2], [0.0, 0.3]]), np.array([[1.0, 0.0], [0.2, 0.4]])]
    view = V.activations_view(tokens, acts, ["L0.N1", "L2.N5"], title="acts")
    assert view.element == "TextNeuronActivations" and view.call.startswith(f'CircuitsVis.render("{view.uuid}"')
    frag = view.fragment()
    assert f'<div class="cv-view" id="{view.uuid}"></div>' in frag  # closed, unlike circuitsvis's <div .../>
    assert "</s>" not in frag and "<\\/s>" in frag  # a token cannot end the script element
    assert '"L2.N5"' in view.call
    path = view.save(tmp_path / "v.html")
    page = path.read_text()
    assert page.count("var CircuitsVis") == 1 and _external_refs(page) == []
    top = V.topk_view(tokens, acts, k=2, sample_labels=["p0", "p1"])
    assert top.element == "TopkTokens" and '"p1"' in top.call


def test_neuron_activations_read_hook_post_through_the_door(tiny_gated):
    from qrnca_lens.model.hooks import active_hook_count, capture, hooked

    ids = [[5, 17, 40, 2], [9, 9, 100]]
    neurons = [(2, 7), (0, 3), (2, 40)]
    before = active_hook_count(tiny_gated)
    acts = V.neuron_activations(tiny_gated, ids, neurons)
    assert active_hook_count(tiny_gated) == before
    assert [a.shape for a in acts] == [(4, 3), (3, 3)]
    store: dict[str, torch.Tensor] = {}
    names = ["blocks.0.mlp.hook_post", "blocks.2.mlp.hook_post"]
    with torch.no_grad(), hooked(tiny_gated, fwd=[(n, capture(store, n)) for n in names]):
        tiny_gated(torch.tensor([ids[0]]))
    np.testing.assert_allclose(acts[0][:, 0], store[names[1]][0, :, 7].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acts[0][:, 1], store[names[0]][0, :, 3].numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(QrncaError, match="which"):
        V.neuron_activations(tiny_gated, ids, neurons, which="pre")


def test_query_views_on_a_tiny_model(tiny_gated):
    pool = load_data("builtin:facts")
    prompts = build_prompts(pool[0], ProxyConfig("cloze", n_prompts=2, n_shots=1), tiny_gated.tokenizer, pool=pool)
    views = V.query_views(tiny_gated, prompts, [(1, 4), (2, 30)])
    assert {k: v.element for k, v in views.items()} == {
        "activations": "TextNeuronActivations", "topk": "TopkTokens", "target": "TokenLogProbs"}
    assert list(V.query_views(tiny_gated, prompts, [])) == ["target"]


def test_views_display_themselves_in_a_notebook_with_the_bundle_gzipped():
    import base64
    import gzip

    tokens = [["The", " cat"], ["A", " dog"]]
    acts = [np.array([[0.1, 1.0], [0.5, -0.2]]), np.array([[1.0, 0.0], [0.2, 0.4]])]
    view = V.activations_view(tokens, acts, ["L0.N1", "L2.N5"], title="acts")
    html = view._repr_html_()
    # The view's render call on a fresh element id (a second display draws a second time), the bundle once.
    ids = re.findall(r'<div class="cv-view" id="([^"]+)"></div>', html)
    assert len(ids) == 1 and ids[0].startswith(view.uuid + "-") and f'CircuitsVis.render("{ids[0]}"' in html
    assert ids[0] not in view._repr_html_()
    data = re.search(r'atob\("([A-Za-z0-9+/=]+)"\)', html).group(1)
    assert gzip.decompress(base64.b64decode(data)).decode("utf-8") == V.bundle_js()
    assert len(html) < 0.45 * len(V.bundle_js())
    assert _external_refs(html.replace(data, "")) == []  # base64 can spell "cdn" by chance; it fetches nothing
    assert "<b>acts</b>" in html


def test_query_views_display_all_three_with_one_bundle(tiny_gated):
    pool = load_data("builtin:facts")
    prompts = build_prompts(pool[0], ProxyConfig("cloze", n_prompts=2, n_shots=1), tiny_gated.tokenizer, pool=pool)
    views = V.query_views(tiny_gated, prompts, [(1, 4), (2, 30)])
    assert isinstance(views, V.Views) and isinstance(views, dict)
    html = views._repr_html_()
    assert html.count("atob(") == 1 and html.count('class="cv-view"') == 3
    for element in ("TextNeuronActivations", "TopkTokens", "TokenLogProbs"):
        assert f"CircuitsVis.{element}," in html
    assert "atob(" in V.query_views(tiny_gated, prompts, [])._repr_html_()


NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed")
def test_the_notebook_loader_unpacks_the_bundle_once(tmp_path):
    """The loader in node with a stand-in DOM: the gzipped bundle unpacks into a global CircuitsVis, once."""
    draw = "console.log('drawn', typeof CircuitsVis.render, typeof CircuitsVis.TextNeuronActivations);"
    stub = r"""
function stub() {
  var store = {}, f = function () { return stub(); };
  return new Proxy(f, {get: function (t, k) { return k in store ? store[k] : k === Symbol.toPrimitive ?
      function () { return ""; } : stub(); }, set: function (t, k, v) { store[k] = v; return true; }});
}
globalThis.window = globalThis; globalThis.self = globalThis; globalThis.document = stub();
var head = stub(), scripts = 0;
// Like a browser running an inserted <script>: a script's top-level var is a global.
head.appendChild = function (s) { scripts++; require("vm").runInThisContext(s.textContent); };
document.head = head;
document.getElementById = function (id) { return {set textContent(v) { console.log("ERR", id, v); }}; };
"""
    js = V.loader_js(draw, ["x"])
    (tmp_path / "loader.js").write_text(stub + js + "\n" + js + "\nsetTimeout(function () { console.log('scripts', scripts); }, 500);")
    out = subprocess.run([NODE, str(tmp_path / "loader.js")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["drawn function function", "drawn function function", "scripts 1"], out.stdout


# ---------------------------------------------------------------- the report

FACT_IDS = {"capital": ["capital-01", "capital-02"], "language": ["language-01"], "color": ["color-01"]}
EVALUATION = {
    "pcr": {"qrnca": {"boost": 3.2, "suppress": 4.5, "boost_ci": [1.1, 6.0], "suppress_ci": [2.0, 9.9],
                      "boost_related_mean": 12.0, "boost_unrelated_mean": -3.0, "mean_neurons": 4.0},
            "random": {"boost": 0.9, "suppress": None}},
    "editing": {"qrnca": {"boost": 0.25, "suppress": 0.5}, "kn": {"boost": 0.0}},
    "per_group": {"capital": {"pcr": {"qrnca": {"boost": 2.0, "suppress": 3.0}}}, "color": "not a dict"},
    "free_form": {"intervention": "suppress", "drop_ratio": 2.5, "qrnca": {"loglik_drop": 1.5}},
    "neuron_prediction": {"neuron_accuracy": 0.4, "per_group": {"capital": {"neuron": 0.5, "n": 2}}},
    "unknown_part": [1, 2, 3],
}


def _tiny_run(tmp_path, evaluation=None):
    """A synthetic neurons.json shaped like the tiny Llama (3 layers x 48 neurons) on real built-in query ids."""
    rng = np.random.default_rng(0)
    queries = {}
    for g, ids in FACT_IDS.items():
        for q in ids:
            picks = rng.choice(3 * 48, size=4, replace=False)
            queries[q] = {"group": g, "qr_neurons": [[int(p // 48), int(p % 48), float(1 / (i + 1))]
                                                     for i, p in enumerate(picks)],
                          "target_prob": 0.1, "accuracy": 0.5}
    queries["capital-02"]["qr_neurons"].append([1, 4, 0.05])
    queries["language-01"]["qr_neurons"].append([1, 4, 0.05])  # shared by two groups
    proxy = ProxyConfig("cloze", n_prompts=2, n_shots=1, prepend_bos=False).to_dict()
    doc = {"config": {"proxy": proxy, "ig": {"steps": 4, "alpha_schedule": "riemann"},
                      "selection": {"t": 0.2, "u": 0.3, "v": 5}},
           "model": "tiny", "data": "builtin:facts", "layers": [0, 1, 2], "common_neurons": [[2, 47], [0, 0]],
           "queries": queries,
           "summary": {"n_queries": 4, "mean_qr_neurons": 4.5, "accuracy": 0.5, "mean_target_prob": 0.1}}
    (tmp_path / "neurons.json").write_text(json.dumps(doc))
    (tmp_path / "manifest.json").write_text(json.dumps({"model_shape": [3, 48]}))
    if evaluation is not None:
        (tmp_path / "evaluation.json").write_text(json.dumps(evaluation))
    return tmp_path


def test_report_without_model_skips_views_with_a_note(tmp_path):
    run = _tiny_run(tmp_path)
    html = report_html(run)
    assert _external_refs(html) == []
    assert "No model given" in html and 'class="cv-view"' not in html and "var CircuitsVis" not in html
    assert html.count("data:image/png;base64,") == 3  # heatmaps, layer distribution, overlap
    assert "3 layers × 48 MLP neurons" in html and "model accuracy on the prompts" in html
    assert "L1.N4" in html  # the neuron shared by two groups is listed
    assert "id=evaluation" not in html  # no evaluation.json: no section


def test_report_with_tiny_model_is_one_offline_file(tmp_path, tiny_gated):
    run = _tiny_run(tmp_path, EVALUATION)
    path = write_report(run, tiny_gated, n_queries=2)
    assert path == run / "report.html"
    html = path.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert _external_refs(html) == []
    assert not re.search(r"<(?:script|link|img|iframe)[^>]*\s(?:src|href)=\"(?!data:)", html)
    assert html.count("var CircuitsVis") == 1  # the bundle once, not once per view
    for element in ("TextNeuronActivations", "TopkTokens", "TokenLogProbs"):
        assert html.count(f"CircuitsVis.{element}") == 2  # one of each for both shown queries
    assert html.count('class="cv-view"') == 6
    # Evaluation: rows = methods, PCR with its interval, editing rates; odd parts skipped, not fatal.
    assert "3.20 <span class=muted>[1.10, 6.00]</span>" in html and "25.0%" in html
    assert "<b>kn</b>" in html and "<b>random</b>" in html and "drop_ratio" in html
    assert "<h4>per_group</h4>" in html and "neuron_accuracy" in html
    assert "Vocabulary projections" in html and "No model given" not in html
    assert "capital-01" in html and "language-01" in html


def test_report_needs_a_model_of_the_run_shape(tmp_path, tiny_gated):
    run = _tiny_run(tmp_path)
    doc = json.loads((run / "neurons.json").read_text())
    doc["queries"]["capital-01"]["qr_neurons"].append([2, 60, 0.1])
    (run / "neurons.json").write_text(json.dumps(doc))
    with pytest.raises(QrncaError, match="outside the given model"):
        report_html(run, tiny_gated)


def test_report_of_a_directory_without_neurons_json(tmp_path):
    with pytest.raises(QrncaError, match="qrnca-lens locate"):
        write_report(tmp_path)


def test_report_notes_prompts_it_cannot_rebuild(tmp_path, tiny_gated):
    run = _tiny_run(tmp_path)
    doc = json.loads((run / "neurons.json").read_text())
    doc["data"] = str(tmp_path / "gone.jsonl")
    (run / "neurons.json").write_text(json.dumps(doc))
    html = report_html(run, tiny_gated)
    assert "Views skipped" in html and 'class="cv-view"' not in html


def test_report_shows_the_prompts_the_run_stored_after_the_data_is_gone(tmp_path, tiny_gated):
    import html as html_mod

    from qrnca_lens.qrnca.ig import IGConfig
    from qrnca_lens.data.queries import limit_per_group
    from qrnca_lens.qrnca.locate import LocateConfig, locate

    facts = [q for q in limit_per_group(load_data("builtin:facts"), 4) if q.group in ("capital", "color")]
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"id": q.id, "group": q.group, "question": q.question, "answer": q.answer})
                            + "\n" for q in facts))
    out = tmp_path / "run"
    cfg = LocateConfig(ProxyConfig("cloze", n_prompts=2, n_shots=2), IGConfig(steps=4))
    run = locate(tiny_gated, load_data(data), cfg, out=out, progress=False, name="tiny", data=str(data))
    data.unlink()
    html = report_html(out, tiny_gated, n_queries=2)
    assert "Views skipped" not in html and "Prompts rebuilt" not in html and 'class="cv-view"' in html
    for q in run.groups:
        if f'id="q-{q}"' in html:  # a shown query: its first stored prompt is printed
            assert html_mod.escape(run.stored_prompts([q])[q][0].text) in html


def test_report_flags_prompts_it_had_to_rebuild(tmp_path, tiny_gated):
    """A run that stores no prompts (older qrnca-lens, hand-made): views on rebuilt prompts, clearly flagged."""
    html = report_html(_tiny_run(tmp_path), tiny_gated, n_queries=1)
    assert "Prompts rebuilt" in html and 'class="cv-view"' in html


def test_cmd_report_loads_the_runs_model(tmp_path, tiny_gated, monkeypatch, capsys):
    import qrnca_lens.model.loading as models

    asked = []
    monkeypatch.setattr(models, "load_model", lambda name, **kw: asked.append(name) or tiny_gated)
    run = _tiny_run(tmp_path)
    assert cmd_report(argparse.Namespace(out=str(run), model=None)) == 0
    assert asked == ["tiny"] and "report.html" in capsys.readouterr().out
    assert cmd_report(argparse.Namespace(out=str(run), model="other")) == 0
    assert asked == ["tiny", "other"]


# ---------------------------------------------------------------- in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_report_opens_in_headless_chromium(tmp_path, tiny_gated):
    (tmp_path / "run").mkdir()
    run = _tiny_run(tmp_path / "run", EVALUATION)
    report = write_report(run, tiny_gated, n_queries=1)
    shot = tmp_path / "shot.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", report.as_uri())
    assert shot.exists() and shot.read_bytes()[:8] == F.PNG_SIGNATURE and shot.stat().st_size > 20_000
    # The views are drawn by circuitsvis's inlined JavaScript: after it ran, their containers are not empty.
    dom = _chromium(tmp_path, "--dump-dom", "--virtual-time-budget=5000", report.as_uri()).stdout
    filled = re.findall(r'<div class="cv-view" id="[^"]+">\s*<', dom)
    assert len(filled) == 3, dom[:2000]


# ---------------------------------------------------------------- grouped by language, with competence


def _lang_run(tmp_path, evaluation=None):
    from test_grouping import LANG_DOC, RECORD

    run = tmp_path / "run"
    run.mkdir()
    (run / "neurons.json").write_text(json.dumps(LANG_DOC))
    (run / "manifest.json").write_text(json.dumps({"model_shape": [3, 8]}))
    (tmp_path / "accuracy.json").write_text(json.dumps(RECORD))  # where `qrnca-lens demo` writes it
    if evaluation is not None:
        (run / "evaluation.json").write_text(json.dumps(evaluation))
    return run


def test_report_shows_language_maps_and_marks_groups_at_chance(tmp_path, monkeypatch):
    drawn = {}
    for name in ("heatmap_figure", "layer_distribution_figure"):
        real = getattr(F, name)
        monkeypatch.setattr(F, name, lambda d, *a, real=real, name=name, **k: drawn.setdefault(name, list(d)) and real(d, *a, **k))
    real_overlap = F.overlap_figure
    monkeypatch.setattr(F, "overlap_figure", lambda names, m, **k: drawn.setdefault("overlap", list(names)) and real_overlap(names, m, **k))
    ev = {"pcr": {}, "meta": {"group_by": "language"},
          "per_group": {"en": {"pcr": {"qrnca": {"boost": 1.5, "suppress": 2.5}}},
                        "fr": {"pcr": {"qrnca": {"boost": 3.5, "suppress": 4.5}}}}}
    html = report_html(_lang_run(tmp_path, ev))  # the run recorded group_by="language"
    assert "id=group-maps>Language maps" in html and 'href="#group-maps">by language' in html
    # en's competence is 0.25 over 20 prompts at chance 0.25: marked everywhere; fr (0.75 over 40) is not.
    assert "<b>en (at chance)</b>" in html and "fr (at chance)" not in html and "<b>fr</b>" in html
    assert drawn["heatmap_figure"] == ["all groups", "en (at chance)", "fr"]
    assert drawn["layer_distribution_figure"] == ["en (at chance)", "fr"]
    assert drawn["overlap"] == ["en (at chance)", "fr"]
    # Table 3 and specificity by hand (see test_grouping.LANG_DOC): en 2.0 and fr 1.5 QR neurons per query, each
    # with 3 distinct neurons, 2 of them only in that language, 1 in both; competence 25.0% and 75.0%.
    row = re.search(r"<tr><td><b>en \(at chance\)</b></td>(.*?)</tr>", html).group(1)
    cells = re.findall(r"<td class=num>(.*?)</td>", row)
    assert cells[:9] == ["2", "2.0", "3", "2 (67%)", "1 (33%)", "25.0%", "25.0%", "44.4%", "20"]
    fr = re.findall(r"<td class=num>(.*?)</td>", re.search(r"<tr><td><b>fr</b></td>(.*?)</tr>", html).group(1))
    assert fr[:7] == ["2", "1.5", "3", "2 (67%)", "1 (33%)", "75.0%", "25.0%"]
    assert "<td>en (at chance)</td><td class=num>1.5 / 2.5</td>" in html  # evaluation per language, marked too
    assert "accuracy.json" in html and "chance + 2 binomial standard errors" in html


def test_report_regroups_a_stored_run_by_another_field(tmp_path):
    ev = {"pcr": {}, "meta": {"group_by": "language"}, "per_group": {"en": {"pcr": {}}}}
    run = _lang_run(tmp_path, ev)
    html = report_html(run, group_by="relation")
    assert "Relation maps" in html  # capital 0.55 and color 0.60: above the margin, not marked
    assert "capital (at chance)" not in html and "color (at chance)" not in html
    assert "<b>capital</b>" in html and "<b>color</b>" in html
    assert "evaluation.json grouped its per-group numbers" in html  # judged by language, shown by relation
    by_group = report_html(run, group_by="group")
    assert "Group maps" in by_group and "<b>capital-en (at chance)</b>" in by_group  # 0.2 over 10 prompts
    with pytest.raises(QrncaError, match="group_by must be one of"):
        report_html(run, group_by="subject")


def test_report_without_a_competence_record_says_how_to_write_one(tmp_path):
    run = _tiny_run(tmp_path)
    html = report_html(run)
    assert "Group maps" in html and "No competence record found" in html and "(at chance)" not in html
    with pytest.raises(QrncaError, match="no 'language' field.*qrnca-lens reduce"):
        report_html(run, group_by="language")
