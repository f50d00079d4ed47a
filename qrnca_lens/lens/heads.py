"""Layer, head and per-source attention scores.

FFN layer: v = mlp_out[l] on b = resid_mid[l]. Attention layer: v = attn_out[l] on b = resid_pre[l]. Head (l, h):
v = the head's input-dependent output (``head_vectors``) on b = resid_pre[l]. Layer scores telescope: the sum
over all FFN and attention layers equals log p(w | final) - log p(w | embedding).

Example:
    >>> s = layer_scores(model, prompts)                                         # doctest: +SKIP
    >>> (s.ffn + s.attn).sum(1) - (s.final_logp - s.embed_logp)      # ~0        # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..data.prompts import Prompt
from ..errors import ModelError
from ..model.access import model_device, model_name, n_layers
from ..model.hooks import hooked
from ..protocols import HookedModel
from .cache import LensCache, batches, lens_cache, scoring_weights
from .config import LensConfig
from .weights import Weights, post_norm_gains, value_constants

__all__ = ["LayerScores", "head_vectors", "layer_scores", "attention_source_scores"]


def _lp(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) for logits [batch, ..., vocab] and targets [batch]."""
    lp = torch.log_softmax(logits, -1)
    idx = targets.reshape(-1, *([1] * (lp.dim() - 1))).expand(*lp.shape[:-1], 1)
    return lp.gather(-1, idx)[..., 0]


def head_vectors(model: HookedModel, cache: LensCache) -> tuple[Float[Tensor, "batch layer head d_model"], Float[Tensor, "batch layer d_model"]]:
    """Each head's output at the target, without its constant share, and the attention layer's constant part.

    A head's vector is (z_h - c_h) W_O[h] (times w / s of a post-attention norm, s frozen), with c_h = b_ln1 · W_V[h] + b_V[h] the value vector of a zero
    normalised input (the pattern sums to 1, so c_h passes unchanged). TL's fold_value_biases moves exactly these
    constants into b_O, so head scores do not depend on weight processing. The constant part is
    attn_out - Σ_h head_h = b_O + Σ_h c_h W_O[h]; it is checked against the model.

    Args:
        model: the model ``cache`` was taken from.
        cache: ``lens_cache(model, prompts)``.

    Returns:
        (heads [batch, layer, head, d_model], constant part [batch, layer, d_model]).

    Example:
        >>> heads, rest = head_vectors(model, lens_cache(model, prompts))        # doctest: +SKIP
    """
    weights = Weights(model)
    W_O = _head_out(model, weights)
    inv = 1.0 / cache.attn_scale  # [batch, layer]: the post-attention norm's frozen 1/s (1 without one)
    heads = torch.einsum("blhe,lhed->blhd", cache.z - value_constants(model, weights)[None], W_O) * inv[..., None, None]
    rest = cache.attn_out - heads.sum(2)
    L, d = W_O.shape[0], W_O.shape[-1]
    gains = post_norm_gains(model, "attn")
    b_O = weights.bias("b_O", (L, d)) * (1.0 if gains is None else gains)
    expected = (b_O + torch.einsum("lhe,lhed->ld", value_constants(model, weights), W_O))[None] * inv[..., None]
    err = float((rest - expected).norm())
    scale = float(cache.attn_out.norm()) + float(expected.norm()) * cache.size ** 0.5
    if not err <= 1e-3 * scale + 1e-6:
        raise ModelError(
            f"{model_name(model)}'s attention output is not Σ_h z_h W_O[h] + b_O (error {err:.2g} of {scale:.2g}); "
            "per-head scores are not supported for this architecture"
        )
    return heads, rest


def _head_out(model: Any, weights: Weights) -> Float[Tensor, "layer head d_head d_model"]:
    """W_O per head, times the post-attention norm's gain where there is one (its 1/s is per prompt)."""
    W_O = weights.per_head("W_O")
    gains = post_norm_gains(model, "attn")
    return W_O if gains is None else W_O * gains.to(W_O.device)[:, None, None, :]


@dataclass(frozen=True)
class LayerScores:
    """Layer- and head-level log-probability increases of each prompt.

    ``ffn[p, l]``: v = mlp_out[l] on b = resid_mid[l]. ``attn[p, l]``: v = attn_out[l] on b = resid_pre[l].
    ``heads[p, l, h]``: v = head h's vector (``head_vectors``) on b = resid_pre[l]; ``attn_const`` scores the
    layer's constant part the same way. Σ_l (ffn + attn) = ``final_logp`` - ``embed_logp``.
    """

    ffn: Float[Tensor, "prompt layer"]
    attn: Float[Tensor, "prompt layer"]
    heads: Float[Tensor, "prompt layer head"]
    attn_const: Float[Tensor, "prompt layer"]
    embed_logp: Float[Tensor, " prompt"]
    final_logp: Float[Tensor, " prompt"]


def layer_scores(model: HookedModel, prompts: Sequence[Prompt], cfg: LensConfig = LensConfig()) -> LayerScores:
    """FFN layer, attention layer and head scores (float32, on the CPU).

    Args:
        model: a TransformerLens model.
        prompts: scored at their target positions.
        cfg: ``batch_size`` and ``check_tol``.

    Returns:
        ``LayerScores``.

    Example:
        >>> layer_scores(model, prompts).heads.shape      # [prompt, layer, head]   # doctest: +SKIP
    """
    scoring_weights(model, prompts)
    parts: dict[str, list[Tensor]] = {k: [] for k in ("ffn", "attn", "heads", "attn_const", "embed", "final")}
    with torch.no_grad():
        for _, batch in batches(prompts, cfg.batch_size):
            c = lens_cache(model, batch, check_tol=cfg.check_tol)
            L = c.resid_pre.shape[1]
            s = c.scale[:, None].expand(-1, L)

            def lp(x: Tensor, scale: Tensor = s, c: Any = c) -> Tensor:
                return _lp(c.lens.logits(x, scale), c.targets)

            pre, mid = lp(c.resid_pre), lp(c.resid_mid)
            heads, rest = head_vectors(model, c)
            H = heads.shape[2]
            sh = c.scale[:, None, None].expand(-1, L, H)
            parts["ffn"].append(lp(c.resid_mid + c.mlp_out) - mid)
            parts["attn"].append(lp(c.resid_pre + c.attn_out) - pre)
            parts["heads"].append(lp(c.resid_pre[:, :, None] + heads, sh) - pre[..., None])
            parts["attn_const"].append(lp(c.resid_pre + rest) - pre)
            parts["embed"].append(pre[:, 0])
            parts["final"].append(c.model_logp)
    cat = {k: torch.cat(v).cpu() for k, v in parts.items()}
    return LayerScores(cat["ffn"], cat["attn"], cat["heads"], cat["attn_const"], cat["embed"], cat["final"])


def attention_source_scores(model: HookedModel, prompt: Prompt, cfg: LensConfig = LensConfig()) -> Float[Tensor, "layer head pos"]:
    """Scores of each head's per-source-position subvalues at the target: A[h, t, j] (v_j - c_h) W_O[h].

    ``pos`` runs over the prompt's positions 0..t (the target position t included). Summed over positions they
    give the head's vector of ``head_vectors``.

    Args:
        model: a TransformerLens model with attention pattern and value hooks.
        prompt: one prompt.
        cfg: ``check_tol``.

    Returns:
        Scores [layer, head, pos] (float32, on the CPU).

    Example:
        >>> attention_source_scores(model, prompts[0]).shape                     # doctest: +SKIP
    """
    scoring_weights(model, [prompt])
    L, H = n_layers(model), int(model.cfg.n_heads)
    names = [f"blocks.{layer}.attn.hook_{k}" for layer in range(L) for k in ("pattern", "v")]
    missing = [n for n in names if n not in model.hook_dict]
    if missing:
        raise ModelError(f"{model_name(model)} lacks the attention hooks {missing[:2]}; per-source scores need them")
    store: dict[str, Tensor] = {}

    def keep(name: str) -> Any:  # keyed by the name asked for (a bridge may report an alias as hook.name)
        def hook(act: Tensor, hook: Any) -> Tensor:
            store[name] = act.detach().float()
            return act

        return hook

    t = prompt.target_position
    with torch.no_grad():
        cache = lens_cache(model, [prompt], check_tol=cfg.check_tol)
        ids = torch.tensor([list(prompt.tokens)], device=model_device(model))
        with hooked(model, fwd=[(n, keep(n)) for n in names]):
            model(ids)
        weights = Weights(model)
        W_O = _head_out(model, weights)
        const = value_constants(model, weights)
        out = torch.empty(L, H, t + 1)
        for layer in range(L):
            A = store[f"blocks.{layer}.attn.hook_pattern"][0, :, t, : t + 1]  # [H, src]
            v = store[f"blocks.{layer}.attn.hook_v"][0, : t + 1]  # [src, kv_head, e]
            v = v.repeat_interleave(H // v.shape[1], dim=1) if v.shape[1] != H else v
            vec = torch.einsum("hj,jhe,hed->hjd", A, v - const[layer][None], W_O[layer]) / cache.attn_scale[0, layer]
            b = cache.resid_pre[0, layer]
            base = _lp(cache.lens.logits(b[None], cache.scale), cache.targets)[0]
            lp = _lp(cache.lens.logits(b + vec, cache.scale[0].expand(H, t + 1)),
                     cache.targets[0].expand(H))
            out[layer] = (lp - base).cpu()
    return out
