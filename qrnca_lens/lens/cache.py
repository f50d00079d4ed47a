"""One forward pass for the lens: the residual stream at each prompt's target position, and its self-check.

``lens_cache`` runs a right-padded batch, keeps what the lens needs at the targets and stops before the
unembedding; then it checks that the frozen lens reproduces the model's own log-probabilities and that the
residual stream decomposes as the lens assumes. The guards every scorer shares live here too.

Example:
    >>> cache = lens_cache(model, prompts)                 # one batch          # doctest: +SKIP
    >>> cache.layer_logits(0).shape                        # [batch, vocab]     # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..data.prompts import Prompt
from ..errors import ModelError, QrncaError
from ..model.access import blocks, d_mlp, final_norm, model_device, model_dtype, model_name, n_layers, post_hook_name
from ..model.hooks import hooked
from ..model.readout import StopForward, head, head32
from ..protocols import HookedModel
from .weights import FrozenLens, Weights, ffn_out, frozen_lens, post_norm_gains

__all__ = ["LensCache", "lens_cache", "check_prompts", "padded", "batches", "scoring_weights"]

FULL = (torch.float32, torch.float64)
HALF = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LensCache:
    """Everything the lens needs from one forward pass, at each prompt's target position (float32)."""

    lens: FrozenLens
    targets: Int[Tensor, " batch"]
    scale: Float[Tensor, " batch"]
    resid_pre: Float[Tensor, "batch layer d_model"]
    resid_mid: Float[Tensor, "batch layer d_model"]
    attn_out: Float[Tensor, "batch layer d_model"]
    mlp_out: Float[Tensor, "batch layer d_model"]
    post: Float[Tensor, "batch layer d_mlp"]
    z: Float[Tensor, "batch layer head d_head"]
    final: Float[Tensor, "batch d_model"]
    model_logp: Float[Tensor, " batch"]
    # The frozen rms of each block's post-MLP / post-attention norm (Gemma); ones for a model without them.
    mlp_scale: Float[Tensor, "batch layer"]
    attn_scale: Float[Tensor, "batch layer"]

    @property
    def size(self) -> int:
        return int(self.targets.shape[0])

    @property
    def coefficients(self) -> Float[Tensor, "batch layer d_mlp"]:
        """a = m / (s s_l): the factor of each neuron's row of P_l = W_out[l] U in the logit change
        (W_out from ``scoring_weights``; s_l the post-MLP norm's frozen scale, 1 without one)."""
        return self.writes / self.scale[:, None, None]

    @property
    def writes(self) -> Float[Tensor, "batch layer d_mlp"]:
        """m / s_l: each neuron's factor on its row of ``scoring_weights`` in the residual stream."""
        return self.post / self.mlp_scale[:, :, None]

    def base_logits(self) -> Float[Tensor, "batch layer vocab"]:
        """The lens of each FFN layer's "before" vector, resid_mid[l]."""
        return self.lens.logits(self.resid_mid, self.scale[:, None].expand(-1, self.resid_mid.shape[1]))

    def layer_logits(self, layer: int) -> Float[Tensor, "batch vocab"]:
        """The lens of FFN layer ``layer``'s "before" vector, resid_mid[layer]."""
        return self.lens.logits(self.resid_mid[:, layer], self.scale)


# ---------------------------------------------------------------- guards


def check_prompts(model: HookedModel, prompts: Sequence[Prompt]) -> None:
    """Refuse (``QrncaError``) an empty list, or a prompt without tokens or target, too long, or out of vocabulary."""
    if not prompts:
        raise QrncaError("no prompts to score")
    n_ctx = getattr(model.cfg, "n_ctx", None)
    vocab = int(model.cfg.d_vocab)
    for p in prompts:
        if not p.tokens:
            raise QrncaError(f"prompt of query {p.query_id!r} has no tokens: there is no target position to score")
        if not p.target:
            raise QrncaError(f"prompt of query {p.query_id!r} has no target token to score")
        if n_ctx and len(p.tokens) > int(n_ctx):
            raise QrncaError(
                f"prompt of query {p.query_id!r} has {len(p.tokens)} tokens, more than the model's context "
                f"({n_ctx}); use fewer in-context examples"
            )
        bad = [t for t in (*p.tokens, p.target[0]) if not 0 <= int(t) < vocab]
        if bad:
            raise QrncaError(f"prompt of query {p.query_id!r} has token ids outside the vocabulary (0..{vocab - 1}): {bad[:3]}")


def _post_names(model: HookedModel) -> list[str]:
    d_mlp(model)
    try:
        return [post_hook_name(model, layer) for layer in range(n_layers(model))]
    except ModelError as e:
        raise ModelError(f"the log-probability lens scores FFN neurons, read at hook_post: {e} (an attention-only "
                         "model has no FFN neurons to score)") from None


def scoring_weights(model: HookedModel, prompts: Sequence[Prompt]) -> Float[Tensor, "layer d_mlp d_model"]:
    """The guards every scorer shares (prompts given, FFN neurons readable); returns W_out as float32, times
    the post-MLP norm's gain where there is one (``ffn_out``)."""
    if not prompts:
        raise QrncaError("no prompts to score")
    _post_names(model)
    return ffn_out(model)


def batches(prompts: Sequence[Prompt], size: int) -> Iterator[tuple[int, list[Prompt]]]:
    """(start index, prompts) for consecutive batches of at most ``size`` prompts."""
    for i in range(0, len(prompts), size):
        yield i, list(prompts[i : i + size])


def padded(prompts: Sequence[Prompt], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded token ids (each row padded with its own last token: never attended by a real position),
    each prompt's target position and its first target token."""
    width = max(len(p.tokens) for p in prompts)
    ids = torch.tensor([list(p.tokens) + [p.tokens[-1]] * (width - len(p.tokens)) for p in prompts], device=device)
    pos = torch.tensor([p.target_position for p in prompts], device=device)
    targets = torch.tensor([p.target[0] for p in prompts], device=device)
    return ids, pos, targets


# ---------------------------------------------------------------- the forward pass


def _hook_names(model: HookedModel) -> list[str]:
    L = n_layers(model)
    names = []
    for layer in range(L):
        names += [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.hook_attn_out",
                  f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.attn.hook_z"]
    missing = [n for n in names if n not in model.hook_dict]
    if missing:
        raise ModelError(f"{model_name(model)} lacks the residual-stream hooks the lens reads: {missing[:4]}")
    return names


def _at_targets(store: dict[str, Tensor], key: str, rows: Tensor, pos: Tensor) -> Any:
    def hook(act: Tensor, hook: Any) -> Tensor:
        store[key] = act[rows, pos].detach().float()
        return act

    return hook


def _post_norm_scales(model: HookedModel) -> dict[str, list[str]]:
    """The hooks of the frozen scales of post-sublayer norms (``mlp``/``attn``; absent keys: no such norms)."""
    out = {}
    for which, attr in (("mlp", "ln2_post"), ("attn", "ln1_post")):
        if all(getattr(b, attr, None) is None for b in blocks(model)):
            continue
        names = [f"blocks.{layer}.{attr}.hook_scale" for layer in range(n_layers(model))]
        missing = [n for n in names if n not in model.hook_dict]
        if missing:
            raise ModelError(f"{model_name(model)} has {attr} norms but no {missing[0]!r} hook: the lens freezes "
                             "their scale from the real forward")
        out[which] = names
    return out


def _stop_after(store: dict[str, Tensor], key: str, rows: Tensor, pos: Tensor) -> Any:
    grab = _at_targets(store, key, rows, pos)

    def hook(act: Tensor, hook: Any) -> Tensor:
        grab(act, hook)
        raise StopForward  # the final residual is captured; the unembedding over every position is not needed

    return hook


def _real_logits(model: HookedModel, final: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The model's own final norm and unembedding on the final residual at the targets.

    Returns (float32 logits, the norm's scale, the model's logits in its own dtype or None for a float32 model).
    The float32 logits come from ``head32``: the norm on the upcast residual (so its scale is the float32 rms of
    the half-precision residual, the scale the lens freezes) and W_U upcast. A half-precision model also runs
    its own head in its dtype, as its plain forward does: the self-check compares the lens with those, the
    log-probabilities the model itself gives.
    """
    store: dict[str, Tensor] = {}
    hooks = []
    if "ln_final.hook_scale" in model.hook_dict:
        def grab(act: Tensor, hook: Any) -> Tensor:
            store["s"] = act.detach().float().reshape(act.shape[0], -1)[:, 0]
            return act
        hooks.append(("ln_final.hook_scale", grab))
    with hooked(model, fwd=hooks):
        real32 = head32(model, final[:, None])[:, 0].float()
    own = None
    if model_dtype(model) in HALF:
        own = head(model, final[:, None].to(model_dtype(model)))[:, 0].float()
    return real32, store.get("s"), own


def _refuse_unrepresentable(model: HookedModel, store: dict[str, Tensor], prompts: Sequence[Prompt]) -> None:
    """What the lens cannot represent: a dtype that is not a float, and a non-finite activation at a target
    (float16's range ends at 65504; an overflowed residual has no log-probabilities to decompose)."""
    dtype = model_dtype(model)
    if not dtype.is_floating_point or dtype not in (*FULL, *HALF):
        raise ModelError(
            f"{model_name(model)} has {dtype} weights; the log-probability lens reads float32, float64, bfloat16 "
            "or float16 activations (a quantised or float8 model: load it in bfloat16)"
        )
    for name, act in store.items():
        bad = ~torch.isfinite(act).reshape(act.shape[0], -1).all(-1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ModelError(
                f"{model_name(model)}'s {_dtype_name(dtype)} forward gives inf/nan in {name} at the target "
                f"position of query {prompts[i].query_id!r}: the lens cannot represent an activation that "
                "overflowed. Load the model in bfloat16 (float16's range ends at 65504) or float32"
            )


def lens_cache(model: HookedModel, prompts: Sequence[Prompt], *, check_tol: float = 1e-3) -> LensCache:
    """One forward pass over ``prompts`` (right-padded batch), stopped before the unembedding.

    Checks that the frozen lens reproduces the model's own log-probabilities at the targets and that the residual
    stream decomposes as the lens assumes (resid_mid = resid_pre + attn_out, next = resid_mid + mlp_out,
    mlp_out = (hook_post · W_out + b_out) ⊙ w_post / s_post, where a post-MLP norm with gain w_post and frozen
    scale s_post is the identity for models without one); a model that breaks either is refused with a ModelError.

    A bfloat16 / float16 model is read the same way: its activations at the targets are upcast and the lens
    runs in float32, with the final norm's scale frozen at the float32 rms of the model's own final residual;
    ``model_logp`` is the float32 head on that residual (``head32``). The self-check compares the lens, on the
    tokens with p > 1e-6 and the target, with that float32 head within check_tol (both are float32 on the same
    residual) and with the log-probabilities the model itself gives (its head in its dtype) within
    max(check_tol, 4 eps |z|max) (``_lens_tolerance``). Refused: a non-float dtype, and a non-finite activation
    at a target (a float16 overflow).

    Args:
        model: a TransformerLens model.
        prompts: the batch; each is scored at its target position, on its first target token.
        check_tol: largest |Δ log p| allowed between the lens and the model (``LensConfig.check_tol``); for a
            half-precision model max(check_tol, 4 eps |z|max).

    Returns:
        The ``LensCache`` (float32, on the model's device).

    Example:
        >>> c = lens_cache(model, prompts)                                        # doctest: +SKIP
        >>> c.model_logp                     # the model's own log p(target)      # doctest: +SKIP
    """
    check_prompts(model, prompts)
    L = n_layers(model)
    posts = _post_names(model)
    names = _hook_names(model)
    device = model_device(model)
    ids, pos, targets = padded(prompts, device)
    rows = torch.arange(len(prompts), device=device)
    store: dict[str, Tensor] = {}
    last = f"blocks.{L - 1}.hook_resid_post"
    if last not in model.hook_dict:
        raise ModelError(f"{model_name(model)} has no {last!r} hook (the final residual)")
    scales = _post_norm_scales(model)
    hooks = [(n, _at_targets(store, n, rows, pos)) for n in names + posts + sum(scales.values(), [])]
    hooks.append((last, _stop_after(store, last, rows, pos)))
    with torch.no_grad():
        with hooked(model, fwd=hooks):
            try:
                model(ids)
            except StopForward:
                pass
        _refuse_unrepresentable(model, store, prompts)
        lens = frozen_lens(model)
        final = store[last]
        real, s, own = _real_logits(model, final)
    if s is None:  # no scale hook: compute it as the norm does
        x = lens.center(final)
        s = (x.pow(2).mean(-1) + float(getattr(model.cfg, "eps", 1e-5))).sqrt()

    def stack(fmt: str) -> Tensor:
        return torch.stack([store[fmt.format(layer)] for layer in range(L)], dim=1)

    def post_scale(which: str) -> Tensor:
        if which not in scales:
            return torch.ones(len(prompts), L, device=final.device)
        return torch.stack([store[n].reshape(len(prompts), -1)[:, 0] for n in scales[which]], dim=1)

    cache = LensCache(
        lens=lens, targets=targets, scale=s.float(),
        resid_pre=stack("blocks.{}.hook_resid_pre"), resid_mid=stack("blocks.{}.hook_resid_mid"),
        attn_out=stack("blocks.{}.hook_attn_out"), mlp_out=stack("blocks.{}.hook_mlp_out"),
        post=torch.stack([store[p] for p in posts], dim=1), z=stack("blocks.{}.attn.hook_z"), final=final,
        model_logp=torch.log_softmax(real, -1)[rows, targets],
        mlp_scale=post_scale("mlp"), attn_scale=post_scale("attn"),
    )
    _verify(model, cache, real, own, check_tol)
    return cache


# ---------------------------------------------------------------- the self-check


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / (b.norm() + 1e-6))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _lens_tolerance(dtype: torch.dtype, base: float, z_max: float) -> float:
    """Largest |Δ log p| allowed between the lens and the model's own log-probabilities.

    float32 / float64: ``base`` (``LensConfig.check_tol``, 1e-3). bfloat16 / float16: max(base, 4 eps |z|max),
    eps = ``torch.finfo(dtype).eps`` and |z|max the largest |float32 logit| at the checked targets: a half logit
    is rounded to steps of eps |z| / 2 (0.125 near |31| in bfloat16), and a plain bfloat16 forward differs from
    float32 by about 0.7 eps |z|. (The row engine's ``engine.checks.check_tolerance`` scales by the log-prob
    spread instead: it compares two float32 readouts of two half-precision forwards, this compares a float32
    readout with the model's own half-precision logits, whose rounding grows with |z|.)
    """
    if dtype in HALF:
        return max(base, 4.0 * torch.finfo(dtype).eps * z_max)
    return base


def _decomposition_tolerance(dtype: torch.dtype) -> float:
    """Largest relative error of a residual identity: 1e-3, or 2 eps for a half dtype (the model rounds each sum
    and product to its dtype, ~eps / 4 relative each; a block that does not decompose errs by order 1)."""
    if dtype in HALF:
        return max(1e-3, 2.0 * torch.finfo(dtype).eps)
    return 1e-3


def _live_max_diff(lens_lp: Tensor, model_lp: Tensor, targets: Tensor) -> float:
    """max |Δ log p| over the tokens the model gives p > 1e-6 (log p > -13.8) and each row's target: the far
    tail's rounding says nothing about the lens."""
    live = model_lp > -13.8
    live[torch.arange(live.shape[0], device=live.device), targets] = True
    return float(((lens_lp - model_lp).abs() * live).max())


def _float_head(model: HookedModel, final: Tensor) -> bool:
    """Whether ``head32`` is float32 throughout on this model: its final norm returns float32 for float32 input
    (transformers' norms and the bridge's do; TL 3.x's ``RMSNorm`` rounds back to the model dtype)."""
    norm = final_norm(model)
    return norm is None or norm(final[:1, None]).dtype in FULL


def _verify(model: HookedModel, cache: LensCache, real: Tensor, own: Tensor | None, base_tol: float) -> None:
    """The lens against the model's head on the same final residual: its float32 head (``head32``) within
    ``base_tol`` where that head is float32 throughout, and, for a half-precision model, its own head in its
    dtype (what its plain forward gives) within the dtype tolerance (``_lens_tolerance``)."""
    dtype = model_dtype(model)
    with torch.no_grad():
        lens_lp = torch.log_softmax(cache.lens.logits(cache.final, cache.scale), -1)
        z_max = float(real.abs().max())
        half_tol = _lens_tolerance(dtype, base_tol, z_max)
        how = (f"max({base_tol:g}, 4 eps({_dtype_name(dtype)}) |z|max = {z_max:.3g})" if dtype in HALF else "")
        exact = dtype not in HALF or _float_head(model, cache.final)
        refs = [("float32 head on the same residual", real, base_tol if exact else half_tol, "" if exact else how)]
        if own is not None:
            refs.append((f"own {_dtype_name(dtype)} head", own, half_tol, how))
        for which, logits, tol, formula in refs:
            err = _live_max_diff(lens_lp, torch.log_softmax(logits, -1), cache.targets)
            if not err <= tol:
                raise ModelError(
                    f"the frozen-scale lens W_U·norm(x) + b_U does not reproduce {model_name(model)}'s own "
                    f"log-probabilities (its {which}: max |Δ log p| = {err:.3g} on tokens with p > 1e-6 and the "
                    f"target; tolerance {tol:.3g}{' = ' + formula if formula else ''}): its final norm is not "
                    "w ⊙ (x - mean) / s + b (w read as 1 + w where the norm has a weight offset) or its logits are "
                    "transformed after the unembedding. This model is not supported by the log-probability lens"
                )
    nxt = torch.cat([cache.resid_pre[:, 1:], cache.final[:, None]], dim=1)
    W_out = ffn_out(model)  # times the post-MLP norm's gain, if any
    b_out = Weights(model).get("b_out")
    gains = post_norm_gains(model, "mlp")
    if b_out is not None and gains is not None:
        b_out = b_out * gains
    mlp = torch.einsum("bli,lid->bld", cache.writes, W_out)
    if b_out is not None:
        mlp = mlp + b_out[None] / cache.mlp_scale[..., None]
    rel_tol = _decomposition_tolerance(dtype)
    for what, got, want in (
        ("resid_mid = resid_pre + attn_out", cache.resid_pre + cache.attn_out, cache.resid_mid),
        ("the next residual = resid_mid + mlp_out", cache.resid_mid + cache.mlp_out, nxt),
        ("mlp_out = (hook_post · W_out + b_out) ⊙ w_post / s_post", mlp, cache.mlp_out),
    ):
        r = _rel(got, want)
        if not r <= rel_tol:
            raise ModelError(
                f"{model_name(model)}'s residual stream does not decompose as the lens assumes ({what} fails, "
                f"relative error {r:.2g} > {rel_tol:.2g} in {_dtype_name(dtype)}): e.g. parallel blocks, or a "
                "post-norm on the residual itself. The log-probability lens supports blocks that add their "
                "(optionally RMS-normed) outputs to the residual"
            )
