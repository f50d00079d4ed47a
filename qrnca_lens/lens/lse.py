"""The per-neuron log-sum-exp engine: pure tensor functions, no model.

A neuron i of one layer changes the lens logits of a "before" vector by a_i · P_i, so its score needs
Δ_i = lse(L_b + a_i P_i) - lse(L_b) per prompt. Two engines compute it:

- ``"direct"``: one logsumexp per neuron and prompt (the textbook floor: prompts x neurons x vocab exps).
- ``"series"`` (default): with P_i = c_i + R_i Y_i (|Y_i| <= 1, c_i/R_i the row's mid-range/half-range),
  Δ_i = a_i c_i + log Σ_n (a_i R_i)^n E_b[Y_i^n] / n!, where the moments E_b[Y^n] = Y^n · softmax(L_b) are
  matrix products shared by the whole batch of prompts. The truncation after N terms is bounded by
  ρ^(N+1) e^(2ρ) / (N+1)! relative (ρ = |a_i| R_i), and N is chosen so the bound is below ``series_tol``.
  (prompt, neuron) pairs with ρ > ``series_radius`` go through the direct logsumexp.

Example:
    >>> scores = layer_neuron_scores(W_out[l], lens.U, base, coef, targets, LensConfig())   # doctest: +SKIP
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .config import LensConfig

__all__ = ["BLOCK", "lse_", "delta_lse", "layer_neuron_scores"]

BLOCK = 256  # rows per direct log-sum-exp (bounds the temporaries to 256 x vocab floats)


def _series_order(rho: float, tol: float) -> int:
    """Smallest N with rho^(N+1) e^(2 rho) / (N+1)! <= tol (the series' relative truncation bound)."""
    if rho <= 0.0:
        return 0
    n, log_bound = 0, math.log(rho) + 2 * rho  # log of rho^(n+1) e^(2 rho) / (n+1)! for n = 0
    while log_bound > math.log(tol):
        n += 1
        log_bound += math.log(rho) - math.log(n + 1)
        if n > 200:  # pragma: no cover - series_radius is validated
            break
    return n


def lse_(X: Tensor) -> Tensor:
    """log-sum-exp over the last dimension, computed in place (X is overwritten: no second vocab-wide temporary)."""
    m = X.amax(-1, keepdim=True)
    return X.sub_(m).exp_().sum(-1).log_() + m[..., 0]


def delta_lse(
    P: Float[Tensor, "c vocab"],
    base: Float[Tensor, "k vocab"],
    base_lse: Float[Tensor, " k"],
    coef: Float[Tensor, "k c"],
    *,
    engine: str,
    radius: float,
    tol: float,
    weights: Float[Tensor, "k vocab"] | None = None,
) -> tuple[Float[Tensor, "k c"], Float[Tensor, " c"]]:
    """Δ[k, i] = lse(base_k + coef[k, i] P_i) - lse(base_k) - coef[k, i] mid_i, in float64, and mid.

    The row's mid-range ``mid_i`` is split off so that a caller's ``coef · (P_iw - mid_i) - Δ`` loses no
    precision to the cancellation of two large terms.

    Args:
        P: the rows P_i = W_out[l, i] U of a chunk of neurons.
        base, base_lse: the lens logits of each prompt's "before" vector and their log-sum-exp.
        coef: a = m / s per prompt and neuron.
        engine, radius, tol: ``LensConfig.engine``, ``.series_radius``, ``.series_tol``.
        weights: softmax(base), if the caller has it.

    Returns:
        (Δ [k, c] float64, mid [c]).
    """
    lo, hi = torch.aminmax(P, dim=1)
    mid = (hi + lo) / 2
    K, C = coef.shape
    out = torch.empty(K, C, dtype=torch.float64, device=P.device)
    mid64 = mid.double()
    if engine == "direct":  # one log-sum-exp per prompt and row, the whole chunk at once
        for k in range(K):
            X = torch.addcmul(base[k], coef[k, :, None], P)
            out[k] = lse_(X).double() - float(base_lse[k]) - coef[k].double() * mid64
        return out, mid
    R = (hi - lo) / 2
    t = coef * R[None]
    small = t.abs() <= radius
    if bool(small.any()):
        rho = float(t.abs()[small].max())
        order = _series_order(rho, tol)
        series = torch.ones(K, C, dtype=torch.float64, device=P.device)
        if order > 0:
            S = torch.exp(base - base_lse[:, None]) if weights is None else weights
            Rs = torch.where(R > 0, R, torch.ones_like(R))
            Y = torch.addcmul((-mid / Rs)[:, None], P, (1.0 / Rs)[:, None])  # (P - mid) / R, in [-1, 1]
            Z = Y
            term = torch.ones(K, C, dtype=torch.float64, device=P.device)
            t64 = t.double()
            for n in range(1, order + 1):
                if n == 2:
                    Z = Y * Y
                elif n > 2:
                    Z.mul_(Y)
                term = term * t64 / n
                series += term * (S @ Z.T).double()  # the n-th moment of Y under each base's softmax
        out[:] = torch.log(series)
    ks, cs = torch.nonzero(~small, as_tuple=True)  # rows outside the radius: a direct log-sum-exp each
    for first in range(0, int(ks.numel()), BLOCK):
        rows, c = ks[first : first + BLOCK], cs[first : first + BLOCK]
        X = torch.addcmul(base[rows], coef[rows, c][:, None], P[c])
        out[rows, c] = lse_(X).double() - base_lse[rows].double() - coef[rows, c].double() * mid64[c]
    return out, mid


def layer_neuron_scores(
    W_l: Float[Tensor, "d_mlp d_model"], U: Float[Tensor, "d_model vocab"], base: Float[Tensor, "k vocab"],
    coef: Float[Tensor, "k d_mlp"], targets: Int[Tensor, " k"], cfg: LensConfig,
) -> Float[Tensor, "k d_mlp"]:
    """log p(w | b + a_i W_out[l, i]) - log p(w | b) for every neuron of one layer and every prompt k.

    Args:
        W_l: W_out[l], the layer's value vectors.
        U: the frozen lens' ``U``.
        base: the lens logits of each prompt's resid_mid[l].
        coef: a = m / s of the layer's neurons per prompt.
        targets: each prompt's target token w.
        cfg: ``chunk`` (neurons per product W_l[chunk] · U) and the engine settings.

    Returns:
        The exact scores, float32 [k, d_mlp].

    Example:
        >>> c = lens_cache(model, prompts)                                                   # doctest: +SKIP
        >>> layer_neuron_scores(W_out[0], c.lens.U, c.layer_logits(0), c.coefficients[:, 0],
        ...                     c.targets, LensConfig(engine="direct"))                      # doctest: +SKIP
    """
    base_lse = torch.logsumexp(base, -1)
    weights = torch.exp(base - base_lse[:, None])
    out = torch.empty(coef.shape, dtype=torch.float32, device=coef.device)
    for c0 in range(0, W_l.shape[0], cfg.chunk):
        c1 = min(c0 + cfg.chunk, W_l.shape[0])
        P = W_l[c0:c1] @ U
        delta, mid = delta_lse(P, base, base_lse, coef[:, c0:c1], engine=cfg.engine, radius=cfg.series_radius,
                               tol=cfg.series_tol, weights=weights)
        Pw = (P[:, targets].T - mid[None]).double()  # [k, c]: each prompt's own target column
        out[:, c0:c1] = (coef[:, c0:c1].double() * Pw - delta).float()
    return out
