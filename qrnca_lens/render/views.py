"""circuitsvis views of a query's QR neurons, rendered so that they work with no internet.

circuitsvis's own HTML (``str(view)``, ``show_code()``) imports its JavaScript from a public package host;
``RenderedHTML.local_src`` inlines the 1.3 MB bundle instead, but once per view (and its ``<div .../>`` is
not closed, so the rest of a page would end up inside the view); its notebook display asks google.com
whether it is online before choosing. Here a view keeps only its render call (``View.call``); a page inlines
the bundle once (``bundle_js()``) and every view after it. ``View.html()`` is a complete offline page for
one view.

In a notebook a ``View`` (and the ``Views`` of ``query_views``) displays itself (``_repr_html_``), offline
too. The 1.3 MB is circuitsvis's minified browser bundle (``dist/cdn/iife.js``); circuitsvis ships no
smaller offline build, so each displayed output carries the bundle gzipped (about 0.48 MB as base64) and
the browser unpacks it once per page (``DecompressionStream``: Chrome/Edge 80+, Firefox 113+, Safari 16.4+;
an older browser shows a one-line note instead of the view). ``query_views``' three views share one copy.

- ``neuron_activations``: the QR neurons' activations (``hook_post``, the value W_out multiplies) over every
  token of the query's prompts, captured through ``hooks.hooked``.
- ``activations_view`` (circuitsvis ``text_neuron_activations``): those activations over the prompt tokens,
  one drop-down entry per QR neuron.
- ``topk_view`` (circuitsvis ``topk_tokens``): the prompt tokens that activate each QR neuron most and least.
- ``target_view`` (circuitsvis ``token_log_probs``): the log-probability of every token of prompt + answer
  given its prefix, with the model's top guesses on hover; the answer tokens come last.

Example:
    >>> prompts = build_prompts(query, cfg, model.tokenizer, pool=pool)          # doctest: +SKIP
    >>> views = query_views(model, prompts, [(29, 1498), (24, 1005)])             # doctest: +SKIP
    >>> Path("q.html").write_text(page([v.fragment() for v in views.values()]))  # doctest: +SKIP
    >>> views          # in a notebook: the three views, drawn        # doctest: +SKIP
"""

from __future__ import annotations

import base64
import functools
import gzip
import html as html_lib
import json
import re
import uuid as uuid_lib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Float

from ..atomic import write_text_atomic
from ..errors import QrncaError
from ..neurons import NeuronSet, NeuronsLike
from ..protocols import HookedModel

__all__ = [
    "View",
    "Views",
    "bundle_js",
    "notebook_html",
    "loader_js",
    "from_rendered",
    "page",
    "token_strings",
    "neuron_labels",
    "neuron_activations",
    "activations_view",
    "topk_view",
    "target_view",
    "query_views",
]

# The render call that circuitsvis appends after its inlined bundle.
_CALL = re.compile(r'CircuitsVis\.render\(\s*"(?P<uuid>circuits-vis-[^"]+)",\s*CircuitsVis\.(?P<element>\w+),')


def _script_safe(js: str) -> str:
    # "</script" inside inline JS would end the element early (and "<!--" can change how it is parsed). In
    # the bundle both only occur inside string literals, where "<\/" and "<\!" mean the same characters.
    js = re.sub(r"</(script)", r"<\\/\1", js, flags=re.I)
    return js.replace("<!--", "<\\!--")


def _json_safe(js: str) -> str:
    # Props are JSON: any "</" sits inside a string (a token such as "</s>"), where "<\/" is the same text.
    return js.replace("</", "<\\/").replace("<!--", "<\\!--")


@functools.lru_cache(maxsize=1)
def bundle_js() -> str:
    """circuitsvis's browser bundle (defines the global ``CircuitsVis``), safe to inline in a ``<script>``."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.exists():
        raise QrncaError(f"circuitsvis {getattr(circuitsvis, '__version__', '?')} ships no {path}; "
                         "install circuitsvis>=1.43 (its wheel carries the bundle)")
    js = path.read_text(encoding="utf-8")
    # A source-map comment would make devtools fetch a file that is not there.
    js = re.sub(r"^//# sourceMappingURL=.*$", "", js, flags=re.M)
    return _script_safe(js)


@functools.lru_cache(maxsize=1)
def _bundle_gzip_b64() -> str:
    # mtime=0: the same bytes every time, so a re-run notebook cell does not change its saved output.
    return base64.b64encode(gzip.compress(bundle_js().encode("utf-8"), compresslevel=9, mtime=0)).decode("ascii")


# Loads the gzipped bundle once per page (the first output to run starts it, the others wait on it), then
# draws. Inserting a <script> with the unpacked text runs it as the page's own inline script would.
_LOADER = """(function () {
  var w = window;
  if (!w.__qrncaCircuitsVis) {
    w.__qrncaCircuitsVis = w.CircuitsVis ? Promise.resolve() : (function () {
      if (typeof DecompressionStream === "undefined") {
        return Promise.reject(new Error("this browser cannot unpack the circuitsvis bundle (no DecompressionStream)"));
      }
      var bin = atob("%(data)s"), bytes = new Uint8Array(bin.length);
      for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
      var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
      return new Response(stream).text().then(function (js) {
        var s = document.createElement("script");
        s.textContent = js;
        document.head.appendChild(s);
      });
    })();
  }
  w.__qrncaCircuitsVis.then(function () {
%(draw)s
  }, function (e) {
    %(ids)s.forEach(function (id) {
      var el = document.getElementById(id);
      if (el) el.textContent = "circuitsvis view not drawn: " + e.message + "; save it with View.save(path) and open the file";
    });
  });
})();"""


def loader_js(draw: str, ids: Sequence[str] = ()) -> str:
    """JavaScript that unpacks the circuitsvis bundle once per page, then runs ``draw``; on failure the
    elements ``ids`` say why. The notebook form of a page's inlined bundle (see the module docstring).

    Example:
        >>> "DecompressionStream" in loader_js("console.log(1);")
        True
    """
    return _LOADER % {"data": _bundle_gzip_b64(), "draw": draw, "ids": json.dumps(list(ids))}


def notebook_html(views: Sequence[View]) -> str:
    """HTML that draws ``views`` where it is displayed (a notebook output), offline, with one copy of the
    bundle for all of them. Each call gets fresh element ids, so an output shown twice draws twice.

    Example:
        >>> html = notebook_html([view_a, view_b])   # doctest: +SKIP
    """
    parts, calls, ids = [], [], []
    for v in views:
        fresh = f"{v.uuid}-{uuid_lib.uuid4().hex[:8]}"
        title = f"<div><b>{html_lib.escape(v.title)}</b></div>" if v.title else ""
        parts.append(f'{title}<div class="cv-view" id="{fresh}"></div>')
        calls.append("    " + v.call.replace(f'"{v.uuid}"', f'"{fresh}"', 1))
        ids.append(fresh)
    return "\n".join(parts) + f"\n<script>{loader_js(chr(10).join(calls), ids)}</script>"


@dataclass(frozen=True)
class View:
    """One circuitsvis view: the React element, its container id and the JS call that draws it.

    Displayed in a notebook, it draws itself (``_repr_html_``; offline, see the module docstring).

    Example:
        >>> v = activations_view([["a", "b"]], [np.array([[0.1], [0.9]])], ["L0.N1"], title="acts")
        >>> v.element, v.fragment().startswith('<div class="cv-view"'), "CircuitsVis.render" in v._repr_html_()
        ('TextNeuronActivations', True, True)
    """

    element: str
    uuid: str
    call: str
    title: str = ""

    def fragment(self, height: str | None = None) -> str:
        """A ``<div>`` and the script that renders into it; needs ``bundle_js()`` earlier on the page."""
        style = f' style="min-height:{height}"' if height else ""
        return (f'<div class="cv-view" id="{self.uuid}"{style}></div>\n'
                f"<script>{self.call}</script>")

    def html(self) -> str:
        """A complete page for this view alone (bundle inlined: works offline)."""
        return page([self.fragment()], title=self.title or self.element)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        return write_text_atomic(path, self.html())

    def _repr_html_(self) -> str:
        return notebook_html([self])


class Views(dict[str, View]):
    """``query_views``' result: a dict ``{name: View}`` that, displayed in a notebook, draws all its views
    with one copy of the bundle.

    Example:
        >>> views = query_views(model, prompts, run.qr_neurons(q))   # doctest: +SKIP
        >>> views["target"].save("target.html"); views               # doctest: +SKIP
    """

    def _repr_html_(self) -> str:
        return notebook_html(list(self.values()))


def from_rendered(rendered: Any, title: str = "") -> View:
    """A ``View`` from circuitsvis's ``RenderedHTML`` (its ``local_src``, minus the bundle it inlines)."""
    src = rendered.local_src
    calls = list(_CALL.finditer(src))
    m = calls[-1] if calls else None  # the last call
    end = src.rfind("</script>")
    if m is None or end < m.start():
        raise QrncaError("circuitsvis's local HTML no longer ends in CircuitsVis.render(...); this circuitsvis "
                         "version is not supported by qrnca_lens.render.views (tested with 1.43)")
    props = src[m.end():end].strip().rstrip(";").rstrip()
    if not props.endswith(")"):
        raise QrncaError("circuitsvis's render call has an unexpected shape; this circuitsvis version is not "
                         "supported by qrnca_lens.render.views (tested with 1.43)")
    props = props[:-1].strip()
    call = f'CircuitsVis.render("{m.group("uuid")}", CircuitsVis.{m.group("element")}, {_json_safe(props)});'
    return View(m.group("element"), m.group("uuid"), call, title)


def page(fragments: Sequence[str], title: str = "circuitsvis", css: str = "") -> str:
    """An offline HTML page: the bundle once in ``<head>``, then the fragments (``View.fragment()`` or any HTML)."""
    body = "\n".join(fragments)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html_lib.escape(title)}</title><style>{css}</style>\n"
            f"<script>{bundle_js()}</script>\n</head><body>\n{body}\n</body></html>\n")


# ---------------------------------------------------------------- reading the model


def token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token decoded on its own (what a token view shows)."""
    return [str(tokenizer.decode([int(t)])) for t in ids]


def neuron_labels(neurons: NeuronsLike) -> list[str]:
    """``["L14.N103", ...]``: one label per neuron, in order.

    Example:
        >>> neuron_labels([(14, 103), (20, 7)])
        ['L14.N103', 'L20.N7']
    """
    return [f"L{layer}.N{n}" for layer, n in NeuronSet(neurons).pairs()]


def _act_hook(model: HookedModel, layer: int, which: str) -> str:
    from ..errors import ModelError
    from ..model.access import mlp_hook_name, post_hook_name

    if which == "post":
        try:
            return post_hook_name(model, layer)
        except ModelError:
            pass  # a model without hook_post: fall back to the hook QRNCA attributes
    return mlp_hook_name(model, layer)


def _forward(
    model: HookedModel, token_lists: Sequence[Sequence[int]], neurons: NeuronSet, which: str = "post",
) -> tuple[list[Float[np.ndarray, "_pos neuron"]], Any]:
    """One right-padded forward over all token lists: the neurons' activations per list, and the logits.

    Right padding leaves every real position of a causal model exact, so one batch does the work of one
    forward per prompt (the report's cost is dominated by these forwards on a CPU).
    """
    import torch

    from ..model.access import model_device, pad_batch
    from ..model.hooks import capture, hooked

    if which not in ("post", "attributed"):
        raise QrncaError(f"which must be 'post' or 'attributed', got {which!r}")
    layers = sorted(neurons.by_layer())
    names = {layer: _act_hook(model, layer, which) for layer in layers}
    store: dict[str, torch.Tensor] = {}
    batch = pad_batch(token_lists, 0, model_device(model))
    with torch.no_grad(), hooked(model, fwd=[(names[layer], capture(store, names[layer])) for layer in layers]):
        logits = model(batch, return_type="logits")
    out = []
    for b, ids in enumerate(token_lists):
        cols = [store[names[layer]][b, : len(ids), n].float().cpu() for layer, n in neurons.pairs()]
        acts = torch.stack(cols, dim=-1) if cols else torch.zeros(len(ids), 0)
        out.append(acts.numpy().astype(np.float32))
    return out, logits


def neuron_activations(
    model: HookedModel,
    token_lists: Sequence[Sequence[int]],
    neurons: NeuronsLike,
    *,
    which: str = "post",
) -> list[Float[np.ndarray, "_pos neuron"]]:
    """Activations of ``neurons`` at every position of each token list: one [pos, neuron] array per list.

    ``which="post"`` reads ``hook_post`` (the MLP's hidden value that W_out multiplies); ``"attributed"``
    reads the hook QRNCA attributes (``hook_pre_linear`` of a gated MLP, else ``hook_pre``). Hooks enter
    through ``hooks.hooked`` and leave with the call.

    Args:
        model: the TL model.
        token_lists: token id lists (prompts), of any lengths.
        neurons: a ``NeuronSet``, ``(layer, neuron[, score])`` entries or a ``[n, 2]`` tensor.
        which: ``"post"`` or ``"attributed"``.

    Returns:
        One ``[len(tokens), len(neurons)]`` float32 array per token list.

    Example:
        >>> neuron_activations(model, [p.tokens for p in prompts], run.qr_neurons(q))[0].shape  # doctest: +SKIP
    """
    return _forward(model, token_lists, NeuronSet(neurons), which)[0]


# ---------------------------------------------------------------- views


def activations_view(
    tokens: Sequence[Sequence[str]],
    activations: Sequence[Float[np.ndarray, "_pos neuron"]],
    labels: Sequence[str],
    title: str = "",
) -> View:
    """circuitsvis ``text_neuron_activations``: each sample's tokens coloured by one neuron at a time."""
    from circuitsvis.activations import text_neuron_activations

    if len(tokens) != len(activations):
        raise QrncaError(f"{len(tokens)} token lists but {len(activations)} activation arrays")
    acts = [np.asarray(a, dtype=np.float32)[:, None, :] for a in activations]  # [pos, 1 "layer", neuron]
    r = text_neuron_activations(
        tokens=[list(t) for t in tokens], activations=acts, first_dimension_name="Set",
        second_dimension_name="Neuron", first_dimension_labels=["QR neurons"],
        second_dimension_labels=list(labels),
    )
    return from_rendered(r, title)


def topk_view(
    tokens: Sequence[Sequence[str]],
    activations: Sequence[Float[np.ndarray, "_pos neuron"]],
    k: int = 5,
    sample_labels: Sequence[str] | None = None,
    title: str = "",
) -> View:
    """circuitsvis ``topk_tokens``: per neuron (column, numbered in the order given), the most and least
    activating tokens of each sample. circuitsvis cannot label that axis; list the order next to the view."""
    from circuitsvis.topk_tokens import topk_tokens

    acts = [np.asarray(a, dtype=np.float32)[None, :, :] for a in activations]  # [1 "layer", pos, neuron]
    r = topk_tokens(tokens=[list(t) for t in tokens], activations=acts, max_k=k, first_dimension_name="Set",
                    third_dimension_name="Neuron", first_dimension_labels=["QR neurons"],
                    sample_labels=list(sample_labels) if sample_labels is not None else None)
    return from_rendered(r, title)


def target_view(
    model: HookedModel, tokens: Sequence[int], target: Sequence[int], top_k: int = 5, title: str = "", logits: Any = None,
) -> View:
    """circuitsvis ``token_log_probs`` over prompt + answer: every token's log-probability given its prefix.

    The last ``len(target)`` tokens are the answer, so their colour is the model's (teacher-forced) belief in
    it. ``logits`` ([pos, vocab] for those tokens, padding allowed after them) saves the forward pass.
    """
    import torch
    from circuitsvis.logits import token_log_probs

    from ..model.access import model_device, tokenizer_of

    tok = tokenizer_of(model)
    seq = torch.tensor(list(tokens) + list(target), dtype=torch.long)
    if logits is None:
        with torch.no_grad():
            logits = model(seq[None].to(model_device(model)), return_type="logits")[0]
    logp = logits[: len(seq)].float().cpu().log_softmax(-1)
    r = token_log_probs(seq, logp, to_string=lambda t: str(tok.decode([int(t)])), top_k=top_k)
    return from_rendered(r, title)


def query_views(model: HookedModel, prompts: Sequence[Any], neurons: NeuronsLike, *, k: int = 5) -> Views:
    """The three views of one query: ``activations`` and ``topk`` over its prompts, ``target`` on its first prompt.

    ``prompts`` are ``proxies.Prompt`` objects (``.tokens``, ``.target``); with no QR neuron only ``target``.
    One forward pass serves all three: the first prompt runs with its answer appended (causal: its prompt
    positions are unchanged), the others as they are.

    Args:
        model: the TL model.
        prompts: the query's prompts.
        neurons: a ``NeuronSet`` (e.g. ``run.qr_neurons(q)``), ``(layer, neuron[, score])`` entries or a
            ``[n, 2]`` tensor.
        k: tokens per neuron in the top-k view.

    Returns:
        ``Views``: a dict of the ``"activations"``, ``"topk"`` and ``"target"`` views (only ``"target"``
        without neurons, none without prompts) that draws them all when displayed in a notebook.

    Example:
        >>> views = query_views(model, prompts, [(29, 1498), (24, 1005)])   # doctest: +SKIP
    """
    neurons = NeuronSet(neurons)
    from ..model.access import tokenizer_of

    if not prompts:
        return Views()
    tok = tokenizer_of(model)
    token_lists = [list(p.tokens) for p in prompts]
    first = token_lists[0] + list(prompts[0].target)
    acts, logits = _forward(model, [first] + token_lists[1:], neurons)
    acts[0] = acts[0][: len(token_lists[0])]
    strs = [token_strings(tok, ids) for ids in token_lists]
    out = Views()
    if neurons:
        labels = neuron_labels(neurons)
        out["activations"] = activations_view(strs, acts, labels, title="QR neuron activations")
        out["topk"] = topk_view(strs, acts, k=k, sample_labels=[f"prompt {i}" for i in range(len(strs))],
                                title="top activating tokens")
    out["target"] = target_view(model, prompts[0].tokens, prompts[0].target, title="log p(token | prefix)",
                                logits=logits[0])
    return out
