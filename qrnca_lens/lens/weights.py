"""What the lens reads from a model's weights: the frozen lens, the FFN output and key weights, head constants.

Every weight is read here, as float32; the other modules see only the public functions below (a model that
lacks a weight is refused with a ``ModelError`` naming it).

Example:
    >>> lens = frozen_lens(model)                          # lens(x) = (x / s) · U + c   # doctest: +SKIP
    >>> keys = value_keys(model, 1, 5)                     # {"up": κ, "gate": κ} for a GLU  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import ModelError, QrncaError
from ..model.access import block, blocks, d_mlp, final_norm, is_gated, model_device, model_name, n_layers
from ..protocols import HookedModel

__all__ = ["FrozenLens", "Weights", "frozen_lens", "ffn_out", "gain_offset", "post_norm_gains", "value_constants",
           "value_keys"]


def _param(obj: Any, name: str) -> Tensor | None:
    """A weight of a TL model, or None when it does not exist (bridges raise for bias-free projections)."""
    try:
        value = getattr(obj, name)
    except (AttributeError, RuntimeError, TypeError):
        return None
    return value if isinstance(value, Tensor) else None


def _centers(model: HookedModel, norm: Any) -> bool:
    """Whether a norm module removes the mean (LayerNorm, LNPre) rather than only scaling (RMSNorm)."""
    if "RMS" in type(norm).__name__:
        return False
    return str(getattr(model.cfg, "normalization_type", "") or "").startswith("LN")


def gain_offset(model: HookedModel, norm: Any) -> float:
    """1.0 where the norm scales by ``1 + w`` (Gemma's RMSNorm, transformers' ``Gemma3RMSNorm``), else 0.0.

    TL's bridge keeps the checkpoint's raw ``w`` and says so on the norm (``uses_weight_offset``) and in its cfg
    (``rmsnorm_uses_offset``); a TL 3.x HookedTransformer has already added the 1 to ``w`` when it converted the
    weights (and has neither flag).

    Example:
        >>> gain_offset(model, model.ln_final)            # 1.0 on a Gemma bridge   # doctest: +SKIP
    """
    flag = getattr(norm, "uses_weight_offset", None)
    if flag is None:
        flag = getattr(model.cfg, "rmsnorm_uses_offset", False)
    return 1.0 if bool(flag) else 0.0


def _norm_affine(model: HookedModel, norm: Any, d: int, device: torch.device) -> tuple[Tensor, Tensor, bool]:
    """(w, b, centred) of a norm module: norm(x) = w ⊙ C(x) / s + b, w the effective gain (``1 + w`` for Gemma).
    Folded norms (LNPre) have w = 1, b = 0."""
    w = _param(norm, "w")
    b = _param(norm, "b")
    w = torch.ones(d, device=device) if w is None else w.detach().float() + gain_offset(model, norm)
    b = torch.zeros(d, device=device) if b is None else b.detach().float()
    return w, b, _centers(model, norm)


def _expand_heads(t: Tensor, n_heads: int) -> Tensor:
    """Grouped-query weights [layer, kv_head, ...] -> [layer, head, ...] (TL 3 already expands them)."""
    if t.shape[1] == n_heads:
        return t
    return t.repeat_interleave(n_heads // t.shape[1], dim=1)


class Weights:
    """The weights the lens reads, as float32 on the model's device, each read once per call.

    Example:
        >>> W_O = Weights(model).per_head("W_O")            # [layer, head, d_head, d_model]  # doctest: +SKIP
    """

    def __init__(self, model: HookedModel) -> None:
        self.model = model
        self._cache: dict[str, Tensor | None] = {}

    def get(self, name: str) -> Tensor | None:
        """The weight ``name`` (detached float32), or None when the model has none."""
        if name not in self._cache:
            t = _param(self.model, name)
            self._cache[name] = None if t is None else t.detach().float()
        return self._cache[name]

    def need(self, name: str) -> Tensor:
        """The weight ``name``; a ``ModelError`` when the model has none."""
        t = self.get(name)
        if t is None:
            raise ModelError(f"{model_name(self.model)} has no {name} weights; the lens needs them")
        return t

    def bias(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """The bias ``name``, or zeros of ``shape`` (a bias-free projection adds nothing)."""
        t = self.get(name)
        return torch.zeros(shape, device=model_device(self.model)) if t is None else t

    def per_head(self, name: str) -> Tensor:
        """A per-head weight [layer, head, ...], grouped-query key/value heads repeated to every query head."""
        return _expand_heads(self.need(name), int(self.model.cfg.n_heads))


# ---------------------------------------------------------------- the frozen lens


@dataclass(frozen=True)
class FrozenLens:
    """lens(x) = (x / s) · U + c, with U = C diag(w) W_U (C: mean removal for LayerNorm) and c = b·W_U + b_U."""

    U: Float[Tensor, "d_model vocab"]
    c: Float[Tensor, " vocab"]
    centered: bool

    def logits(self, x: Float[Tensor, "*batch d_model"], scale: Float[Tensor, "*batch"]) -> Float[Tensor, "*batch vocab"]:
        return (x / scale[..., None]) @ self.U + self.c

    def center(self, v: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_model"]:
        """What the final norm sees of a vector: mean-removed for LayerNorm, unchanged for RMSNorm."""
        return v - v.mean(-1, keepdim=True) if self.centered else v


def _softcap(model: HookedModel) -> float | None:
    """The final logit soft-cap (TL's ``output_logits_soft_cap``, or the checkpoint's ``final_logit_softcapping``)."""
    caps = [getattr(model.cfg, "output_logits_soft_cap", None)]
    hf = getattr(getattr(model, "original_model", None), "config", None)
    caps.append(getattr(getattr(hf, "text_config", hf), "final_logit_softcapping", None))
    return next((float(c) for c in caps if c is not None and float(c) > 0), None)


def frozen_lens(model: HookedModel) -> FrozenLens:
    """The final norm and unembedding of ``model`` as an affine map of x / s (s is supplied per prompt).

    Args:
        model: a TransformerLens model (HookedTransformer or TransformerBridge).

    Returns:
        The ``FrozenLens`` (U, c, centered), float32 on the model's device.

    Example:
        >>> lens = frozen_lens(model)                                   # doctest: +SKIP
        >>> lens.logits(final, scale)             # [batch, vocab]      # doctest: +SKIP
    """
    cap = _softcap(model)
    if cap is not None:
        raise ModelError(
            f"{model_name(model)} soft-caps its logits (cap * tanh(logits / cap), cap = {cap:g}); the "
            "log-probability lens needs logits affine in the final residual. Use a model without final logit "
            "soft-capping (attention soft-capping is fine)"
        )
    W_U = _param(model, "W_U")
    if W_U is None:
        raise ModelError(f"{model_name(model)} has no W_U (unembedding); the lens projects onto the vocabulary with it")
    W_U = W_U.detach().float()
    d = W_U.shape[0]
    device = W_U.device
    w, b, centered = _norm_affine(model, final_norm(model), d, device)
    U = w[:, None] * W_U
    if centered:
        U = U - U.mean(0, keepdim=True)
    b_U = _param(model, "b_U")
    c = b @ W_U + (b_U.detach().float() if b_U is not None else 0.0)
    return FrozenLens(U.contiguous(), c, centered)


# ---------------------------------------------------------------- FFN and attention weights


def ffn_out(model: HookedModel) -> Float[Tensor, "layer d_mlp d_model"]:
    """W_out as float32: each FFN neuron's value vector as it reaches the residual stream.

    With a post-MLP norm (Gemma) that is W_out[l, i] ⊙ w_eff[l] (``post_norm_gains``); the norm's frozen 1/s
    is per prompt and goes into the neuron's coefficient (``LensCache.coefficients``).
    """
    W_out = _param(model, "W_out")
    if W_out is None:
        raise ModelError(f"{model_name(model)} exposes no W_out; the lens needs the FFN output weights")
    W_out = W_out.detach().float()
    gains = post_norm_gains(model, "mlp")
    return W_out if gains is None else W_out * gains.to(W_out.device)[:, None, :]


def post_norm_gains(model: HookedModel, which: str) -> Float[Tensor, "layer d_model"] | None:
    """The effective gain of each block's norm on its MLP (``which="mlp"``) or attention (``"attn"``) output.

    Gemma-style blocks normalise a sublayer's output before adding it to the residual: write = w ⊙ y / s with
    s = rms(y) frozen from the real forward (``LensCache.mlp_scale``/``attn_scale``), so a neuron's write
    m_i W_out[l, i] reaches the residual as (m_i / s) (W_out[l, i] ⊙ w). Returns None for a model without such
    norms; refuses (``ModelError``) a post-norm that centres or has a bias (not a scaling).

    Example:
        >>> post_norm_gains(model, "mlp").shape            # [layer, d_model] on Gemma   # doctest: +SKIP
    """
    attr = {"mlp": "ln2_post", "attn": "ln1_post"}[which]
    norms = [getattr(block, attr, None) for block in blocks(model)]
    if all(n is None for n in norms):
        return None
    if any(n is None for n in norms):
        raise ModelError(f"{model_name(model)} has {attr} on some blocks only; the lens needs it on all or none")
    d = int(model.cfg.d_model)
    device = model_device(model)
    gains = []
    for n in norms:
        w, b, centred = _norm_affine(model, n, d, device)
        if centred or bool(b.abs().max() > 0):
            raise ModelError(f"{model_name(model)}'s {attr} centres or shifts its input (a LayerNorm); the lens "
                             "supports post-norms that only scale (RMSNorm)")
        gains.append(w)
    return torch.stack(gains)


def value_constants(model: HookedModel, weights: Weights) -> Float[Tensor, "layer head d_head"]:
    """Each head's constant value share: ln1's bias through W_V plus b_V (zero once TL folded them into b_O)."""
    H = int(model.cfg.n_heads)
    W_V = weights.per_head("W_V")  # [L, H, d, e]
    L, _, d, e = W_V.shape
    const = _expand_heads(weights.bias("b_V", (L, H, e)), H).clone()
    for layer in range(L):
        b1 = _param(block(model, layer).ln1, "b")
        if b1 is not None:
            const[layer] += torch.einsum("d,hde->he", b1.detach().float(), W_V[layer])
    return const


def value_keys(model: HookedModel, layer: int, neuron: int) -> dict[str, Float[Tensor, " d_model"]]:
    """The input keys of FFN neuron (layer, neuron): ``{"up": κ, "gate": κ}`` for a GLU, ``{"in": κ}`` otherwise.

    κ = C(w_ln2 ⊙ k), k the neuron's column of W_in (up / plain) or W_gate, w_ln2 the weight of the norm that
    feeds the MLP and C the mean removal for LayerNorm. Then the pre-activation is <resid_mid, κ> / s_ln2 plus a
    constant, and <x, κ> = <C x, κ> splits linearly over the residual's components.

    Args:
        model: a TransformerLens model with an MLP.
        layer, neuron: the FFN neuron.

    Returns:
        Key name -> κ [d_model], float32.

    Example:
        >>> sorted(value_keys(model, 1, 5))                   # a GLU      # doctest: +SKIP
        ['gate', 'up']
    """
    L, dm = n_layers(model), d_mlp(model)
    if not 0 <= layer < L:
        raise QrncaError(f"layer {layer} is out of range for a {L}-layer model")
    if not 0 <= neuron < dm:
        raise QrncaError(f"neuron {neuron} is out of range (d_mlp = {dm})")
    ln2 = block(model, layer).ln2
    W_in = _param(model, "W_in")
    if W_in is None:
        raise ModelError(f"{model_name(model)} has no W_in; query neurons need the FFN keys")
    d = W_in.shape[1]
    w, _, centered = _norm_affine(model, ln2, d, W_in.device)
    cols = {"up" if is_gated(model) else "in": W_in[layer, :, neuron]}
    if is_gated(model):
        W_gate = _param(model, "W_gate")
        if W_gate is None:
            raise ModelError(f"{model_name(model)} has a gated MLP hook but no W_gate weights")
        cols["gate"] = W_gate[layer, :, neuron]
    out = {}
    for name, k in cols.items():
        kap = w * k.detach().float()
        out[name] = kap - kap.mean() if centered else kap
    return out
