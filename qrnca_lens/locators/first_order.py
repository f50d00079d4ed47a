"""First-order neuron scores: attribution patching (AtP) and direct logit attribution (DLA).

Both score every FFN neuron of the chosen layers at each prompt's target position (its last token) with a
single pass, where QRNCA's integrated gradients takes m steps per layer. They are the cheap baselines a
neuron locator has to beat.

- ``atp_scores``: attribution patching (Nanda 2023; Kramár et al. 2024, "AtP*"), the first-order estimate of
  zero-ablating neuron i of layer l, ``ΔP ≈ (0 - f_i) · dP/df_i``, where f is QRNCA's attributed activation
  (``mlp_hook_name``: ``hook_pre_linear`` of a gated MLP, else ``hook_pre``) and P the probability of the
  target exactly as QRNCA's IG defines it (``attribution.target_prob``: full-vocabulary softmax at the target
  position; for a multi-token target the product of its teacher-forced token probabilities). A neuron that
  *supports* the answer has a negative ablation estimate, so the score is its negation, ``f_i · dP/df_i``
  (gradient × activation): large = supports the answer, the order QRNCA ranks by. The gradient is the total
  derivative: every layer's f is perturbed by a zero leaf added at the target position, so the paths from a
  lower layer through a higher layer's f stay in the graph (detaching each layer's activation into a leaf
  would cut them). One forward and one backward per prompt for all layers at once.
- ``dla_scores``: direct logit attribution. Neuron i of layer l writes ``m_i · W_out[l, i]`` into the residual
  stream (m = ``hook_post`` at the target position); its direct effect on the target's logit goes through the
  final norm with the norm's scale *frozen* at its value on the real final residual:
  ``m_i · W_out[l, i] · C diag(w) W_U[:, t] / s`` (C: mean removal for LayerNorm; w: the norm's weight; t: the
  first target token). It is the raw target-logit contribution: no mean logit is subtracted, and neither
  the norm's bias nor ``b_U`` (constants shared by every neuron) is counted. The frozen norm and the
  one-pass cache are the log-probability lens's (``lens.frozen_lens``, ``lens.lens_cache``), so DLA supports
  the models the lens supports (pre-norm blocks whose outputs add to the residual; no logit soft-cap) and
  refuses the others with the lens's reason. One forward per prompt, no gradient.

Example:
    >>> atp = atp_scores(model, prompts)           # [prompt, layer, d_mlp], float32 on the CPU  # doctest: +SKIP
    >>> dla = dla_scores(model, prompts, [0, 5])   # two layers                                    # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..data.prompts import Prompt
from ..errors import ModelError, QrncaError
from ..lens.cache import batches, check_prompts, lens_cache, scoring_weights
from ..model.access import d_mlp, mlp_hook_name, model_device
from ..model.hooks import hooked
from ..model.readout import logprobs_at
from ..protocols import HookedModel
from ..qrnca.ig import gradients_on, resolve_layers, target_prob

__all__ = ["atp_scores", "dla_scores", "ATP_MAX_BATCH_TOKENS", "DLA_BATCH"]

# A query's prompts share one forward/backward while prompts x longest sequence stays under this many tokens;
# the backward keeps every activation of the batch, so the bound keeps long prompts from piling up memory.
ATP_MAX_BATCH_TOKENS = 2048
DLA_BATCH = 8  # prompts per DLA forward (no gradient: only the target positions are kept)


def _layers(model: HookedModel, layers: Sequence[int] | None) -> list[int]:
    d_mlp(model)  # a model without an MLP is refused here, naming the problem
    return resolve_layers(model, layers)


def _token_batches(prompts: Sequence[Prompt], budget: int) -> Iterator[list[int]]:
    """Consecutive prompt indices whose padded batch (count x longest sequence) fits ``budget`` tokens."""
    batch: list[int] = []
    longest = 0
    for i, p in enumerate(prompts):
        n = len(p.tokens) + len(p.target) - 1
        if batch and (len(batch) + 1) * max(longest, n) > budget:
            yield batch
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, n)
    if batch:
        yield batch


def _check_finite(scores: Tensor, what: str) -> Tensor:
    if not torch.isfinite(scores).all():
        raise QrncaError(f"non-finite {what} scores: the model's probabilities overflowed; run the model in float32")
    return scores


# ---------------------------------------------------------------- attribution patching


def _perturb(leaves: dict[str, Tensor], values: dict[str, Tensor], name: str, rows: Tensor, pos: Tensor) -> Any:
    """A hook adding a zero leaf at each row's target position: d out / d leaf = identity, so the leaf's
    gradient is dP/df there, with every path through higher layers kept."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        here = act[rows, pos]
        leaf = torch.zeros_like(here).requires_grad_(True)
        leaves[name], values[name] = leaf, here.detach().float().clone()
        out = act.clone()
        out[rows, pos] = here + leaf
        return out

    return hook


def _atp_batch(model: HookedModel, prompts: Sequence[Prompt], names: Sequence[str]) -> Float[Tensor, "prompt layer d_mlp"]:
    device = model_device(model)
    # Teacher forcing as in IG: the answer's tokens but the last follow the prompt; right padding with each
    # row's own last token (a causal model's real positions never see what comes after them).
    seqs = [list(p.tokens) + list(p.target[:-1]) for p in prompts]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [s[-1]] * (width - len(s)) for s in seqs], device=device)
    pos = torch.tensor([p.target_position for p in prompts], device=device)
    rows = torch.arange(len(prompts), device=device)
    leaves: dict[str, Tensor] = {}
    values: dict[str, Tensor] = {}
    with gradients_on(model), hooked(model, fwd=[(n, _perturb(leaves, values, n, rows, pos)) for n in names]):
        logp = logprobs_at(model, ids, [range(p.target_position, p.target_position + len(p.target)) for p in prompts])
        prob = torch.cat([target_prob(lp[None], torch.tensor([list(p.target)], device=lp.device))
                          for lp, p in zip(logp, prompts)])
        missing = [n for n in names if n not in leaves]
        if missing:
            raise ModelError(f"the hook(s) {missing[:3]} did not fire in the forward pass; attribution patching "
                             "reads the MLP activation there. Use a model whose MLP runs these hooks")
        # The rows are independent, so the gradient of their sum gives each row its own dP/df.
        grads = torch.autograd.grad(prob.sum(), [leaves[n] for n in names])
    f = torch.stack([values[n] for n in names], dim=1)  # [prompt, layer, d_mlp]
    g = torch.stack([x.float() for x in grads], dim=1)
    return (f * g).cpu()


def atp_scores(
    model: HookedModel, prompts: Sequence[Prompt], layers: Sequence[int] | None = None, *,
    max_batch_tokens: int = ATP_MAX_BATCH_TOKENS,
) -> Float[Tensor, "prompt layer d_mlp"]:
    """Attribution-patching scores ``f · dP/df`` of every FFN neuron at each prompt's target position.

    ``-score`` is the first-order estimate of P's change when the neuron is zero-ablated there, so a large
    score marks a neuron that supports the target (QRNCA's sense). One forward and one backward per batch of
    prompts for all layers at once; gradients are taken even inside ``torch.no_grad()`` (parameters stay
    frozen), ``torch.inference_mode()`` is refused, and no hook outlives the call.

    Args:
        model: a TransformerLens model with an MLP (bridge or HookedTransformer).
        prompts: the prompts (P: the target's probability, as QRNCA's IG defines it).
        layers: which layers (rows of the result); None for all.
        max_batch_tokens: prompts share a pass while count x longest sequence stays under this.

    Returns:
        Scores [prompt, layer, d_mlp], float32 on the CPU.

    Example:
        >>> s = atp_scores(model, prompts)                     # doctest: +SKIP
        >>> s.mean(0).flatten().topk(10)                       # a query's top neurons  # doctest: +SKIP
    """
    check_prompts(model, prompts)
    chosen = _layers(model, layers)
    names = [mlp_hook_name(model, layer) for layer in chosen]
    out = torch.zeros(len(prompts), len(chosen), d_mlp(model))
    for batch in _token_batches(prompts, max(1, max_batch_tokens)):
        out[batch] = _atp_batch(model, [prompts[i] for i in batch], names)
    return _check_finite(out, "attribution-patching")


# ---------------------------------------------------------------- direct logit attribution


def dla_scores(
    model: HookedModel, prompts: Sequence[Prompt], layers: Sequence[int] | None = None, *, batch_size: int = DLA_BATCH,
) -> Float[Tensor, "prompt layer d_mlp"]:
    """Direct logit attribution of every FFN neuron to its prompt's target logit, through the frozen final norm.

    ``score[b, l, i] = hook_post[l, i] · W_out[l, i] · C diag(w) W_U[:, t] / s``, at prompt b's target
    position, t its first target token, s the final norm's scale on the real final residual (C, w: the norm's
    mean removal (LayerNorm) and weight). The raw target-logit contribution: no mean logit subtracted, no bias
    term. Summed over a layer's neurons it is that layer's MLP output (less ``b_out``) read the same way.

    Args:
        model: a TransformerLens model the log-probability lens supports (else a ``ModelError`` says why).
        prompts: the prompts.
        layers: which layers (rows of the result); None for all.
        batch_size: prompts per forward pass (right-padded).

    Returns:
        Scores [prompt, layer, d_mlp], float32 on the CPU.

    Example:
        >>> s = dla_scores(model, prompts, [10, 11])           # doctest: +SKIP
        >>> s.shape                                            # doctest: +SKIP
        torch.Size([3, 2, 1536])
    """
    check_prompts(model, prompts)
    chosen = _layers(model, layers)
    try:
        W_out = scoring_weights(model, prompts)[chosen]  # [layer, d_mlp, d_model], float32
    except ModelError as e:
        raise ModelError(f"direct logit attribution reads hook_post and W_out: {e}") from None
    out = []
    with torch.no_grad():
        for _, batch in batches(prompts, max(1, batch_size)):
            try:
                cache = lens_cache(model, batch)
            except ModelError as e:
                raise ModelError(f"direct logit attribution reads the model through the lens's frozen final norm, "
                                 f"which does not fit this model: {e}") from None
            direction = cache.lens.U[:, cache.targets]  # [d_model, batch]: C diag(w) W_U[:, t]
            per_neuron = torch.einsum("lid,db->bli", W_out.to(direction.device), direction)
            out.append((cache.coefficients[:, chosen] * per_neuron).cpu())  # coefficients = hook_post / s
    return _check_finite(torch.cat(out), "direct-logit-attribution")
