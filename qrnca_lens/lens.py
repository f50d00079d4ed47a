"""Log-probability increase (Yu & Ananiadou, EMNLP 2024): static value- and query-neuron scores (METHOD section 6).

One forward pass with a cache, then matrix products; no backward. At each prompt's target position (its last
token; the first target token w is scored):

    lens(x) = W_U · norm(x) (+ b_U),  norm(x) = w ⊙ C(x) / s + b,

where s is the final norm's scale **frozen** from the real final residual, C removes the mean for LayerNorm
(identity for RMSNorm), and (w, b) are the final norm's weight and bias. Given s, the lens is affine in x. The
importance of adding a vector v to a "before" vector b is

    Imp(v | b) = log p(w | lens(b + v)) - log p(w | lens(b)).

- FFN neuron (l, i): b = resid_mid[l], v = m_i W_out[l, i], m = ``hook_post`` (the gated product for a GLU).
  FFN layer: v = mlp_out[l]. Attention layer: b = resid_pre[l], v = attn_out[l]. Head (l, h): b = resid_pre[l],
  v = the head's input-dependent output (see ``head_vectors``). Layer scores telescope: the sum over all FFN and
  attention layers equals log p(w | final) - log p(w | embedding), and log p(w | final) is the model's own.
- Vectorised: neuron i of layer l changes the logits by a_i · P_l[i] with a = m / s and P_l = W_out[l] U, where
  U = C diag(w) W_U. P_l does not depend on the prompt; it is computed once per layer and batch of prompts, in
  chunks of neurons. What remains per prompt and neuron is a log-sum-exp over the vocabulary,
  Δ_i = lse(L_b + a_i P_i) - lse(L_b). Two engines compute it:
    * ``"direct"``: one logsumexp per neuron and prompt (the textbook floor: prompts x neurons x vocab exps).
    * ``"series"`` (default): with P_i = c_i + R_i Y_i (|Y_i| <= 1, c_i/R_i the row's mid-range/half-range),
      Δ_i = a_i c_i + log Σ_n (a_i R_i)^n E_b[Y_i^n] / n!, where the moments E_b[Y^n] = Y^n · softmax(L_b) are
      matrix products shared by the whole batch of prompts. The truncation after N terms is bounded by
      ρ^(N+1) e^(2ρ) / (N+1)! relative (ρ = |a_i| R_i), and N is chosen so the bound is below ``series_tol``
      (1e-8: below float32 rounding of a direct logsumexp). Neurons with ρ > ``series_radius`` (a few percent,
      mostly in the last layers) go through the direct logsumexp. On SmolLM2 over 99% of neurons have ρ < 0.5.
- Top-K mode: log p(w | L_b + t a_i P_i) is concave in t, so its tangent at t = 0, a_i · (W_out[l, i] · g_l) with
  g_l = U (onehot(w) - softmax(L_b)), is an **upper bound** on the exact score. Neurons are rescored exactly in
  decreasing order of that bound until the k-th best exact score is above every remaining bound: the result is
  the exact top k with a certificate (``TopNeurons.certified``), not an approximation.
- Query neurons of a value neuron (l, i): its key κ (the row of W_in, or W_gate for the gate of a GLU, times
  the ln2 weight, mean-removed for LayerNorm) reads ln2(resid_mid[l]), so <resid_mid[l], κ> splits exactly over
  the earlier components (embedding, attention layers <= l, FFN neurons and biases < l). A component's score is
  Imp(value) · <component, κ> / <resid_mid[l], κ>. The up and gate keys of a GLU are scored separately.

TL's weight processing (``enable_compatibility_mode()`` on a bridge: fold_ln, centred writing weights and
unembedding, folded value biases; or a HookedTransformer with processed weights) leaves every score unchanged:
the lens removes the mean for LayerNorm models, log-softmax ignores the unembedding's centring, and a head's
vector excludes its constant (bias) share, which TL moves into b_O. Models whose final norm or MLP output is not
of this form (Gemma: ``(1 + w)`` RMSNorm and post-norms; soft-capped logits) are refused with an error: every
forward pass checks that the lens reproduces the model's own log-probabilities and that the residual stream
decomposes as assumed.

Example:
    >>> model = load_model("smollm2")                                          # doctest: +SKIP
    >>> pool = load_data("builtin:facts")
    >>> prompts = build_all_prompts(pool[:2], ProxyConfig("cloze"), model.tokenizer, pool=pool)  # doctest: +SKIP
    >>> ps = [p for v in prompts.values() for p in v]                          # doctest: +SKIP
    >>> scores = neuron_scores(model, ps)                    # [prompt, layer, d_mlp]  # doctest: +SKIP
    >>> top = top_neurons(model, ps, k=10, cfg=LensConfig(mode="topk"))        # doctest: +SKIP
    >>> top[0].to_list()[:2]                                 # [[layer, neuron, score], ...]  # doctest: +SKIP
    >>> q = query_neurons(model, ps[0], *top[0].to_list()[0][:2])              # doctest: +SKIP
    >>> q["up"].top(5)                                                         # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .data import Query
from .errors import ModelError, QrncaError
from .hooks import hooked
from .models import (
    d_mlp,
    default_prepend_bos,
    is_gated,
    model_device,
    model_dtype,
    model_name,
    n_layers,
    post_hook_name,
    tokenizer_of,
)
from .proxies import Prompt, ProxyConfig, build_all_prompts

__all__ = [
    "ENGINES",
    "MODES",
    "BASELINES",
    "LensConfig",
    "FrozenLens",
    "LensCache",
    "LayerScores",
    "TopNeurons",
    "QueryNeurons",
    "frozen_lens",
    "lens_cache",
    "neuron_scores",
    "score_neurons",
    "top_neurons",
    "layer_scores",
    "head_vectors",
    "attention_source_scores",
    "value_keys",
    "query_neurons",
    "baseline_scores",
    "ablation_metrics",
    "compare_methods",
    "comparison_report",
    "lens_locate",
    "cmd_lens",
]

ENGINES = ("series", "direct")
MODES = ("exact", "topk")
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


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class LensConfig:
    """How scores are computed. The defaults are exact.

    ``mode``: ``"exact"`` scores every FFN neuron; ``"topk"`` finds the top neurons by the first-order bound
    and exact rescoring (certified, see the module docstring). ``engine``: ``"series"`` or ``"direct"`` for the
    per-neuron log-sum-exp. ``chunk``: neurons per product W_out[l, chunk] · U (memory: chunk x vocab floats,
    a few times). ``batch_size``: prompts per forward pass and per product (larger amortises the products).
    ``series_radius``/``series_tol``: where the series is used, and the bound on its truncation error.
    ``max_rescore``: top-K mode gives up the certificate after scoring this many neurons exactly per prompt.
    ``check_tol``: largest |Δ log p| allowed between the lens on the final residual and the model's own
    log-probabilities (larger means the model is not supported).
    """

    mode: str = "exact"
    engine: str = "series"
    chunk: int = 128
    batch_size: int = 16
    series_radius: float = 0.5
    series_tol: float = 1e-8
    max_rescore: int = 4096
    check_tol: float = 1e-3

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise QrncaError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.engine not in ENGINES:
            raise QrncaError(f"engine must be one of {list(ENGINES)}, got {self.engine!r}")
        if self.chunk < 1:
            raise QrncaError(f"chunk (neurons per product) must be at least 1, got {self.chunk}")
        if self.batch_size < 1:
            raise QrncaError(f"batch_size must be at least 1, got {self.batch_size}")
        if not 0.0 < self.series_radius <= 4.0:
            raise QrncaError(f"series_radius must be in (0, 4] (larger needs many terms), got {self.series_radius}")
        if not 0.0 < self.series_tol < 1e-2:
            raise QrncaError(f"series_tol must be in (0, 0.01), got {self.series_tol}")
        if self.max_rescore < 1:
            raise QrncaError(f"max_rescore must be at least 1, got {self.max_rescore}")
        if not self.check_tol > 0:
            raise QrncaError(f"check_tol must be positive, got {self.check_tol}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LensConfig":
        return cls(**d)


# ---------------------------------------------------------------- reading weights


def _param(obj: Any, name: str) -> Tensor | None:
    """A weight of a TL model, or None when it does not exist (bridges raise for bias-free projections)."""
    try:
        value = getattr(obj, name)
    except (AttributeError, RuntimeError, TypeError):
        return None
    return value if isinstance(value, Tensor) else None


def _centers(model: Any, norm: Any) -> bool:
    """Whether a norm module removes the mean (LayerNorm, LNPre) rather than only scaling (RMSNorm)."""
    if "RMS" in type(norm).__name__:
        return False
    return str(getattr(model.cfg, "normalization_type", "") or "").startswith("LN")


def _norm_affine(model: Any, norm: Any, d: int, device: torch.device) -> tuple[Tensor, Tensor, bool]:
    """(w, b, centred) of a norm module: norm(x) = w ⊙ C(x) / s + b. Folded norms (LNPre) have w = 1, b = 0."""
    w = _param(norm, "w")
    b = _param(norm, "b")
    w = torch.ones(d, device=device) if w is None else w.detach().float()
    b = torch.zeros(d, device=device) if b is None else b.detach().float()
    return w, b, _centers(model, norm)


def _expand_heads(t: Tensor, n_heads: int) -> Tensor:
    """Grouped-query weights [layer, kv_head, ...] -> [layer, head, ...] (TL 3 already expands them)."""
    if t.shape[1] == n_heads:
        return t
    return t.repeat_interleave(n_heads // t.shape[1], dim=1)


class _Weights:
    """The weights the lens reads, as float32 on the model's device, each read once per call."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._cache: dict[str, Tensor | None] = {}

    def get(self, name: str) -> Tensor | None:
        if name not in self._cache:
            t = _param(self.model, name)
            self._cache[name] = None if t is None else t.detach().float()
        return self._cache[name]

    def need(self, name: str) -> Tensor:
        t = self.get(name)
        if t is None:
            raise ModelError(f"{model_name(self.model)} has no {name} weights; the lens needs them")
        return t

    def bias(self, name: str, shape: tuple[int, ...]) -> Tensor:
        t = self.get(name)
        return torch.zeros(shape, device=model_device(self.model)) if t is None else t


# ---------------------------------------------------------------- the frozen lens


@dataclass(frozen=True)
class FrozenLens:
    """lens(x) = (x / s) · U + c, with U = C diag(w) W_U (C: mean removal for LayerNorm) and c = b·W_U + b_U."""

    U: Float[Tensor, "d_model vocab"]
    c: Float[Tensor, "vocab"]
    centered: bool

    def logits(self, x: Float[Tensor, "*batch d_model"], scale: Float[Tensor, "*batch"]) -> Float[Tensor, "*batch vocab"]:
        return (x / scale[..., None]) @ self.U + self.c

    def center(self, v: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_model"]:
        """What the final norm sees of a vector: mean-removed for LayerNorm, unchanged for RMSNorm."""
        return v - v.mean(-1, keepdim=True) if self.centered else v


def frozen_lens(model: Any) -> FrozenLens:
    """The final norm and unembedding of ``model`` as an affine map of x / s (s is supplied per prompt)."""
    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    if cap is not None and float(cap) > 0:
        raise ModelError(
            f"{model_name(model)} soft-caps its logits (output_logits_soft_cap={cap}); the log-probability lens "
            "needs logits affine in the final residual. Use a model without logit soft-capping"
        )
    W_U = _param(model, "W_U")
    if W_U is None:
        raise ModelError(f"{model_name(model)} has no W_U (unembedding); the lens projects onto the vocabulary with it")
    W_U = W_U.detach().float()
    d = W_U.shape[0]
    device = W_U.device
    w, b, centered = _norm_affine(model, model.ln_final, d, device)
    U = w[:, None] * W_U
    if centered:
        U = U - U.mean(0, keepdim=True)
    b_U = _param(model, "b_U")
    c = b @ W_U + (b_U.detach().float() if b_U is not None else 0.0)
    return FrozenLens(U.contiguous(), c, centered)


# ---------------------------------------------------------------- one forward pass


@dataclass(frozen=True)
class LensCache:
    """Everything the lens needs from one forward pass, at each prompt's target position (float32)."""

    lens: FrozenLens
    targets: Int[Tensor, "batch"]
    scale: Float[Tensor, "batch"]
    resid_pre: Float[Tensor, "batch layer d_model"]
    resid_mid: Float[Tensor, "batch layer d_model"]
    attn_out: Float[Tensor, "batch layer d_model"]
    mlp_out: Float[Tensor, "batch layer d_model"]
    post: Float[Tensor, "batch layer d_mlp"]
    z: Float[Tensor, "batch layer head d_head"]
    final: Float[Tensor, "batch d_model"]
    model_logp: Float[Tensor, "batch"]

    @property
    def size(self) -> int:
        return int(self.targets.shape[0])

    @property
    def coefficients(self) -> Float[Tensor, "batch layer d_mlp"]:
        """a = m / s: the factor of each neuron's row of P_l = W_out[l] U in the logit change."""
        return self.post / self.scale[:, None, None]

    def base_logits(self) -> Float[Tensor, "batch layer vocab"]:
        """The lens of each FFN layer's "before" vector, resid_mid[l]."""
        return self.lens.logits(self.resid_mid, self.scale[:, None].expand(-1, self.resid_mid.shape[1]))


class _Stop(Exception):
    """Raised from the last block's hook: the final residual is captured, the unembedding is not needed."""


def _check_prompts(model: Any, prompts: Sequence[Prompt]) -> None:
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


def _hook_names(model: Any) -> list[str]:
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


def _stop_after(store: dict[str, Tensor], key: str, rows: Tensor, pos: Tensor) -> Any:
    grab = _at_targets(store, key, rows, pos)

    def hook(act: Tensor, hook: Any) -> Tensor:
        grab(act, hook)
        raise _Stop

    return hook


def _padded(prompts: Sequence[Prompt], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded token ids (each row padded with its own last token: never attended by a real position)."""
    width = max(len(p.tokens) for p in prompts)
    ids = torch.tensor([list(p.tokens) + [p.tokens[-1]] * (width - len(p.tokens)) for p in prompts], device=device)
    pos = torch.tensor([p.target_position for p in prompts], device=device)
    targets = torch.tensor([p.target[0] for p in prompts], device=device)
    return ids, pos, targets


def _real_logits(model: Any, final: Tensor) -> tuple[Tensor, Tensor | None]:
    """The model's own final norm and unembedding on the final residual at the targets; and the norm's scale."""
    store: dict[str, Tensor] = {}
    hooks = []
    if "ln_final.hook_scale" in model.hook_dict:
        def grab(act: Tensor, hook: Any) -> Tensor:
            store["s"] = act.detach().float().reshape(act.shape[0], -1)[:, 0]
            return act
        hooks.append(("ln_final.hook_scale", grab))
    with hooked(model, fwd=hooks):
        logits = model.unembed(model.ln_final(final[:, None].to(model_dtype(model))))
    return logits[:, 0].float(), store.get("s")


def lens_cache(model: Any, prompts: Sequence[Prompt], *, check_tol: float = 1e-3) -> LensCache:
    """One forward pass over ``prompts`` (right-padded batch), stopped before the unembedding.

    Checks that the frozen lens reproduces the model's own log-probabilities at the targets and that the residual
    stream decomposes as the lens assumes (resid_mid = resid_pre + attn_out, next = resid_mid + mlp_out,
    mlp_out = hook_post · W_out + b_out); a model that breaks either is refused with a ModelError.
    """
    _check_prompts(model, prompts)
    L, dm = n_layers(model), d_mlp(model)
    names = _hook_names(model)
    posts = [post_hook_name(model, layer) for layer in range(L)]
    device = model_device(model)
    ids, pos, targets = _padded(prompts, device)
    rows = torch.arange(len(prompts), device=device)
    store: dict[str, Tensor] = {}
    last = f"blocks.{L - 1}.hook_resid_post"
    if last not in model.hook_dict:
        raise ModelError(f"{model_name(model)} has no {last!r} hook (the final residual)")
    hooks = [(n, _at_targets(store, n, rows, pos)) for n in names + posts]
    hooks.append((last, _stop_after(store, last, rows, pos)))
    with torch.no_grad():
        with hooked(model, fwd=hooks):
            try:
                model(ids)
            except _Stop:
                pass
        lens = frozen_lens(model)
        final = store[last]
        real, s = _real_logits(model, final)
    if s is None:  # no scale hook: compute it as the norm does
        x = lens.center(final)
        s = (x.pow(2).mean(-1) + float(getattr(model.cfg, "eps", 1e-5))).sqrt()

    def stack(fmt: str) -> Tensor:
        return torch.stack([store[fmt.format(layer)] for layer in range(L)], dim=1)

    cache = LensCache(
        lens=lens, targets=targets, scale=s.float(),
        resid_pre=stack("blocks.{}.hook_resid_pre"), resid_mid=stack("blocks.{}.hook_resid_mid"),
        attn_out=stack("blocks.{}.hook_attn_out"), mlp_out=stack("blocks.{}.hook_mlp_out"),
        post=torch.stack([store[p] for p in posts], dim=1), z=stack("blocks.{}.attn.hook_z"), final=final,
        model_logp=torch.log_softmax(real, -1)[rows, targets],
    )
    _verify(model, cache, real, check_tol, dm)
    return cache


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / (b.norm() + 1e-6))


def _verify(model: Any, cache: LensCache, real: Tensor, tol: float, dm: int) -> None:
    with torch.no_grad():
        lens_lp = torch.log_softmax(cache.lens.logits(cache.final, cache.scale), -1)
        err = float((lens_lp - torch.log_softmax(real, -1)).abs().max())
    if not err <= tol:
        raise ModelError(
            f"the frozen-scale lens W_U·norm(x) + b_U does not reproduce {model_name(model)}'s own log-probabilities "
            f"(max |Δ log p| = {err:.3g} > {tol}): its final norm is not w ⊙ (x - mean) / s + b (e.g. Gemma's "
            "(1 + w) RMSNorm) or its logits are transformed after the unembedding. This model is not supported by "
            "the log-probability lens"
        )
    nxt = torch.cat([cache.resid_pre[:, 1:], cache.final[:, None]], dim=1)
    W_out = model.W_out.detach().float()
    b_out = _param(model, "b_out")
    mlp = torch.einsum("bli,lid->bld", cache.post, W_out) + (0.0 if b_out is None else b_out.detach().float()[None])
    for what, got, want in (
        ("resid_mid = resid_pre + attn_out", cache.resid_pre + cache.attn_out, cache.resid_mid),
        ("the next residual = resid_mid + mlp_out", cache.resid_mid + cache.mlp_out, nxt),
        ("mlp_out = hook_post · W_out + b_out", mlp, cache.mlp_out),
    ):
        r = _rel(got, want)
        if not r <= 1e-3:
            raise ModelError(
                f"{model_name(model)}'s residual stream does not decompose as the lens assumes ({what} fails, "
                f"relative error {r:.2g}): a post-norm on the block outputs (e.g. Gemma) or parallel blocks. The "
                "log-probability lens supports pre-norm models whose blocks add their outputs to the residual"
            )


def _batches(prompts: Sequence[Prompt], size: int) -> Iterator[tuple[int, list[Prompt]]]:
    for i in range(0, len(prompts), size):
        yield i, list(prompts[i : i + size])


# ---------------------------------------------------------------- the per-neuron log-sum-exp


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


def _delta_lse(
    P: Float[Tensor, "c vocab"],
    base: Float[Tensor, "k vocab"],
    base_lse: Float[Tensor, "k"],
    coef: Float[Tensor, "k c"],
    *,
    engine: str,
    radius: float,
    tol: float,
) -> tuple[Float[Tensor, "k c"], Float[Tensor, "c"]]:
    """Δ[k, i] = lse(base_k + coef[k, i] P_i) - lse(base_k) - coef[k, i] mid_i, in float64, and mid.

    The row's mid-range ``mid_i`` is split off so that a caller's ``coef · (P_iw - mid_i) - Δ`` loses no
    precision to the cancellation of two large terms.
    """
    hi, lo = P.amax(1), P.amin(1)
    mid = (hi + lo) / 2
    K, C = coef.shape
    out = torch.empty(K, C, dtype=torch.float64, device=P.device)
    mid64 = mid.double()
    if engine == "direct":
        for k in range(K):
            X = torch.addcmul(base[k], coef[k, :, None], P)
            out[k] = torch.logsumexp(X, 1).double() - float(base_lse[k]) - coef[k].double() * mid64
        return out, mid
    R = (hi - lo) / 2
    Rs = torch.where(R > 0, R, torch.ones_like(R))
    t = coef * R[None]
    small = t.abs() <= radius
    if bool(small.any()):
        rho = float(t.abs()[small].max())
        order = _series_order(rho, tol)
        series = torch.ones(K, C, dtype=torch.float64, device=P.device)
        if order > 0:
            S = torch.exp(base - base_lse[:, None])  # softmax of each base: the moments' weights
            Y = (P - mid[:, None]) / Rs[:, None]
            Z = Y
            term = torch.ones(K, C, dtype=torch.float64, device=P.device)
            t64 = t.double()
            for n in range(1, order + 1):
                if n == 2:
                    Z = Y * Y
                elif n > 2:
                    Z.mul_(Y)
                term = term * t64 / n
                series += term * (S @ Z.T).double()
        out = torch.log(series)
    big = ~small
    if bool(big.any()):
        for k in torch.nonzero(big.any(1))[:, 0].tolist():
            idx = torch.nonzero(big[k])[:, 0]
            X = torch.addcmul(base[k], coef[k, idx, None], P[idx])
            out[k, idx] = torch.logsumexp(X, 1).double() - float(base_lse[k]) - coef[k, idx].double() * mid64[idx]
    return out, mid


def _layer_scores_exact(
    W_l: Float[Tensor, "d_mlp d_model"], U: Float[Tensor, "d_model vocab"], base: Float[Tensor, "k vocab"],
    coef: Float[Tensor, "k d_mlp"], targets: Int[Tensor, "k"], cfg: LensConfig,
) -> Float[Tensor, "k d_mlp"]:
    """log p(w | b + a_i W_out[l, i]) - log p(w | b) for every neuron of one layer and every prompt k."""
    base_lse = torch.logsumexp(base, -1)
    out = torch.empty(coef.shape, dtype=torch.float32, device=coef.device)
    for c0 in range(0, W_l.shape[0], cfg.chunk):
        c1 = min(c0 + cfg.chunk, W_l.shape[0])
        P = W_l[c0:c1] @ U
        delta, mid = _delta_lse(P, base, base_lse, coef[:, c0:c1], engine=cfg.engine, radius=cfg.series_radius,
                                tol=cfg.series_tol)
        Pw = (P[:, targets].T - mid[None]).double()  # [k, c]: each prompt's own target column
        out[:, c0:c1] = (coef[:, c0:c1].double() * Pw - delta).float()
    return out


# ---------------------------------------------------------------- value neurons


def neuron_scores(
    model: Any, prompts: Sequence[Prompt], cfg: LensConfig = LensConfig(), *, progress: bool = False,
) -> Float[Tensor, "prompt layer d_mlp"]:
    """Exact log-probability increase of every FFN neuron for each prompt (float32, on the CPU).

    Per batch of ``cfg.batch_size`` prompts: one forward pass, then per layer the products W_out[l, chunk] · U
    (shared by the batch) and the per-neuron log-sum-exps (``cfg.engine``).
    """
    L, dm = n_layers(model), d_mlp(model)
    out = torch.empty(len(prompts), L, dm)
    W_out = model.W_out.detach().float()
    it: Any = _batches(prompts, cfg.batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(list(it), desc="lens", unit="batch")
    with torch.no_grad():
        for start, batch in it:
            cache = lens_cache(model, batch, check_tol=cfg.check_tol)
            base = cache.base_logits()
            a = cache.coefficients
            for layer in range(L):
                out[start : start + len(batch), layer] = _layer_scores_exact(
                    W_out[layer], cache.lens.U, base[:, layer], a[:, layer], cache.targets, cfg).cpu()
    return out


def _rows_exact(
    cache: LensCache, W_out: Float[Tensor, "layer d_mlp d_model"], b: int, layers: Int[Tensor, "n"],
    neurons: Int[Tensor, "n"], base: Float[Tensor, "layer vocab"], base_lse: Float[Tensor, "layer"],
) -> Float[Tensor, "n"]:
    """Exact scores of the given neurons for prompt ``b`` of the cache (a direct log-sum-exp per neuron)."""
    out = torch.empty(layers.shape[0], dtype=torch.float32, device=W_out.device)
    w = cache.targets[b]
    a = cache.coefficients[b]
    for layer in torch.unique(layers).tolist():
        sel = torch.nonzero(layers == layer)[:, 0]
        idx = neurons[sel]
        P = W_out[layer, idx] @ cache.lens.U
        coef = a[layer, idx]
        lse = torch.logsumexp(torch.addcmul(base[layer], coef[:, None], P), 1)
        out[sel] = (coef.double() * P[:, w].double() - (lse.double() - float(base_lse[layer]))).float()
    return out


def score_neurons(
    model: Any, prompts: Sequence[Prompt], neurons: Int[Tensor, "n 2"], cfg: LensConfig = LensConfig(),
) -> Float[Tensor, "prompt n"]:
    """Exact log-probability increase of the given (layer, neuron) pairs on every prompt."""
    L, dm = n_layers(model), d_mlp(model)
    neurons = torch.as_tensor(neurons).long().reshape(-1, 2)
    if neurons.numel() and not (bool(((neurons[:, 0] >= 0) & (neurons[:, 0] < L)).all())
                                and bool(((neurons[:, 1] >= 0) & (neurons[:, 1] < dm)).all())):
        raise QrncaError(f"neurons must be (layer, neuron) pairs with layer < {L} and neuron < {dm}")
    out = torch.empty(len(prompts), neurons.shape[0])
    W_out = model.W_out.detach().float()
    with torch.no_grad():
        for start, batch in _batches(prompts, cfg.batch_size):
            cache = lens_cache(model, batch, check_tol=cfg.check_tol)
            base = cache.base_logits()
            base_lse = torch.logsumexp(base, -1)
            dev = neurons.to(W_out.device)
            for b in range(cache.size):
                out[start + b] = _rows_exact(cache, W_out, b, dev[:, 0], dev[:, 1], base[b], base_lse[b]).cpu()
    return out


@dataclass(frozen=True)
class TopNeurons:
    """The k FFN neurons with the largest log-probability increase on one prompt, best first.

    ``certified``: every neuron not scored exactly has a first-order bound below the k-th score, so this is the
    exact top k (always True in exact mode). ``rescored``: neurons scored exactly. ``threshold``: the k-th score.
    """

    neurons: Int[Tensor, "k 2"]
    scores: Float[Tensor, "k"]
    certified: bool
    rescored: int
    threshold: float

    def to_list(self) -> list[list[Any]]:
        return [[int(a), int(b), float(s)] for (a, b), s in zip(self.neurons.tolist(), self.scores.tolist())]


def _top_from_scores(scores: Float[Tensor, "layer d_mlp"], k: int) -> TopNeurons:
    dm = scores.shape[1]
    vals, idx = torch.topk(scores.flatten(), k)
    neurons = torch.stack([idx // dm, idx % dm], dim=1)
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


def _top_bound(
    cache: LensCache, W_out: Float[Tensor, "layer d_mlp d_model"], k: int, cfg: LensConfig,
) -> list[TopNeurons]:
    """Exact top k per prompt: rescore in decreasing order of the (upper-bounding) tangent until certified."""
    base, base_lse, ub = _first_order(cache, W_out)
    dm = W_out.shape[1]
    a = cache.coefficients
    out = []
    for b in range(cache.size):
        flat_ub = ub[b].flatten()
        zero = a[b].flatten() == 0  # exactly silent neurons score exactly 0: no need to rescore them
        order = torch.argsort(torch.where(zero, torch.full_like(flat_ub, -math.inf), flat_ub), descending=True)
        n_live = int((~zero).sum())
        order = order[:n_live]
        got_idx: list[Tensor] = []
        got_val: list[Tensor] = []
        n, step, certified = 0, max(2 * k, 32), False
        while True:
            take = order[n : n + step]
            n += int(take.numel())
            if take.numel():
                got_idx.append(take)
                got_val.append(_rows_exact(cache, W_out, b, take // dm, take % dm, base[b], base_lse[b]))
            vals = torch.cat(got_val) if got_val else torch.empty(0, device=W_out.device)
            n_known = int(vals.numel()) + int(zero.sum())
            if n_known >= k:
                kth = _kth(vals, int(zero.sum()), k)
                if n >= n_live:
                    certified = True
                    break
                nxt = float(flat_ub[order[n]])
                if kth >= nxt + 1e-6 * (1.0 + abs(nxt)):
                    certified = True
                    break
            if n >= n_live:
                certified = True
                break
            if n >= cfg.max_rescore:
                break
            step *= 2
        idx = torch.cat(got_idx) if got_idx else torch.empty(0, dtype=torch.long, device=W_out.device)
        vals = torch.cat(got_val) if got_val else torch.empty(0, device=W_out.device)
        if vals.numel() < k:  # pad with silent neurons (score exactly 0)
            extra = torch.nonzero(zero)[: k - vals.numel(), 0]
            idx = torch.cat([idx, extra])
            vals = torch.cat([vals, torch.zeros(extra.numel(), device=vals.device)])
        top_v, top_i = torch.topk(vals, k)
        flat = idx[top_i]
        out.append(TopNeurons(torch.stack([flat // dm, flat % dm], 1).cpu(), top_v.cpu(), certified, n,
                              float(top_v[-1])))
    return out


def _kth(vals: Tensor, n_zero: int, k: int) -> float:
    allv = torch.cat([vals, torch.zeros(min(n_zero, k), device=vals.device)])
    return float(torch.topk(allv, k).values[-1])


def top_neurons(
    model: Any, prompts: Sequence[Prompt], k: int = 10, cfg: LensConfig = LensConfig(mode="topk"),
) -> list[TopNeurons]:
    """The top-k FFN neurons of each prompt by log-probability increase (``cfg.mode``: exact or topk)."""
    L, dm = n_layers(model), d_mlp(model)
    if not 1 <= k <= L * dm:
        raise QrncaError(f"k must be between 1 and {L * dm} (all neurons), got {k}")
    if cfg.mode == "exact":
        return [_top_from_scores(s, k) for s in neuron_scores(model, prompts, cfg)]
    W_out = model.W_out.detach().float()
    out: list[TopNeurons] = []
    with torch.no_grad():
        for _, batch in _batches(prompts, cfg.batch_size):
            out += _top_bound(lens_cache(model, batch, check_tol=cfg.check_tol), W_out, k, cfg)
    return out


# ---------------------------------------------------------------- layers and heads


def _lp(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) for logits [batch, ..., vocab] and targets [batch]."""
    lp = torch.log_softmax(logits, -1)
    idx = targets.reshape(-1, *([1] * (lp.dim() - 1))).expand(*lp.shape[:-1], 1)
    return lp.gather(-1, idx)[..., 0]


def _value_constants(model: Any, weights: _Weights) -> Float[Tensor, "layer head d_head"]:
    """Each head's constant value share: ln1's bias through W_V plus b_V (zero once TL folded them into b_O)."""
    H = int(model.cfg.n_heads)
    W_V = _expand_heads(weights.need("W_V"), H)  # [L, H, d, e]
    L, _, d, e = W_V.shape
    const = _expand_heads(weights.bias("b_V", (L, H, e)), H).clone()
    for layer in range(L):
        b1 = _param(model.blocks[layer].ln1, "b")
        if b1 is not None:
            const[layer] += torch.einsum("d,hde->he", b1.detach().float(), W_V[layer])
    return const


def head_vectors(model: Any, cache: LensCache) -> tuple[Float[Tensor, "batch layer head d_model"], Float[Tensor, "batch layer d_model"]]:
    """Each head's output at the target, without its constant share, and the attention layer's constant part.

    A head's vector is (z_h - c_h) W_O[h], with c_h = b_ln1 · W_V[h] + b_V[h] the value vector of a zero
    normalised input (the pattern sums to 1, so c_h passes unchanged). TL's fold_value_biases moves exactly these
    constants into b_O, so head scores do not depend on weight processing. The constant part is
    attn_out - Σ_h head_h = b_O + Σ_h c_h W_O[h]; it is checked against the model.
    """
    weights = _Weights(model)
    H = int(model.cfg.n_heads)
    W_O = _expand_heads(weights.need("W_O"), H)
    heads = torch.einsum("blhe,lhed->blhd", cache.z - _value_constants(model, weights)[None], W_O)
    rest = cache.attn_out - heads.sum(2)
    L, d = W_O.shape[0], W_O.shape[-1]
    expected = weights.bias("b_O", (L, d)) + torch.einsum("lhe,lhed->ld", _value_constants(model, weights), W_O)
    r = _rel(rest, expected[None].expand_as(rest))
    if not r <= 1e-3 * (1 + float(cache.attn_out.norm() / (expected.norm() + 1e-6))):
        raise ModelError(
            f"{model_name(model)}'s attention output is not Σ_h z_h W_O[h] + b_O (relative error {r:.2g}); "
            "per-head scores are not supported for this architecture"
        )
    return heads, rest


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
    embed_logp: Float[Tensor, "prompt"]
    final_logp: Float[Tensor, "prompt"]


def layer_scores(model: Any, prompts: Sequence[Prompt], cfg: LensConfig = LensConfig()) -> LayerScores:
    """FFN layer, attention layer and head scores (float32, on the CPU)."""
    parts: dict[str, list[Tensor]] = {k: [] for k in ("ffn", "attn", "heads", "attn_const", "embed", "final")}
    with torch.no_grad():
        for _, batch in _batches(prompts, cfg.batch_size):
            c = lens_cache(model, batch, check_tol=cfg.check_tol)
            L = c.resid_pre.shape[1]
            s = c.scale[:, None].expand(-1, L)

            def lp(x: Tensor, scale: Tensor = s) -> Tensor:
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


def attention_source_scores(model: Any, prompt: Prompt, cfg: LensConfig = LensConfig()) -> Float[Tensor, "layer head pos"]:
    """Scores of each head's per-source-position subvalues at the target: A[h, t, j] (v_j - c_h) W_O[h].

    ``pos`` runs over the prompt's positions 0..t (the target position t included). Summed over positions they
    give the head's vector of ``head_vectors``.
    """
    L, H = n_layers(model), int(model.cfg.n_heads)
    names = [f"blocks.{layer}.attn.hook_{k}" for layer in range(L) for k in ("pattern", "v")]
    missing = [n for n in names if n not in model.hook_dict]
    if missing:
        raise ModelError(f"{model_name(model)} lacks the attention hooks {missing[:2]}; per-source scores need them")
    store: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any) -> Tensor:
        store[hook.name] = act.detach().float()
        return act

    t = prompt.target_position
    with torch.no_grad():
        cache = lens_cache(model, [prompt], check_tol=cfg.check_tol)
        ids = torch.tensor([list(prompt.tokens)], device=model_device(model))
        with hooked(model, fwd=[(n, keep) for n in names]):
            model(ids)
        weights = _Weights(model)
        W_O = _expand_heads(weights.need("W_O"), H)
        const = _value_constants(model, weights)
        out = torch.empty(L, H, t + 1)
        for layer in range(L):
            A = store[f"blocks.{layer}.attn.hook_pattern"][0, :, t, : t + 1]  # [H, src]
            v = store[f"blocks.{layer}.attn.hook_v"][0, : t + 1]  # [src, kv_head, e]
            v = v.repeat_interleave(H // v.shape[1], dim=1) if v.shape[1] != H else v
            vec = torch.einsum("hj,jhe,hed->hjd", A, v - const[layer][None], W_O[layer])  # [H, src, d]
            b = cache.resid_pre[0, layer]
            base = _lp(cache.lens.logits(b[None], cache.scale), cache.targets)[0]
            lp = _lp(cache.lens.logits(b + vec, cache.scale[0].expand(H, t + 1)),
                     cache.targets[0].expand(H))
            out[layer] = (lp - base).cpu()
    return out


# ---------------------------------------------------------------- query neurons


def value_keys(model: Any, layer: int, neuron: int) -> dict[str, Float[Tensor, "d_model"]]:
    """The input keys of FFN neuron (layer, neuron): ``{"up": κ, "gate": κ}`` for a GLU, ``{"in": κ}`` otherwise.

    κ = C(w_ln2 ⊙ k), k the neuron's column of W_in (up / plain) or W_gate, w_ln2 the weight of the norm that
    feeds the MLP and C the mean removal for LayerNorm. Then the pre-activation is <resid_mid, κ> / s_ln2 plus a
    constant, and <x, κ> = <C x, κ> splits linearly over the residual's components.
    """
    L, dm = n_layers(model), d_mlp(model)
    if not 0 <= layer < L:
        raise QrncaError(f"layer {layer} is out of range for a {L}-layer model")
    if not 0 <= neuron < dm:
        raise QrncaError(f"neuron {neuron} is out of range (d_mlp = {dm})")
    ln2 = model.blocks[layer].ln2
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


@dataclass(frozen=True)
class QueryNeurons:
    """Query scores for one value neuron (``layer``, ``neuron``) and one of its keys, on one prompt.

    A component's score is ``importance · <component, κ> / total`` with total = <resid_mid[layer], κ>, so
    ``embed + Σ attn_layers + Σ ffn_layers == importance``; each FFN layer's score is the sum of its neurons'
    plus its bias's (``ffn_layers - neurons.sum(-1)``), each attention layer's the sum of its heads' plus its
    constant part's. Rows at or above ``layer`` (FFN) and above ``layer`` (attention) are zero.
    """

    layer: int
    neuron: int
    key: str
    importance: float
    kappa: Float[Tensor, "d_model"]
    total: float
    neurons: Float[Tensor, "layer d_mlp"]
    heads: Float[Tensor, "layer head"]
    ffn_layers: Float[Tensor, "layer"]
    attn_layers: Float[Tensor, "layer"]
    embed: float

    def top(self, k: int = 10) -> list[list[Any]]:
        """The k FFN query neurons with the largest scores: [[layer, neuron, score], ...]."""
        dm = self.neurons.shape[1]
        vals, idx = torch.topk(self.neurons.flatten(), min(k, self.neurons.numel()))
        return [[int(i // dm), int(i % dm), float(v)] for i, v in zip(idx.tolist(), vals.tolist())]


def query_neurons(model: Any, prompt: Prompt, layer: int, neuron: int, cfg: LensConfig = LensConfig()) -> dict[str, QueryNeurons]:
    """Query neurons, heads and layers of value neuron (layer, neuron) on ``prompt``, one entry per key."""
    keys = value_keys(model, layer, neuron)
    with torch.no_grad():
        c = lens_cache(model, [prompt], check_tol=cfg.check_tol)
        W_out = model.W_out.detach().float()
        base = c.base_logits()[0]
        imp = float(_rows_exact(c, W_out, 0, torch.tensor([layer], device=W_out.device),
                                torch.tensor([neuron], device=W_out.device), base, torch.logsumexp(base, -1))[0])
        heads, rest = head_vectors(model, c)
        L, dm = c.post.shape[1], c.post.shape[2]
        out = {}
        for name, kap in keys.items():
            total = float(c.resid_mid[0, layer] @ kap)
            if total == 0.0:
                raise QrncaError(f"<resid_mid, κ> is exactly 0 for neuron ({layer}, {neuron}): its {name} key reads "
                                 "nothing, so no component can be its query")
            f = imp / total
            per = torch.einsum("li,lid,d->li", c.post[0], W_out, kap) * f  # each neuron's m_i <W_out[j, i], κ>
            per[layer:] = 0.0
            ffn = (c.mlp_out[0] @ kap) * f
            ffn[layer:] = 0.0
            attn = (c.attn_out[0] @ kap) * f
            attn[layer + 1 :] = 0.0
            hd = (heads[0] @ kap) * f
            hd[layer + 1 :] = 0.0
            out[name] = QueryNeurons(layer, neuron, name, imp, kap.cpu(), total, per.cpu(), hd.cpu(), ffn.cpu(),
                                     attn.cpu(), float(c.resid_pre[0, 0] @ kap) * f)
    return out


# ---------------------------------------------------------------- the paper's comparison


def baseline_scores(
    model: Any, prompts: Sequence[Prompt], cfg: LensConfig = LensConfig(),
) -> dict[str, Float[Tensor, "prompt layer d_mlp"]]:
    """The paper's score and its 7 static alternatives for every FFN neuron (higher = more important).

    With a_i = m_i / s, P_i = W_out[l, i] U the neuron's row through the frozen lens, b = resid_mid[l]:

    - ``log_prob_increase``: log p(w | b + v) - log p(w | b) (the method).
    - ``prob_increase``: p(w | b + v) - p(w | b).
    - ``log_prob_alone``: log softmax(a_i P_i)[w], the lens of v alone (no bias terms).
    - ``norm``: ||W_out[l, i]|| (mean-removed for LayerNorm), the norm of the neuron's value vector; the norm of
      v itself is ``coef_x_norm``.
    - ``coefficient``: |m_i|.
    - ``rank``: 1 / rank of w in v's projection a_i P_i, rank = #{u : a_i P_iu >= a_i P_iw} (1 = w on top; ties
      count against w, so a silent neuron ranks last).
    - ``coef_x_norm``: |m_i| · norm = ||v||.
    - ``coef_x_rank``: |m_i| / rank (a large coefficient and a high rank of w both raise it).
    """
    L, dm = n_layers(model), d_mlp(model)
    out = {k: torch.empty(len(prompts), L, dm) for k in BASELINES}
    W_out = model.W_out.detach().float()
    with torch.no_grad():
        for start, batch in _batches(prompts, cfg.batch_size):
            c = lens_cache(model, batch, check_tol=cfg.check_tol)
            sl = slice(start, start + len(batch))
            base_all = c.base_logits()
            a_all = c.coefficients
            B, V = c.size, base_all.shape[-1]
            for layer in range(L):
                base = base_all[:, layer]
                base_lse = torch.logsumexp(base, -1)
                base_lp = base[torch.arange(B), c.targets] - base_lse
                zeros = torch.zeros_like(base)
                zeros_lse = torch.full_like(base_lse, math.log(V))
                for c0 in range(0, dm, cfg.chunk):
                    c1 = min(c0 + cfg.chunk, dm)
                    a = a_all[:, layer, c0:c1]
                    P = W_out[layer, c0:c1] @ c.lens.U
                    Pw = P[:, c.targets].T  # [B, C]
                    kw = dict(engine=cfg.engine, radius=cfg.series_radius, tol=cfg.series_tol)
                    d_inc, mid = _delta_lse(P, base, base_lse, a, **kw)
                    d_alone, _ = _delta_lse(P, zeros, zeros_lse, a, **kw)
                    centered_pw = (Pw - mid[None]).double()
                    inc = a.double() * centered_pw - d_inc
                    out["log_prob_increase"][sl, layer, c0:c1] = inc.float().cpu()
                    out["prob_increase"][sl, layer, c0:c1] = (
                        torch.exp(base_lp.double()[:, None] + inc) - torch.exp(base_lp.double())[:, None]).float().cpu()
                    out["log_prob_alone"][sl, layer, c0:c1] = (
                        a.double() * centered_pw - d_alone - math.log(V)).float().cpu()
                    sign = torch.sign(a)
                    rank = torch.stack([
                        ((sign[b][:, None] * (P - Pw[b][:, None])) >= 0).sum(1) for b in range(B)
                    ]).float()
                    rank = torch.where(sign == 0, torch.full_like(rank, float(V)), rank)
                    out["rank"][sl, layer, c0:c1] = (1.0 / rank).cpu()
            m = c.post.abs()
            norm = c.lens.center(W_out).norm(dim=-1)  # [L, d_mlp]
            out["norm"][sl] = norm.cpu()[None].expand(len(batch), -1, -1)
            out["coefficient"][sl] = m.cpu()
            out["coef_x_norm"][sl] = (m * norm[None]).cpu()
            out["coef_x_rank"][sl] = m.cpu() * out["rank"][sl]
    return out


def _ablation_hooks(model: Any, neurons: Sequence[Tensor], pos: Tensor) -> list[tuple[str, Any]]:
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
        idx = tuple(torch.tensor(x, device=pos.device) for x in (r, p, n))

        def zero(act: Tensor, hook: Any, idx: tuple[Tensor, Tensor, Tensor] = idx) -> Tensor:
            out = act.clone()
            out[idx] = 0.0
            return out

        hooks.append((post_hook_name(model, layer), zero))
    return hooks


def ablation_metrics(
    model: Any, prompts: Sequence[Prompt], neurons: Sequence[Tensor] | None = None, *, batch_size: int = 16,
) -> dict[str, Float[Tensor, "prompt"]]:
    """The model's reciprocal rank, probability and log-probability of each prompt's (first) target token, with
    ``neurons[p]`` ((layer, neuron) pairs) zeroed in ``hook_post`` at prompt p's target position (none: clean).

    rank = 1 + #{tokens with a strictly larger logit}.
    """
    if neurons is not None and len(neurons) != len(prompts):
        raise QrncaError(f"neurons must hold one set per prompt ({len(prompts)}), got {len(neurons)}")
    device = model_device(model)
    res: dict[str, list[Tensor]] = {"rr": [], "prob": [], "logprob": []}
    with torch.no_grad():
        for start, batch in _batches(prompts, batch_size):
            _check_prompts(model, batch)
            ids, pos, targets = _padded(batch, device)
            rows = torch.arange(len(batch), device=device)
            hooks = [] if neurons is None else _ablation_hooks(model, neurons[start : start + len(batch)], pos)
            with hooked(model, fwd=hooks):
                logits = model(ids)[rows, pos].float()
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
    model: Any, prompts: Sequence[Prompt], *, k: int = 10, seed: int = 0, random_repeats: int = 3,
    cfg: LensConfig = LensConfig(),
) -> list[dict[str, Any]]:
    """The paper's comparison: ablate each score's top-k neurons per prompt, against random neurons.

    One row per method (``BASELINES``, then ``"random"``): the mean over prompts of the reciprocal rank (MRR),
    probability and log-probability of the target before and after zeroing the k neurons at the target position,
    and the drops (before - after; larger = the neurons mattered more). Random neurons are k distinct neurons per
    prompt drawn with a ``torch.Generator`` seeded with ``seed`` (the global RNG is untouched), averaged over
    ``random_repeats`` draws.
    """
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


def comparison_report(model: Any, rows: list[dict[str, Any]], *, seed: int = 0, name: str | None = None) -> dict[str, Any]:
    """The comparison table as a JSON-ready document (``json.dumps(comparison_report(...))``)."""
    return {
        "model": name or model_name(model),
        "metric": "ablate each score's top-k FFN neurons (hook_post zeroed at the target position); drops in MRR, "
                  "probability and log-probability of the target token, averaged over prompts",
        "seed": seed,
        "rows": rows,
    }


# ---------------------------------------------------------------- as a locator


def _query_top(model: Any, prompts: Sequence[Prompt], top_k: int, cfg: LensConfig,
               W_out: Tensor) -> tuple[list[list[Any]], bool, list[float]]:
    """The top_k neurons of a query by log-prob increase averaged over its prompts (certified when possible)."""
    L, dm = W_out.shape[0], W_out.shape[1]
    cache = lens_cache(model, prompts, check_tol=cfg.check_tol)
    base = cache.base_logits()
    base_lse = torch.logsumexp(base, -1)
    kk = min(top_k, L * dm)
    while True:
        if cfg.mode == "exact":
            tops = [_top_from_scores(torch.stack([
                _layer_scores_exact(W_out[layer], cache.lens.U, base[b : b + 1, layer], cache.coefficients[b : b + 1, layer],
                                    cache.targets[b : b + 1], cfg)[0] for layer in range(L)]), kk)
                for b in range(cache.size)]
        else:
            tops = _top_bound(cache, W_out, kk, cfg)
        union = torch.unique(torch.cat([t.neurons for t in tops]).to(W_out.device), dim=0)
        per = torch.stack([_rows_exact(cache, W_out, b, union[:, 0], union[:, 1], base[b], base_lse[b])
                           for b in range(cache.size)])
        mean = per.mean(0)
        bound = sum(t.threshold for t in tops) / len(tops)  # no neuron outside the union averages more
        order = torch.argsort(mean, descending=True)[:top_k]
        certified = all(t.certified for t in tops)
        done = len(order) >= top_k and float(mean[order[-1]]) >= bound
        if done or kk >= L * dm:
            break
        kk = min(2 * kk, L * dm)
    rows = [[int(union[i, 0]), int(union[i, 1]), float(mean[i])] for i in order.tolist()]
    return rows, certified and (done or kk >= L * dm), cache.model_logp.cpu().tolist()


def lens_locate(
    model: Any,
    queries: Sequence[Query],
    proxy_cfg: ProxyConfig,
    *,
    pool: Sequence[Query] | None = None,
    top_k: int = 20,
    progress: bool = True,
    cfg: LensConfig = LensConfig(mode="topk"),
) -> dict[str, Any]:
    """The log-prob-increase locator: each query's top_k FFN neurons, in the ``neurons.json`` schema.

    A neuron's score is its log-probability increase (first target token, target position) **averaged** over the
    query's prompts. The top_k by that mean is exact: per prompt, a certified top kk and its kk-th score bound
    every other neuron, and kk doubles until the top_k-th mean clears the mean of those bounds. There are no
    common neurons (an empty list): the method has no collection-level step.
    """
    if top_k < 1:
        raise QrncaError(f"top_k must be at least 1, got {top_k}")
    if not queries:
        raise QrncaError("no queries to locate (the data set is empty)")
    ids = [q.id for q in queries]
    if len(set(ids)) != len(ids):
        raise QrncaError("query ids repeat; every query needs its own id")
    bos = proxy_cfg.prepend_bos if proxy_cfg.prepend_bos is not None else default_prepend_bos(model)
    proxy = replace(proxy_cfg, prepend_bos=bos)
    prompts = build_all_prompts(queries, proxy, tokenizer_of(model), pool=pool, prepend_bos=bos)
    W_out = model.W_out.detach().float()
    it: Any = queries
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(queries, desc="lens", unit="query")
    out: dict[str, Any] = {}
    with torch.no_grad():
        for q in it:
            rows, certified, logps = _query_top(model, prompts[q.id], top_k, cfg, W_out)
            out[q.id] = {"group": q.group, "qr_neurons": rows, "certified": certified,
                         "target_logprob": sum(logps) / len(logps)}
    L = n_layers(model)
    return {
        "config": {
            "method": "logprob-increase",
            "score": "log-probability increase of the first target token at the target position, averaged over "
                     "the query's prompts",
            "top_k": top_k,
            "proxy": proxy.to_dict(),
            "lens": cfg.to_dict(),
        },
        "model": model_name(model),
        "data": None,
        "layers": list(range(L)),
        "common_neurons": [],
        "queries": out,
        "summary": {"n_queries": len(out), "mean_qr_neurons": sum(len(v["qr_neurons"]) for v in out.values()) / len(out),
                    "n_common_neurons": 0, "all_certified": all(v["certified"] for v in out.values())},
    }


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)


def cmd_lens(args: argparse.Namespace) -> int:
    """``qrnca-lens lens``: write OUT/neurons.json (and OUT/lens.json with ``--compare``)."""
    from . import models
    from .data import limit_per_group, load_data

    bos_arg = getattr(args, "bos", "auto")
    bos = {"auto": None, "yes": True, "no": False}.get(bos_arg, bos_arg) if isinstance(bos_arg, str) else bos_arg
    proxy = ProxyConfig(args.proxy, n_prompts=args.templates, n_shots=args.shots, seed=args.seed,
                        prepend_bos=bos, chat_template=bool(getattr(args, "chat", False)))
    quiet = bool(getattr(args, "quiet", False))
    pool = load_data(args.data)
    queries = limit_per_group(pool, args.limit)
    model = models.load_model(args.model, verbose=not quiet)
    cfg = LensConfig(mode=getattr(args, "lens_mode", "topk") or "topk")
    doc = lens_locate(model, queries, proxy, pool=pool, top_k=args.top_k, progress=not quiet, cfg=cfg)
    doc["model"], doc["data"] = args.model, args.data
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "neurons.json", doc)
    s = doc["summary"]
    print(f"{s['n_queries']} queries: top {args.top_k} neurons each by log-probability increase "
          f"({'all certified exact' if s['all_certified'] else 'some uncertified'}); wrote {out / 'neurons.json'}")
    if getattr(args, "compare", False):
        bos_resolved = doc["config"]["proxy"]["prepend_bos"]
        prompts = build_all_prompts(queries, replace(proxy, prepend_bos=bos_resolved), tokenizer_of(model),
                                    pool=pool, prepend_bos=bos_resolved)
        flat = [p for q in queries for p in prompts[q.id]]
        n = getattr(args, "compare_prompts", None)
        flat = flat[:n] if n else flat
        rows = compare_methods(model, flat, k=getattr(args, "compare_k", 10), seed=args.seed)
        _write_json(out / "lens.json", comparison_report(model, rows, seed=args.seed, name=args.model))
        print(f"{'method':<18} {'MRR drop':>9} {'p drop':>9} {'log p drop':>11}")
        for r in rows:
            print(f"{r['method']:<18} {r['mrr_drop']:>9.4f} {r['prob_drop']:>9.4f} {r['logprob_drop']:>11.4f}")
        print(f"wrote {out / 'lens.json'}")
    return 0
