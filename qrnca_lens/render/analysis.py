"""Maps of a run's QR neurons (METHOD section 5): overlap, layer distributions, heatmaps, vocabulary projections.

Every function but the vocabulary projections is a pure function of the ``neurons.json`` dict that
``qrnca-lens locate`` (or any other locator) writes; none touches a model. A query's QR neurons are read as
a ``NeuronSet`` (``query_neurons``); pooled and shared neurons are ``(layer, neuron)`` pairs, with the
model's own layer numbers (``doc["layers"]`` lists the layers that were attributed).

- ``group_neurons``: each group's pooled QR neurons (the union over its queries).
- ``overlap_matrix``: overlap rate of two groups = |A ∩ B| / |A ∪ B| of their pooled QR neurons (Jaccard).
- ``layer_distribution``: how many of a group's QR neurons sit in each layer (or the share of them).
- ``heatmap``: the paper's "geographical" map, [layer, d_mlp] with naica accumulated over queries.
- ``most_shared_neurons``: the neurons found for the most groups, then the most queries.
- ``group_specificity`` (regroup first with ``grouping.regroup`` to map by language or relation): per group,
  the pooled QR neurons found in that group only and those found in every group.
- ``vocab_projection`` / ``project_neurons``: a neuron's output row W_out[l, i] through the unembedding
  (weights only, no forward pass): the tokens it promotes.

Example:
    >>> doc = {"layers": [0, 1], "queries": {
    ...     "a": {"group": "g", "qr_neurons": [[0, 1, 0.5], [1, 2, 0.25]]},
    ...     "b": {"group": "h", "qr_neurons": [[0, 1, 1.0]]}}}
    >>> group_neurons(doc)
    {'g': {(0, 1), (1, 2)}, 'h': {(0, 1)}}
    >>> overlap_matrix(doc)[1].tolist()  # |{(0,1)}| / |{(0,1), (1,2)}|
    [[1.0, 0.5], [0.5, 1.0]]
    >>> heatmap(doc, 2, 3).tolist()
    [[0.0, 1.5, 0.0], [0.0, 0.0, 0.25]]
    >>> most_shared_neurons(doc, 1)
    [((0, 1), 2, 2)]
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from jaxtyping import Float

from ..errors import QrncaError
from ..neurons import Neuron, NeuronSet, NeuronsLike, top_pooled
from ..protocols import HookedModel

__all__ = [
    "Neuron",
    "VocabProjection",
    "groups",
    "query_neurons",
    "group_neurons",
    "overlap_rate",
    "overlap_matrix",
    "layer_distribution",
    "heatmap",
    "bin_columns",
    "most_shared_neurons",
    "group_specificity",
    "top_group_neurons",
    "group_summaries",
    "run_summary",
    "infer_n_layers",
    "vocab_projection",
    "project_neurons",
]



# ---------------------------------------------------------------- reading a neurons.json dict


def _queries(doc: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
    qs = doc.get("queries")
    if not isinstance(qs, Mapping):
        raise QrncaError("this is not a neurons.json dict: it has no 'queries' mapping (write one with "
                         "`qrnca-lens locate`)")
    return qs


def query_neurons(entry: Mapping[str, Any]) -> NeuronSet:
    """A query entry's QR neurons, ``(layer, neuron, naica)`` best first; a pair without a score weighs 1.

    Other locators write the same schema, but some have no naica: ``[layer, neuron]`` rows count as 1.

    Example:
        >>> query_neurons({"qr_neurons": [[0, 3, 0.5], [1, 2]]})
        NeuronSet([(0, 3, 0.5), (1, 2, 1.0)])
    """
    try:
        return NeuronSet.from_list(entry.get("qr_neurons") or [])
    except QrncaError as e:
        raise QrncaError(f"a QR neuron row must be [layer, neuron, naica]: {e}") from None


def groups(doc: Mapping[str, Any]) -> list[str]:
    """The run's groups, in first-seen order of ``doc["queries"]``."""
    return list(dict.fromkeys(str(e.get("group", "-")) for e in _queries(doc).values()))


def group_neurons(doc: Mapping[str, Any]) -> dict[str, set[Neuron]]:
    """Each group's pooled QR neurons: the union of its queries' QR neurons (groups in first-seen order)."""
    out: dict[str, set[Neuron]] = {g: set() for g in groups(doc)}
    for e in _queries(doc).values():
        out[str(e.get("group", "-"))].update(query_neurons(e).pairs())
    return out


def group_specificity(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per group, how many of its pooled QR neurons are specific to it and how many every group shares.

    A group's pooled neurons are the union of its queries' QR neurons (``group_neurons``). A
    neuron is *specific* when it is pooled by exactly one group, *shared by all* when every group pools
    it; with a single group both hold, so look at these numbers for two groups or more.

    Args:
        doc: a ``neurons.json`` dict, regrouped if wanted (``regroup``).

    Returns:
        ``{group: {"pooled", "specific", "shared_all", "share_specific", "share_shared_all"}}`` (shares are
        of the group's pooled neurons, None for a group without any), plus ``"all groups"``: the same over
        the union of every group's neurons.

    Example:
        >>> doc = {"queries": {"a": {"group": "x", "qr_neurons": [[0, 1], [0, 2]]},
        ...                    "b": {"group": "y", "qr_neurons": [[0, 1]]}}}
        >>> group_specificity(doc)["x"]
        {'pooled': 2, 'specific': 1, 'shared_all': 1, 'share_specific': 0.5, 'share_shared_all': 0.5}
    """
    pooled = group_neurons(doc)
    n_groups = Counter(n for s in pooled.values() for n in s)
    every = len(pooled)

    def row(neurons: set[tuple[int, int]]) -> dict[str, Any]:
        spec = sum(n_groups[n] == 1 for n in neurons)
        alls = sum(n_groups[n] == every for n in neurons)
        k = len(neurons)
        return {"pooled": k, "specific": spec, "shared_all": alls,
                "share_specific": spec / k if k else None, "share_shared_all": alls / k if k else None}

    out = {g: row(s) for g, s in pooled.items()}
    out["all groups"] = row(set(n_groups))
    return out


def infer_n_layers(doc: Mapping[str, Any]) -> int:
    """Rows a map needs: one past the highest layer attributed or holding a QR neuron."""
    top = max([int(x) for x in doc.get("layers") or []] or [-1])
    for e in _queries(doc).values():
        for layer, _, _ in query_neurons(e):
            top = max(top, layer)
    for layer, _ in doc.get("common_neurons") or []:
        top = max(top, int(layer))
    return top + 1


# ---------------------------------------------------------------- overlap


def overlap_rate(a: Iterable[Neuron], b: Iterable[Neuron]) -> float:
    """|A ∩ B| / |A ∪ B| (Jaccard); NaN when both sets are empty (the rate is undefined)."""
    sa, sb = set(a), set(b)
    union = len(sa | sb)
    return len(sa & sb) / union if union else math.nan


def overlap_matrix(doc: Mapping[str, Any]) -> tuple[list[str], Float[np.ndarray, "group group"]]:
    """Groups and their pairwise overlap rates.

    ``matrix[i, j] = |A_i ∩ A_j| / |A_i ∪ A_j|`` where ``A_g`` is group g's pooled QR neurons (the union over
    its queries, ``group_neurons``). Symmetric; the diagonal is 1 (NaN for a group with no QR neuron at all).
    The paper counts "shared neurons" between groups without a formula; the Jaccard form keeps groups of
    different sizes comparable.
    """
    pooled = group_neurons(doc)
    names = list(pooled)
    m = np.empty((len(names), len(names)), dtype=np.float64)
    for i, gi in enumerate(names):
        for j, gj in enumerate(names):
            m[i, j] = overlap_rate(pooled[gi], pooled[gj])
    return names, m


# ---------------------------------------------------------------- layers and heatmaps


def layer_distribution(
    doc: Mapping[str, Any],
    n_layers: int | None = None,
    *,
    normalize: bool = False,
    pooled: bool = True,
) -> dict[str, np.ndarray]:
    """Per group, how many QR neurons sit in each layer: an array of length ``n_layers``.

    ``pooled=True`` counts the group's distinct neurons (``group_neurons``); ``pooled=False`` counts
    occurrences, so a neuron found for 3 queries counts 3 times. ``normalize=True`` divides each group's
    counts by their sum (the share per layer; all zeros for a group without neurons).
    """
    n_layers = infer_n_layers(doc) if n_layers is None else n_layers
    out: dict[str, np.ndarray] = {}
    if pooled:
        per = {g: [layer for layer, _ in s] for g, s in group_neurons(doc).items()}
    else:
        per = {g: [] for g in groups(doc)}
        for e in _queries(doc).values():
            per[str(e.get("group", "-"))].extend(layer for layer, _, _ in query_neurons(e))
    for g, layers in per.items():
        counts = np.zeros(n_layers, dtype=np.float64 if normalize else np.int64)
        for layer in layers:
            _check_layer(layer, n_layers)
            counts[layer] += 1
        if normalize and counts.sum() > 0:
            counts = counts / counts.sum()
        out[g] = counts
    return out


def _check_layer(layer: int, n_layers: int) -> None:
    if not 0 <= layer < n_layers:
        raise QrncaError(f"a QR neuron sits in layer {layer}, outside the {n_layers} layers of the map; "
                         "pass the model's n_layers")


def heatmap(
    doc: Mapping[str, Any],
    n_layers: int,
    d_mlp: int,
    group: str | None = None,
) -> Float[np.ndarray, "layer d_mlp"]:
    """The paper's geographical map: ``m[l, i]`` = sum over queries (of ``group``, or all) of naica(n_i^l).

    A locator without scores (``[layer, neuron]`` rows) adds 1 per occurrence instead.
    """
    m = np.zeros((n_layers, d_mlp), dtype=np.float64)
    for e in _queries(doc).values():
        if group is not None and str(e.get("group", "-")) != group:
            continue
        for layer, n, x in query_neurons(e):
            _check_layer(layer, n_layers)
            if not 0 <= n < d_mlp:
                raise QrncaError(f"neuron {n} of layer {layer} is outside d_mlp={d_mlp}; pass the model's d_mlp")
            m[layer, n] += x
    return m


def bin_columns(m: Float[np.ndarray, "layer d_mlp"], n_bins: int) -> Float[np.ndarray, "layer bins"]:
    """Sum adjacent neuron columns into ``n_bins`` bins (the last bin takes the remainder).

    1536 columns squeezed into a few hundred pixels would drop single neurons; summing keeps every one.
    Bin b covers neurons [b * w, (b + 1) * w) with w = ceil(d_mlp / n_bins).
    """
    d = m.shape[1]
    if n_bins >= d:
        return m.astype(np.float64)
    if n_bins < 1:
        raise QrncaError(f"n_bins must be >= 1, got {n_bins}")
    w = math.ceil(d / n_bins)
    pad = w * math.ceil(d / w) - d
    padded = np.pad(m.astype(np.float64), ((0, 0), (0, pad)))
    return padded.reshape(m.shape[0], -1, w).sum(axis=2)


# ---------------------------------------------------------------- shared neurons


def most_shared_neurons(
    doc: Mapping[str, Any], k: int = 10, *, min_groups: int = 1,
) -> list[tuple[Neuron, int, int]]:
    """The ``k`` QR neurons found for the most groups, then the most queries: ``((layer, neuron), groups, queries)``.

    Ties go to (layer, neuron) ascending. ``min_groups`` drops neurons found for fewer groups.
    """
    n_groups: dict[Neuron, set[str]] = {}
    n_queries: Counter[Neuron] = Counter()
    for e in _queries(doc).values():
        for layer, n, _ in query_neurons(e):
            n_groups.setdefault((layer, n), set()).add(str(e.get("group", "-")))
            n_queries[(layer, n)] += 1
    rows = [(nn, len(gs), n_queries[nn]) for nn, gs in n_groups.items() if len(gs) >= min_groups]
    rows.sort(key=lambda r: (-r[1], -r[2], r[0]))
    return rows[:k]


def top_group_neurons(doc: Mapping[str, Any], group: str | None = None, k: int = 5) -> list[tuple[Neuron, float]]:
    """A group's (or the run's) ``k`` neurons with the largest accumulated naica; ties (layer, neuron) ascending."""
    chosen = (query_neurons(e) for e in _queries(doc).values()
              if group is None or str(e.get("group", "-")) == group)
    return [((layer, n), x) for layer, n, x in top_pooled(chosen, k)]


# ---------------------------------------------------------------- summaries


def _mean(xs: Sequence[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def group_summaries(doc: Mapping[str, Any], n_layers: int | None = None) -> list[dict[str, Any]]:
    """One dict per group: queries, mean QR neurons per query, queries left with none, pooled neurons, the
    layer holding most of them, mean target probability and model accuracy over the group's queries
    (None when the locator did not record them)."""
    n_layers = infer_n_layers(doc) if n_layers is None else n_layers
    pooled = group_neurons(doc)
    dist = layer_distribution(doc, n_layers)
    rows = []
    for g in pooled:
        es = [e for e in _queries(doc).values() if str(e.get("group", "-")) == g]
        counts = [len(query_neurons(e)) for e in es]
        probs = [float(e["target_prob"]) for e in es if e.get("target_prob") is not None]
        accs = [float(e["accuracy"]) for e in es if e.get("accuracy") is not None]
        rows.append({
            "group": g,
            "n_queries": len(es),
            "mean_qr_neurons": _mean([float(c) for c in counts]),
            "empty_queries": sum(c == 0 for c in counts),
            "pooled_neurons": len(pooled[g]),
            "peak_layer": int(np.argmax(dist[g])) if dist[g].sum() > 0 else None,
            "mean_target_prob": _mean(probs),
            "accuracy": _mean(accs),
        })
    return rows


def run_summary(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The run at a glance; ``doc["summary"]`` when the locator wrote one, recomputed otherwise."""
    qs = _queries(doc)
    counts = [len(query_neurons(e)) for e in qs.values()]
    probs = [float(e["target_prob"]) for e in qs.values() if e.get("target_prob") is not None]
    accs = [float(e["accuracy"]) for e in qs.values() if e.get("accuracy") is not None]
    out = {
        "n_queries": len(qs),
        "n_groups": len(groups(doc)),
        "mean_qr_neurons": _mean([float(c) for c in counts]),
        "empty_queries": sum(c == 0 for c in counts),
        "n_common_neurons": len(doc.get("common_neurons") or []),
        "mean_target_prob": _mean(probs),
        # Unweighted over queries; locate's own summary weighs prompts, which it prefers when present.
        "accuracy": _mean(accs),
    }
    for key in ("mean_target_prob", "accuracy", "mean_qr_neurons"):
        given = (doc.get("summary") or {}).get(key)
        if given is not None:
            out[key] = float(given)
    return out


# ---------------------------------------------------------------- vocabulary projection (weights only)


@dataclass(frozen=True)
class VocabProjection:
    """The ``k`` tokens a neuron's output row promotes most (and their logits), and the ``k`` it demotes most."""

    layer: int
    neuron: int
    tokens: tuple[str, ...]
    logits: tuple[float, ...]
    bottom_tokens: tuple[str, ...] = ()
    bottom_logits: tuple[float, ...] = ()
    through_norm: bool = True

    @property
    def name(self) -> str:
        return f"L{self.layer}.N{self.neuron}"


def _final_norm(model: HookedModel) -> tuple[Any, bool]:
    """The final norm's elementwise gain (None if there is none, e.g. folded into W_U), and whether it centres.

    The gain is what the norm multiplies by: ``w``, or ``1 + w`` for Gemma's RMSNorm (see
    ``qrnca_lens.lens.weights.gain_offset``: TL's bridge keeps Gemma's raw ``w`` and flags the offset).
    """
    import torch

    from ..lens.weights import gain_offset

    ln = getattr(model, "ln_final", None)
    if ln is None:
        return None, False
    ntype = str(getattr(model.cfg, "normalization_type", "") or "")
    centres = ntype.startswith("LN")
    w = getattr(ln, "w", None)
    if not isinstance(w, torch.Tensor):
        d_model = int(model.cfg.d_model)
        # A bridge keeps the HF module inside (``_original_component.weight``); take the d_model-sized weight.
        w = next((p for name, p in ln.named_parameters()
                  if name.split(".")[-1] in ("weight", "w") and tuple(p.shape) == (d_model,)), None)
        if w is None:
            return None, centres
    return w.detach() + gain_offset(model, ln), centres


def _token_str(tokenizer: Any, tid: int) -> str:
    return str(tokenizer.decode([int(tid)]))


def project_neurons(
    model: HookedModel,
    neurons: NeuronsLike,
    k: int = 10,
    *,
    through_norm: bool = True,
) -> list[VocabProjection]:
    """``vocab_projection`` for many neurons, one matrix product per layer.

    The direction projected is W_out[l, i] (what the neuron writes into the residual stream per unit of
    activation). With ``through_norm=True`` it first goes through the norms a neuron's write passes: the
    block's post-MLP norm where there is one (Gemma: scaled by its gain, ``lens.weights.post_norm_gains``),
    then the final norm the way a residual direction does: centred if the norm is a LayerNorm, then scaled
    elementwise by the norm's gain (each norm's per-position 1/rms or 1/std is a positive scalar, which
    leaves the ranking unchanged); models whose
    norms are folded into W_U (TL's ``fold_ln``, compatibility mode) have no weight left and are projected
    as they are. Logits are those of that direction alone: W_out[l, i] (x norm weight) @ W_U, without b_U.

    Args:
        model: the TL model (weights only are read).
        neurons: a ``NeuronSet``, ``(layer, neuron[, score])`` entries or a ``[n, 2]`` tensor.
        k: tokens kept at each end.
        through_norm: go through the post-MLP and final norms first (see above).

    Returns:
        One ``VocabProjection`` per neuron, in the order given.

    Example:
        >>> project_neurons(model, run.qr_neurons("capital-01")[:3])[0].tokens[:5]   # doctest: +SKIP
    """
    import torch

    from ..lens.weights import post_norm_gains
    from ..model.access import W_U, W_out, tokenizer_of

    wanted = NeuronSet(neurons)
    if not wanted:
        return []
    tok = tokenizer_of(model)
    wu = W_U(model).detach().float()
    k = min(k, int(wu.shape[-1]))
    g, centres = _final_norm(model) if through_norm else (None, False)
    post = post_norm_gains(model, "mlp") if through_norm else None
    by_layer = wanted.by_layer()
    found: dict[Neuron, VocabProjection] = {}
    with torch.no_grad():
        for layer, ns in by_layer.items():
            rows = W_out(model, layer).detach().float()[torch.tensor(ns, dtype=torch.long)]
            if post is not None:
                rows = rows * post[layer].float().to(rows.device)
            if centres:
                rows = rows - rows.mean(dim=-1, keepdim=True)
            if g is not None:
                rows = rows * g.detach().float().to(rows.device)
            logits = rows @ wu.to(rows.device)
            top = logits.topk(k, dim=-1)
            bot = logits.topk(k, dim=-1, largest=False)
            for i, n in enumerate(ns):
                found[(layer, n)] = VocabProjection(
                    layer, n,
                    tuple(_token_str(tok, t) for t in top.indices[i].tolist()),
                    tuple(float(x) for x in top.values[i].tolist()),
                    tuple(_token_str(tok, t) for t in bot.indices[i].tolist()),
                    tuple(float(x) for x in bot.values[i].tolist()),
                    through_norm=through_norm and g is not None,
                )
    return [found[pair] for pair in wanted.pairs()]


def vocab_projection(model: HookedModel, layer: int, neuron: int, k: int = 10, *, through_norm: bool = True) -> VocabProjection:
    """Top-``k`` tokens (decoded strings) and logits of W_out[layer, neuron] @ W_U; see ``project_neurons``.

    Example:
        >>> p = vocab_projection(model, 29, 1197)   # doctest: +SKIP
        >>> p.tokens[:5]                            # doctest: +SKIP
    """
    return project_neurons(model, [(layer, neuron)], k, through_norm=through_norm)[0]
