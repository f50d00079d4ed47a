"""Exact value-neuron scores: every neuron, chosen neurons, and the certified top k.

Top-K mode: log p(w | L_b + t a_i P_i) is concave in t, so its tangent at t = 0, a_i · (W_out[l, i] · g_l) with
g_l = U (onehot(w) - softmax(L_b)), is an **upper bound** on the exact score. Neurons are rescored exactly in
decreasing order of that bound until the k-th best exact score is above every remaining bound: the result is
the exact top k with a certificate (``TopNeurons.certified``), not an approximation.

The bound and the rescoring are per neuron, so ``layers=`` restricts the candidates to some layers and the
certificate still holds: the result is the exact top k among those layers' neurons (real layer numbers).

Example:
    >>> scores = neuron_scores(model, prompts)             # [prompt, layer, d_mlp]     # doctest: +SKIP
    >>> top = top_neurons(model, prompts, k=10)            # certified exact top 10     # doctest: +SKIP
    >>> top_neurons(model, prompts, k=10, layers=[5, 17])  # ... among layers 5 and 17  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..data.prompts import Prompt
from ..errors import QrncaError
from ..model.access import d_mlp, n_layers
from ..protocols import HookedModel
from .cache import LensCache, batches, lens_cache, scoring_weights
from .config import LensConfig
from .lse import BLOCK, layer_neuron_scores, lse_

__all__ = ["TopNeurons", "layer_subset", "neuron_scores", "score_neurons", "score_triples", "top_bound",
           "top_from_scores", "top_neurons"]


# ---------------------------------------------------------------- every neuron, or chosen ones


def layer_subset(model: HookedModel, layers: Sequence[int] | None) -> list[int]:
    """The layers to score: all (``None``), or the given ones in their order with repeats dropped.

    Example:
        >>> layer_subset(model, [17, 5, 17])                                      # doctest: +SKIP
        [17, 5]
    """
    L = n_layers(model)
    if layers is None:
        return list(range(L))
    chosen = list(dict.fromkeys(int(x) for x in layers))
    bad = [x for x in chosen if not 0 <= x < L]
    if not chosen or bad:
        raise QrncaError(f"layers {bad or 'none'} are not layers of this {L}-layer model; give layer numbers "
                         f"0..{L - 1}, or None for all")
    return chosen


def neuron_scores(
    model: HookedModel, prompts: Sequence[Prompt], cfg: LensConfig = LensConfig(), *, progress: bool = False,
    layers: Sequence[int] | None = None,
) -> Float[Tensor, "prompt layer d_mlp"]:
    """Exact log-probability increase of every FFN neuron for each prompt (float32, on the CPU).

    Per batch of ``cfg.batch_size`` prompts: one forward pass, then per layer the products W_out[l, chunk] · U
    (shared by the batch) and the per-neuron log-sum-exps (``cfg.engine``).

    Args:
        model: a TransformerLens model.
        prompts: scored at their target positions, on their first target tokens.
        cfg: the engine, chunk and batch settings.
        progress: show a progress bar over batches.
        layers: score only these layers (default: all); column j is layer ``layer_subset(model, layers)[j]``.

    Returns:
        Scores [prompt, layer, d_mlp].

    Example:
        >>> neuron_scores(model, prompts).shape                                   # doctest: +SKIP
        torch.Size([6, 30, 1536])
        >>> neuron_scores(model, prompts, layers=[29, 3]).shape  # layers 29, 3   # doctest: +SKIP
        torch.Size([6, 2, 1536])
    """
    W_out = scoring_weights(model, prompts)
    chosen, dm = layer_subset(model, layers), d_mlp(model)
    out = torch.empty(len(prompts), len(chosen), dm)
    it: Any = batches(prompts, cfg.batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(list(it), desc="lens", unit="batch")
    with torch.no_grad():
        for start, batch in it:
            cache = lens_cache(model, batch, check_tol=cfg.check_tol)
            a = cache.coefficients
            for j, layer in enumerate(chosen):
                out[start : start + len(batch), j] = layer_neuron_scores(
                    W_out[layer], cache.lens.U, cache.layer_logits(layer), a[:, layer], cache.targets, cfg).cpu()
    return out


def score_triples(
    cache: LensCache, W_out: Float[Tensor, "layer d_mlp d_model"], rows: Int[Tensor, " n"], layers: Int[Tensor, " n"],
    neurons: Int[Tensor, " n"], base: Float[Tensor, "batch layer vocab"], base_lse: Float[Tensor, "batch layer"],
) -> Float[Tensor, " n"]:
    """Exact scores of neuron (layers[j], neurons[j]) on prompt rows[j] of the cache (a direct log-sum-exp each).

    Args:
        cache: ``lens_cache`` of the prompts.
        W_out: ``scoring_weights(model, prompts)``.
        rows, layers, neurons: one (prompt row, layer, neuron) triple per entry.
        base, base_lse: ``cache.base_logits()`` and its log-sum-exp, passed in so callers compute them once.

    Returns:
        Scores [n], float32 on the model's device.
    """
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=W_out.device)
    a = cache.coefficients
    for s in range(0, int(rows.numel()), BLOCK):
        r, l, i = rows[s : s + BLOCK], layers[s : s + BLOCK], neurons[s : s + BLOCK]
        P = W_out[l, i] @ cache.lens.U
        coef = a[r, l, i]
        Pw = P[torch.arange(P.shape[0], device=P.device), cache.targets[r]]
        lse = lse_(torch.addcmul(base[r, l], coef[:, None], P))
        out[s : s + BLOCK] = (coef.double() * Pw.double() - (lse.double() - base_lse[r, l].double())).float()
    return out


def score_neurons(
    model: HookedModel, prompts: Sequence[Prompt], neurons: Int[Tensor, "n 2"], cfg: LensConfig = LensConfig(),
) -> Float[Tensor, "prompt n"]:
    """Exact log-probability increase of the given (layer, neuron) pairs on every prompt.

    Args:
        model: a TransformerLens model.
        prompts: the prompts to score on.
        neurons: (layer, neuron) pairs.
        cfg: ``batch_size`` and ``check_tol``.

    Returns:
        Scores [prompt, n] (float32, on the CPU).

    Example:
        >>> score_neurons(model, prompts, torch.tensor([[3, 17], [5, 2]]))      # doctest: +SKIP
    """
    W_out = scoring_weights(model, prompts)
    L, dm = n_layers(model), d_mlp(model)
    neurons = torch.as_tensor(neurons).long().reshape(-1, 2)
    if neurons.numel() and not (bool(((neurons[:, 0] >= 0) & (neurons[:, 0] < L)).all())
                                and bool(((neurons[:, 1] >= 0) & (neurons[:, 1] < dm)).all())):
        raise QrncaError(f"neurons must be (layer, neuron) pairs with layer < {L} and neuron < {dm}")
    out = torch.empty(len(prompts), neurons.shape[0])
    with torch.no_grad():
        for start, batch in batches(prompts, cfg.batch_size):
            cache = lens_cache(model, batch, check_tol=cfg.check_tol)
            base = cache.base_logits()
            base_lse = torch.logsumexp(base, -1)
            dev = neurons.to(W_out.device)
            n, B = dev.shape[0], cache.size
            rows = torch.arange(B, device=dev.device).repeat_interleave(n)
            got = score_triples(cache, W_out, rows, dev[:, 0].repeat(B), dev[:, 1].repeat(B), base, base_lse)
            out[start : start + B] = got.view(B, n).cpu()
    return out


# ---------------------------------------------------------------- the top k


@dataclass(frozen=True)
class TopNeurons:
    """The k FFN neurons with the largest log-probability increase on one prompt, best first.

    ``certified``: every neuron not scored exactly has a first-order bound below the k-th score, so this is the
    exact top k (always True in exact mode). ``rescored``: neurons scored exactly. ``threshold``: the k-th score.
    """

    neurons: Int[Tensor, "k 2"]
    scores: Float[Tensor, " k"]
    certified: bool
    rescored: int
    threshold: float

    def to_list(self) -> list[list[Any]]:
        return [[int(a), int(b), float(s)] for (a, b), s in zip(self.neurons.tolist(), self.scores.tolist())]

    def _repr_html_(self) -> str:
        from ..neurons import NeuronSet

        head = (f"top {len(self.scores)} ({'certified' if self.certified else 'not certified'}, "
                f"{self.rescored} rescored exactly, k-th score {self.threshold:.4g})")
        return f"<b>TopNeurons</b> {head}" + NeuronSet(self.to_list())._repr_html_()


def top_from_scores(scores: Float[Tensor, "layer d_mlp"], k: int, layers: Sequence[int] | None = None) -> TopNeurons:
    """The top k of a full score table (certified: every neuron was scored); row j is layer ``layers[j]``
    (default: row j is layer j)."""
    dm = scores.shape[1]
    vals, idx = torch.topk(scores.flatten(), k)
    rows = idx // dm
    if layers is not None:
        rows = torch.as_tensor(list(layers), dtype=torch.long, device=idx.device)[rows]
    neurons = torch.stack([rows, idx % dm], dim=1)
    return TopNeurons(neurons, vals, True, int(scores.numel()), float(vals[-1]))


def _first_order(cache: LensCache, W_out: Float[Tensor, "layer d_mlp d_model"]) -> tuple[Tensor, Tensor, Tensor]:
    """Per prompt and layer: base logits, their lse, and each neuron's tangent bound a_i W_out[l, i] · g_l."""
    base = cache.base_logits()
    base_lse = torch.logsumexp(base, -1)
    S = torch.exp(base - base_lse[..., None])
    S[torch.arange(cache.size), :, cache.targets] -= 1.0  # softmax - onehot(w)
    G = -(S @ cache.lens.U.T)  # [B, L, d]: U (onehot - softmax)
    ub = cache.coefficients * torch.einsum("lid,bld->bli", W_out, G)
    return base, base_lse, ub


def top_bound(
    cache: LensCache, W_out: Float[Tensor, "layer d_mlp d_model"], k: int, cfg: LensConfig,
    groups: Sequence[Sequence[int]] | None = None, layers: Sequence[int] | None = None,
) -> list[TopNeurons]:
    """Exact top k per group of prompts (default: each prompt alone) by the score averaged over the group.

    The group mean of the tangent bounds bounds the group mean of the exact scores, so neurons are rescored (on
    every prompt of the group) in decreasing order of the mean bound until the k-th best exact mean is above
    every remaining bound. All groups advance together: each round is one batched rescoring.

    Args:
        cache: ``lens_cache`` of the prompts.
        W_out: ``scoring_weights(model, prompts)``.
        k: neurons per group (at most the candidates' count).
        cfg: ``max_rescore`` (past it a group stops, uncertified).
        groups: lists of prompt rows of ``cache``.
        layers: the candidates are these distinct layers' neurons (default: every layer; ``layer_subset``).

    Returns:
        One ``TopNeurons`` per group (on the CPU), with the model's layer numbers.
    """
    base, base_lse, ub = _first_order(cache, W_out)
    dm = W_out.shape[1]
    # Candidates are numbered by position in the subset; sel maps a position back to its real layer, which is
    # what W_out, the coefficients and the base logits are indexed by.
    sel = torch.arange(W_out.shape[0], device=W_out.device) if layers is None else \
        torch.as_tensor(list(layers), dtype=torch.long, device=W_out.device)
    ub = ub[:, sel]
    groups = [[b] for b in range(cache.size)] if groups is None else [list(g) for g in groups]
    G = len(groups)
    a = cache.coefficients[:, sel].flatten(1)
    flat_ub = torch.stack([ub.flatten(1)[g].mean(0) for g in groups])  # [G, layer * d_mlp]
    zero = torch.stack([(a[g] == 0).all(0) for g in groups])  # silent on every prompt: exactly 0, never rescored
    order = torch.argsort(torch.where(zero, torch.full_like(flat_ub, -math.inf), flat_ub), dim=1, descending=True)
    n_live = (~zero).sum(1).tolist()
    n_zero = [int(z) for z in zero.sum(1).tolist()]
    got_idx: list[list[Tensor]] = [[] for _ in range(G)]
    got_val: list[list[Tensor]] = [[] for _ in range(G)]
    done, certified, n = [False] * G, [False] * G, [0] * G
    step = max(2 * k, 16)
    while not all(done):
        todo = [gi for gi in range(G) if not done[gi]]
        takes = [order[gi, n[gi] : min(n[gi] + step, n_live[gi])] for gi in todo]
        members = [torch.tensor(groups[gi], device=W_out.device) for gi in todo]
        rows = torch.cat([m.repeat(t.numel()) for m, t in zip(members, takes)])
        flat = torch.cat([t.repeat_interleave(m.numel()) for m, t in zip(members, takes)])
        vals = score_triples(cache, W_out, rows, sel[flat // dm], flat % dm, base, base_lse)
        offset = 0
        for gi, m, t in zip(todo, members, takes):
            size = t.numel() * m.numel()
            got_idx[gi].append(t)
            got_val[gi].append(vals[offset : offset + size].view(t.numel(), m.numel()).mean(1))
            offset += size
            n[gi] += int(t.numel())
            if n[gi] >= n_live[gi]:
                done[gi] = certified[gi] = True
                continue
            if n[gi] + n_zero[gi] >= k:
                kth = _kth(torch.cat(got_val[gi]), n_zero[gi], k)
                nxt = float(flat_ub[gi, order[gi, n[gi]]])
                if kth >= nxt + 1e-6 * (1.0 + abs(nxt)):
                    done[gi] = certified[gi] = True
                    continue
            if n[gi] >= cfg.max_rescore:
                done[gi] = True
        step *= 2
    out = []
    for gi in range(G):
        silent = torch.nonzero(zero[gi])[:k, 0]  # silent neurons score exactly 0 and may belong in the top k
        idx = torch.cat(got_idx[gi] + [silent])
        vals = torch.cat(got_val[gi] + [torch.zeros(silent.numel(), device=W_out.device)])
        top_v, top_i = torch.topk(vals, k)
        f = idx[top_i]
        out.append(TopNeurons(torch.stack([sel[f // dm], f % dm], 1).cpu(), top_v.cpu(), certified[gi], n[gi],
                              float(top_v[-1])))
    return out


def _kth(vals: Tensor, n_zero: int, k: int) -> float:
    allv = torch.cat([vals, torch.zeros(min(n_zero, k), device=vals.device)])
    return float(torch.topk(allv, min(k, int(allv.numel()))).values[-1])


def top_neurons(
    model: HookedModel, prompts: Sequence[Prompt], k: int = 10, cfg: LensConfig = LensConfig(mode="topk"),
    *, layers: Sequence[int] | None = None,
) -> list[TopNeurons]:
    """The top-k FFN neurons of each prompt by log-probability increase (``cfg.mode``: exact or topk).

    Args:
        model: a TransformerLens model.
        prompts: each gets its own top k.
        k: neurons per prompt (1 to all the candidates).
        cfg: ``mode="topk"`` (bound and exact rescoring, certified) or ``"exact"`` (score every neuron).
        layers: only these layers' neurons are candidates (default: all); the result is the exact top k among
            them, certified in topk mode, with the model's layer numbers.

    Returns:
        One ``TopNeurons`` per prompt, best first.

    Example:
        >>> top = top_neurons(model, prompts, k=10)                              # doctest: +SKIP
        >>> top[0].certified, top[0].to_list()[:1]    # [[layer, neuron, score]] # doctest: +SKIP
        >>> top_neurons(model, prompts, k=10, layers=[5, 17])                    # doctest: +SKIP
    """
    W_out = scoring_weights(model, prompts)
    chosen, dm = layer_subset(model, layers), d_mlp(model)
    n = len(chosen) * dm
    if not 1 <= k <= n:
        what = "all neurons" if layers is None else f"all neurons of layers {chosen}"
        raise QrncaError(f"k must be between 1 and {n} ({what}), got {k}")
    if cfg.mode == "exact":
        return [top_from_scores(s, k, chosen) for s in neuron_scores(model, prompts, cfg, layers=chosen)]
    out: list[TopNeurons] = []
    with torch.no_grad():
        for _, batch in batches(prompts, cfg.batch_size):
            out += top_bound(lens_cache(model, batch, check_tol=cfg.check_tol), W_out, k, cfg, layers=chosen)
    return out
