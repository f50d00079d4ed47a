"""The paper's comparison: the log-probability increase against 7 static alternatives, judged by ablation.

``baseline_scores`` computes all 8 scores of every FFN neuron; ``ablation_metrics`` zeroes chosen neurons at
the target position and reads the model's rank, probability and log-probability of the target;
``compare_methods`` ablates each score's top k against random neurons; ``comparison_report`` makes the table a
JSON document.

Example:
    >>> rows = compare_methods(model, prompts, k=10)                             # doctest: +SKIP
    >>> json.dumps(comparison_report(model, rows))                               # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..data.prompts import Prompt
from ..errors import QrncaError
from ..model.access import d_mlp, model_device, model_dtype, model_name, n_layers, post_hook_name
from ..model.hooks import hooked
from ..model.readout import StopForward, final_residual_hook, head32
from ..protocols import HookedModel
from ..versions import library_versions, model_identity
from .cache import HALF, batches, check_prompts, lens_cache, padded, scoring_weights
from .config import LensConfig
from .lse import delta_lse

__all__ = ["BASELINES", "baseline_scores", "ablation_metrics", "compare_methods", "comparison_report"]

# The paper's score first, then its 7 alternatives (see ``baseline_scores``).
BASELINES = (
    "log_prob_increase",
    "prob_increase",
    "log_prob_alone",
    "norm",
    "coefficient",
    "rank",
    "coef_x_norm",
    "coef_x_rank",
)


def baseline_scores(
    model: HookedModel, prompts: Sequence[Prompt], cfg: LensConfig = LensConfig(),
) -> dict[str, Float[Tensor, "prompt layer d_mlp"]]:
    """The paper's score and its 7 static alternatives for every FFN neuron (higher = more important).

    With a_i = m_i / s, P_i = W_out[l, i] U the neuron's row through the frozen lens, b = resid_mid[l] (with a
    post-MLP norm, W_out[l, i] carries its gain and a_i its frozen 1/s_l, see ``ffn_out``):

    - ``log_prob_increase``: log p(w | b + v) - log p(w | b) (the method).
    - ``prob_increase``: p(w | b + v) - p(w | b).
    - ``log_prob_alone``: log p(w | lens(v)), the lens of v alone (W_U norm(v) + b_U, scale frozen).
    - ``norm``: ||W_out[l, i]|| (mean-removed for LayerNorm), the norm of the neuron's value vector; the norm of
      v itself is ``coef_x_norm`` (|m_i| norm, divided by the frozen scale of a post-MLP norm).
    - ``coefficient``: |m_i|.
    - ``rank``: 1 / rank of w in v's projection a_i P_i, rank = #{u : a_i P_iu >= a_i P_iw} (1 = w on top; ties
      count against w, so a silent neuron ranks last).
    - ``coef_x_norm``: |m_i| · norm = ||v||.
    - ``coef_x_rank``: |m_i| / rank (a large coefficient and a high rank of w both raise it).

    Args:
        model: a TransformerLens model.
        prompts: scored at their target positions.
        cfg: engine, chunk and batch settings.

    Returns:
        Score name (``BASELINES``) -> scores [prompt, layer, d_mlp] (float32, on the CPU).

    Example:
        >>> baseline_scores(model, prompts)["rank"].shape                        # doctest: +SKIP
    """
    W_out = scoring_weights(model, prompts)
    L, dm = n_layers(model), d_mlp(model)
    out = {k: torch.empty(len(prompts), L, dm) for k in BASELINES}
    with torch.no_grad():
        for start, batch in batches(prompts, cfg.batch_size):
            c = lens_cache(model, batch, check_tol=cfg.check_tol)
            sl = slice(start, start + len(batch))
            base_all = c.base_logits()
            a_all = c.coefficients
            B, V = c.size, base_all.shape[-1]
            for layer in range(L):
                base = base_all[:, layer]
                base_lse = torch.logsumexp(base, -1)
                base_lp = base[torch.arange(B), c.targets] - base_lse
                alone = c.lens.c[None].expand(B, -1)  # lens(v) = W_U norm(v) + b_U: only the constant part
                alone_lse = torch.logsumexp(alone, -1)
                alone_lp = alone[torch.arange(B), c.targets] - alone_lse
                for c0 in range(0, dm, cfg.chunk):
                    c1 = min(c0 + cfg.chunk, dm)
                    a = a_all[:, layer, c0:c1]
                    P = W_out[layer, c0:c1] @ c.lens.U
                    Pw = P[:, c.targets].T  # [B, C]
                    # one series for both bases (resid_mid[l] and the lens constant): the powers of P are shared
                    both, mid = delta_lse(P, torch.cat([base, alone]), torch.cat([base_lse, alone_lse]),
                                          torch.cat([a, a]), engine=cfg.engine, radius=cfg.series_radius,
                                          tol=cfg.series_tol)
                    d_inc, d_alone = both[:B], both[B:]
                    centered_pw = (Pw - mid[None]).double()
                    inc = a.double() * centered_pw - d_inc
                    out["log_prob_increase"][sl, layer, c0:c1] = inc.float().cpu()
                    out["prob_increase"][sl, layer, c0:c1] = (
                        torch.exp(base_lp.double()[:, None] + inc) - torch.exp(base_lp.double())[:, None]).float().cpu()
                    out["log_prob_alone"][sl, layer, c0:c1] = (
                        alone_lp.double()[:, None] + a.double() * centered_pw - d_alone).float().cpu()
                    rank = torch.empty(B, c1 - c0, device=P.device)
                    for w in torch.unique(c.targets).tolist():  # #{u: P_u >= P_w} and #{u: P_u <= P_w}, per target
                        col = P[:, w : w + 1]
                        ge, le = (P >= col).sum(1).float(), (P <= col).sum(1).float()
                        for b in torch.nonzero(c.targets == w)[:, 0].tolist():
                            rank[b] = torch.where(a[b] > 0, ge, torch.where(a[b] < 0, le, torch.full_like(ge, float(V))))
                    out["rank"][sl, layer, c0:c1] = (1.0 / rank).cpu()
            m = c.post.abs()
            norm = c.lens.center(W_out).norm(dim=-1)  # [L, d_mlp]
            out["norm"][sl] = norm.cpu()[None].expand(len(batch), -1, -1)
            out["coefficient"][sl] = m.cpu()
            out["coef_x_norm"][sl] = (c.writes.abs() * norm[None]).cpu()  # ||v||: m, times 1/s of a post-norm
            out["coef_x_rank"][sl] = m.cpu() * out["rank"][sl]
    return out


def _ablation_hooks(model: HookedModel, neurons: Sequence[Tensor], pos: Tensor) -> list[tuple[str, Any]]:
    """Hooks zeroing each prompt's neurons in ``hook_post`` at its target position."""
    by_layer: dict[int, tuple[list[int], list[int], list[int]]] = {}
    for row, ns in enumerate(neurons):
        for layer, i in torch.as_tensor(ns).reshape(-1, 2).tolist():
            r, p, n = by_layer.setdefault(int(layer), ([], [], []))
            r.append(row)
            p.append(int(pos[row]))
            n.append(int(i))
    hooks = []
    for layer, (r, p, n) in sorted(by_layer.items()):
        idx = (torch.tensor(r, device=pos.device), torch.tensor(p, device=pos.device), torch.tensor(n, device=pos.device))

        def zero(act: Tensor, hook: Any, idx: tuple[Tensor, Tensor, Tensor] = idx) -> Tensor:
            out = act.clone()
            out[idx] = 0.0
            return out

        hooks.append((post_hook_name(model, layer), zero))
    return hooks


def _target_logits(model: HookedModel, ids: Tensor, rows: Tensor, pos: Tensor) -> Float[Tensor, "batch vocab"]:
    """The model's logits at each row's target, float32. A half-precision model's come from its final residual
    through ``head32`` (a bfloat16 logit near |31| is rounded to steps of 0.125: ranks would tie)."""
    if model_dtype(model) not in HALF:
        return model(ids)[rows, pos].float()
    store: dict[str, Tensor] = {}

    def stop(act: Tensor, hook: Any) -> Tensor:
        store["resid"] = act[rows, pos]
        raise StopForward

    with hooked(model, fwd=[(final_residual_hook(model), stop)]):
        try:
            model(ids)
        except StopForward:
            pass
    return head32(model, store["resid"])


def ablation_metrics(
    model: HookedModel, prompts: Sequence[Prompt], neurons: Sequence[Tensor] | None = None, *, batch_size: int = 16,
) -> dict[str, Float[Tensor, " prompt"]]:
    """The model's reciprocal rank, probability and log-probability of each prompt's (first) target token, with
    ``neurons[p]`` ((layer, neuron) pairs) zeroed in ``hook_post`` at prompt p's target position (none: clean).

    rank = 1 + #{tokens with a strictly larger logit}.

    Args:
        model: a TransformerLens model.
        prompts: the prompts.
        neurons: one [n, 2] set per prompt, or None for the clean model.
        batch_size: prompts per forward pass.

    Returns:
        ``{"rr", "prob", "logprob"}`` -> values [prompt] (on the CPU).

    Example:
        >>> ablation_metrics(model, prompts, [torch.tensor([[0, 1]])] * len(prompts))["rr"]   # doctest: +SKIP
    """
    scoring_weights(model, prompts)
    if neurons is not None and len(neurons) != len(prompts):
        raise QrncaError(f"neurons must hold one set per prompt ({len(prompts)}), got {len(neurons)}")
    device = model_device(model)
    res: dict[str, list[Tensor]] = {"rr": [], "prob": [], "logprob": []}
    with torch.no_grad():
        for start, batch in batches(prompts, batch_size):
            check_prompts(model, batch)
            ids, pos, targets = padded(batch, device)
            rows = torch.arange(len(batch), device=device)
            hooks = [] if neurons is None else _ablation_hooks(model, neurons[start : start + len(batch)], pos)
            with hooked(model, fwd=hooks):
                logits = _target_logits(model, ids, rows, pos)
            lp = torch.log_softmax(logits, -1)
            tl = logits[rows, targets]
            rank = 1 + (logits > tl[:, None]).sum(-1)
            res["rr"].append((1.0 / rank.float()).cpu())
            res["logprob"].append(lp[rows, targets].cpu())
            res["prob"].append(lp[rows, targets].exp().cpu())
    return {k: torch.cat(v) for k, v in res.items()}


def _top_sets(scores: Float[Tensor, "prompt layer d_mlp"], k: int) -> list[Tensor]:
    dm = scores.shape[2]
    out = []
    for s in scores:
        idx = torch.topk(s.flatten(), k).indices
        out.append(torch.stack([idx // dm, idx % dm], 1))
    return out


def compare_methods(
    model: HookedModel, prompts: Sequence[Prompt], *, k: int = 10, seed: int = 0, random_repeats: int = 3,
    cfg: LensConfig = LensConfig(),
) -> list[dict[str, Any]]:
    """The paper's comparison: ablate each score's top-k neurons per prompt, against random neurons.

    One row per method (``BASELINES``, then ``"random"``): the mean over prompts of the reciprocal rank (MRR),
    probability and log-probability of the target before and after zeroing the k neurons at the target position,
    and the drops (before - after; larger = the neurons mattered more). Random neurons are k distinct neurons per
    prompt drawn with a ``torch.Generator`` seeded with ``seed`` (the global RNG is untouched), averaged over
    ``random_repeats`` draws.

    Args:
        model: a TransformerLens model.
        prompts: the prompts.
        k: neurons ablated per prompt.
        seed: seed of the random draws.
        random_repeats: random draws averaged.
        cfg: settings of ``baseline_scores``; its ``batch_size`` is the ablation's too.

    Returns:
        One dict per method: ``method, k, n_prompts`` and ``{mrr,prob,logprob}_{before,after,drop}``.

    Example:
        >>> [r["method"] for r in compare_methods(model, prompts, k=5)][-1]      # doctest: +SKIP
        'random'
    """
    scoring_weights(model, prompts)
    L, dm = n_layers(model), d_mlp(model)
    if not 1 <= k <= L * dm:
        raise QrncaError(f"k must be between 1 and {L * dm}, got {k}")
    if random_repeats < 1:
        raise QrncaError(f"random_repeats must be at least 1, got {random_repeats}")
    scores = baseline_scores(model, prompts, cfg)
    before = ablation_metrics(model, prompts, None, batch_size=cfg.batch_size)
    rows = []

    def row(method: str, after: dict[str, Tensor]) -> dict[str, Any]:
        r: dict[str, Any] = {"method": method, "k": k, "n_prompts": len(prompts)}
        for name, key in (("mrr", "rr"), ("prob", "prob"), ("logprob", "logprob")):
            b, a = float(before[key].mean()), float(after[key].mean())
            r.update({f"{name}_before": b, f"{name}_after": a, f"{name}_drop": b - a})
        return r

    for method in BASELINES:
        rows.append(row(method, ablation_metrics(model, prompts, _top_sets(scores[method], k), batch_size=cfg.batch_size)))
    g = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(random_repeats):
        sets = []
        for _p in prompts:
            idx = torch.randperm(L * dm, generator=g)[:k]
            sets.append(torch.stack([idx // dm, idx % dm], 1))
        draws.append(ablation_metrics(model, prompts, sets, batch_size=cfg.batch_size))
    rows.append(row("random", {key: torch.stack([d[key] for d in draws]).mean(0) for key in draws[0]}))
    return rows


def comparison_report(model: HookedModel, rows: list[dict[str, Any]], *, seed: int = 0, name: str | None = None) -> dict[str, Any]:
    """The comparison table as a JSON-ready document (``json.dumps(comparison_report(...))``)."""
    return {
        "model": name or model_name(model),
        "versions": library_versions(),
        "model_identity": model_identity(model),
        "metric": "ablate each score's top-k FFN neurons (hook_post zeroed at the target position); drops in MRR, "
                  "probability and log-probability of the target token, averaged over prompts",
        "seed": seed,
        "rows": rows,
    }
