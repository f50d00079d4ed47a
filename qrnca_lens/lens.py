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
      (1e-8: below float32 rounding of a direct logsumexp). (prompt, neuron) pairs with ρ > ``series_radius``
      go through the direct logsumexp: on SmolLM2 about 5% of the last layer's and well under 1% elsewhere.
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
    >>> from qrnca_lens.data import load_data
    >>> from qrnca_lens.lens import LensConfig, neuron_scores, query_neurons, top_neurons
    >>> from qrnca_lens.models import load_model
    >>> from qrnca_lens.proxies import ProxyConfig, build_all_prompts
    >>> pool = load_data("builtin:facts")
    >>> model = load_model("smollm2")                                          # doctest: +SKIP
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
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .atomic import write_json_atomic
from .versions import library_versions, model_identity
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
    chunk: int = 256
    batch_size: int = 32
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

    def layer_logits(self, layer: int) -> Float[Tensor, "batch vocab"]:
        """The lens of FFN layer ``layer``'s "before" vector, resid_mid[layer]."""
        return self.lens.logits(self.resid_mid[:, layer], self.scale)


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


def _post_names(model: Any) -> list[str]:
    d_mlp(model)
    try:
        return [post_hook_name(model, layer) for layer in range(n_layers(model))]
    except ModelError as e:
        raise ModelError(f"the log-probability lens scores FFN neurons, read at hook_post: {e} (an attention-only "
                         "model has no FFN neurons to score)") from None


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
    L = n_layers(model)
    posts = _post_names(model)
    names = _hook_names(model)
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
    _verify(model, cache, real, check_tol)
    return cache


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / (b.norm() + 1e-6))


def _verify(model: Any, cache: LensCache, real: Tensor, tol: float) -> None:
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


def _start(model: Any, prompts: Sequence[Prompt]) -> Tensor:
    """Guards shared by the public functions; returns W_out [layer, d_mlp, d_model] as float32."""
    if not prompts:
        raise QrncaError("no prompts to score")
    _post_names(model)
    W_out = _param(model, "W_out")
    if W_out is None:
        raise ModelError(f"{model_name(model)} exposes no W_out; the lens needs the FFN output weights")
    return W_out.detach().float()


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


def _lse_(X: Tensor) -> Tensor:
    """log-sum-exp over the last dimension, computed in place (X is overwritten)."""
    m = X.amax(-1, keepdim=True)
    return X.sub_(m).exp_().sum(-1).log_() + m[..., 0]


_BLOCK = 256  # rows per direct log-sum-exp (bounds the temporaries to 256 x vocab floats)


def _delta_lse(
    P: Float[Tensor, "c vocab"],
    base: Float[Tensor, "k vocab"],
    base_lse: Float[Tensor, "k"],
    coef: Float[Tensor, "k c"],
    *,
    engine: str,
    radius: float,
    tol: float,
    weights: Float[Tensor, "k vocab"] | None = None,
) -> tuple[Float[Tensor, "k c"], Float[Tensor, "c"]]:
    """Δ[k, i] = lse(base_k + coef[k, i] P_i) - lse(base_k) - coef[k, i] mid_i, in float64, and mid.

    The row's mid-range ``mid_i`` is split off so that a caller's ``coef · (P_iw - mid_i) - Δ`` loses no
    precision to the cancellation of two large terms. ``weights``: softmax(base), if the caller has it.
    """
    lo, hi = torch.aminmax(P, dim=1)
    mid = (hi + lo) / 2
    K, C = coef.shape
    out = torch.empty(K, C, dtype=torch.float64, device=P.device)
    mid64 = mid.double()
    if engine == "direct":  # one log-sum-exp per prompt and row, the whole chunk at once
        for k in range(K):
            X = torch.addcmul(base[k], coef[k, :, None], P)
            out[k] = _lse_(X).double() - float(base_lse[k]) - coef[k].double() * mid64
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
    for s in range(0, int(ks.numel()), _BLOCK):
        k, c = ks[s : s + _BLOCK], cs[s : s + _BLOCK]
        X = torch.addcmul(base[k], coef[k, c][:, None], P[c])
        out[k, c] = _lse_(X).double() - base_lse[k].double() - coef[k, c].double() * mid64[c]
    return out, mid


def _layer_scores_exact(
    W_l: Float[Tensor, "d_mlp d_model"], U: Float[Tensor, "d_model vocab"], base: Float[Tensor, "k vocab"],
    coef: Float[Tensor, "k d_mlp"], targets: Int[Tensor, "k"], cfg: LensConfig,
) -> Float[Tensor, "k d_mlp"]:
    """log p(w | b + a_i W_out[l, i]) - log p(w | b) for every neuron of one layer and every prompt k."""
    base_lse = torch.logsumexp(base, -1)
    weights = torch.exp(base - base_lse[:, None])
    out = torch.empty(coef.shape, dtype=torch.float32, device=coef.device)
    for c0 in range(0, W_l.shape[0], cfg.chunk):
        c1 = min(c0 + cfg.chunk, W_l.shape[0])
        P = W_l[c0:c1] @ U
        delta, mid = _delta_lse(P, base, base_lse, coef[:, c0:c1], engine=cfg.engine, radius=cfg.series_radius,
                                tol=cfg.series_tol, weights=weights)
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
    W_out = _start(model, prompts)
    L, dm = n_layers(model), d_mlp(model)
    out = torch.empty(len(prompts), L, dm)
    it: Any = _batches(prompts, cfg.batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(list(it), desc="lens", unit="batch")
    with torch.no_grad():
        for start, batch in it:
            cache = lens_cache(model, batch, check_tol=cfg.check_tol)
            a = cache.coefficients
            for layer in range(L):
                out[start : start + len(batch), layer] = _layer_scores_exact(
                    W_out[layer], cache.lens.U, cache.layer_logits(layer), a[:, layer], cache.targets, cfg).cpu()
    return out


def _score_triples(
    cache: LensCache, W_out: Float[Tensor, "layer d_mlp d_model"], rows: Int[Tensor, "n"], layers: Int[Tensor, "n"],
    neurons: Int[Tensor, "n"], base: Float[Tensor, "batch layer vocab"], base_lse: Float[Tensor, "batch layer"],
) -> Float[Tensor, "n"]:
    """Exact scores of neuron (layers[j], neurons[j]) on prompt rows[j] of the cache (a direct log-sum-exp each)."""
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=W_out.device)
    a = cache.coefficients
    for s in range(0, int(rows.numel()), _BLOCK):
        r, l, i = rows[s : s + _BLOCK], layers[s : s + _BLOCK], neurons[s : s + _BLOCK]
        P = W_out[l, i] @ cache.lens.U
        coef = a[r, l, i]
        Pw = P[torch.arange(P.shape[0], device=P.device), cache.targets[r]]
        lse = _lse_(torch.addcmul(base[r, l], coef[:, None], P))
        out[s : s + _BLOCK] = (coef.double() * Pw.double() - (lse.double() - base_lse[r, l].double())).float()
    return out


def score_neurons(
    model: Any, prompts: Sequence[Prompt], neurons: Int[Tensor, "n 2"], cfg: LensConfig = LensConfig(),
) -> Float[Tensor, "prompt n"]:
    """Exact log-probability increase of the given (layer, neuron) pairs on every prompt."""
    W_out = _start(model, prompts)
    L, dm = n_layers(model), d_mlp(model)
    neurons = torch.as_tensor(neurons).long().reshape(-1, 2)
    if neurons.numel() and not (bool(((neurons[:, 0] >= 0) & (neurons[:, 0] < L)).all())
                                and bool(((neurons[:, 1] >= 0) & (neurons[:, 1] < dm)).all())):
        raise QrncaError(f"neurons must be (layer, neuron) pairs with layer < {L} and neuron < {dm}")
    out = torch.empty(len(prompts), neurons.shape[0])
    with torch.no_grad():
        for start, batch in _batches(prompts, cfg.batch_size):
            cache = lens_cache(model, batch, check_tol=cfg.check_tol)
            base = cache.base_logits()
            base_lse = torch.logsumexp(base, -1)
            dev = neurons.to(W_out.device)
            n, B = dev.shape[0], cache.size
            rows = torch.arange(B, device=dev.device).repeat_interleave(n)
            got = _score_triples(cache, W_out, rows, dev[:, 0].repeat(B), dev[:, 1].repeat(B), base, base_lse)
            out[start : start + B] = got.view(B, n).cpu()
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
    groups: Sequence[Sequence[int]] | None = None,
) -> list[TopNeurons]:
    """Exact top k per group of prompts (default: each prompt alone) by the score averaged over the group.

    The group mean of the tangent bounds bounds the group mean of the exact scores, so neurons are rescored (on
    every prompt of the group) in decreasing order of the mean bound until the k-th best exact mean is above
    every remaining bound. All groups advance together: each round is one batched rescoring.
    """
    base, base_lse, ub = _first_order(cache, W_out)
    dm = W_out.shape[1]
    groups = [[b] for b in range(cache.size)] if groups is None else [list(g) for g in groups]
    G = len(groups)
    a = cache.coefficients.flatten(1)
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
        vals = _score_triples(cache, W_out, rows, flat // dm, flat % dm, base, base_lse)
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
        out.append(TopNeurons(torch.stack([f // dm, f % dm], 1).cpu(), top_v.cpu(), certified[gi], n[gi],
                              float(top_v[-1])))
    return out


def _kth(vals: Tensor, n_zero: int, k: int) -> float:
    allv = torch.cat([vals, torch.zeros(min(n_zero, k), device=vals.device)])
    return float(torch.topk(allv, min(k, int(allv.numel()))).values[-1])


def top_neurons(
    model: Any, prompts: Sequence[Prompt], k: int = 10, cfg: LensConfig = LensConfig(mode="topk"),
) -> list[TopNeurons]:
    """The top-k FFN neurons of each prompt by log-probability increase (``cfg.mode``: exact or topk)."""
    W_out = _start(model, prompts)
    L, dm = n_layers(model), d_mlp(model)
    if not 1 <= k <= L * dm:
        raise QrncaError(f"k must be between 1 and {L * dm} (all neurons), got {k}")
    if cfg.mode == "exact":
        return [_top_from_scores(s, k) for s in neuron_scores(model, prompts, cfg)]
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
    err = float((rest - expected[None]).norm())
    scale = float(cache.attn_out.norm()) + float(expected.norm()) * cache.size ** 0.5
    if not err <= 1e-3 * scale + 1e-6:
        raise ModelError(
            f"{model_name(model)}'s attention output is not Σ_h z_h W_O[h] + b_O (error {err:.2g} of {scale:.2g}); "
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
    _start(model, prompts)
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
    _start(model, [prompt])
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
    W_out = _start(model, [prompt])
    keys = value_keys(model, layer, neuron)
    with torch.no_grad():
        c = lens_cache(model, [prompt], check_tol=cfg.check_tol)
        base = c.base_logits()
        one = torch.tensor([0], device=W_out.device)
        imp = float(_score_triples(c, W_out, one, one + layer, one + neuron, base, torch.logsumexp(base, -1))[0])
        heads, rest = head_vectors(model, c)
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
    - ``log_prob_alone``: log p(w | lens(v)), the lens of v alone (W_U norm(v) + b_U, scale frozen).
    - ``norm``: ||W_out[l, i]|| (mean-removed for LayerNorm), the norm of the neuron's value vector; the norm of
      v itself is ``coef_x_norm``.
    - ``coefficient``: |m_i|.
    - ``rank``: 1 / rank of w in v's projection a_i P_i, rank = #{u : a_i P_iu >= a_i P_iw} (1 = w on top; ties
      count against w, so a silent neuron ranks last).
    - ``coef_x_norm``: |m_i| · norm = ||v||.
    - ``coef_x_rank``: |m_i| / rank (a large coefficient and a high rank of w both raise it).
    """
    W_out = _start(model, prompts)
    L, dm = n_layers(model), d_mlp(model)
    out = {k: torch.empty(len(prompts), L, dm) for k in BASELINES}
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
                alone = c.lens.c[None].expand(B, -1)  # lens(v) = W_U norm(v) + b_U: only the constant part
                alone_lse = torch.logsumexp(alone, -1)
                alone_lp = alone[torch.arange(B), c.targets] - alone_lse
                for c0 in range(0, dm, cfg.chunk):
                    c1 = min(c0 + cfg.chunk, dm)
                    a = a_all[:, layer, c0:c1]
                    P = W_out[layer, c0:c1] @ c.lens.U
                    Pw = P[:, c.targets].T  # [B, C]
                    # one series for both bases (resid_mid[l] and the lens constant): the powers of P are shared
                    both, mid = _delta_lse(P, torch.cat([base, alone]), torch.cat([base_lse, alone_lse]),
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
    _start(model, prompts)
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
    _start(model, prompts)
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
        "versions": library_versions(),
        "model_identity": model_identity(model),
        "metric": "ablate each score's top-k FFN neurons (hook_post zeroed at the target position); drops in MRR, "
                  "probability and log-probability of the target token, averaged over prompts",
        "seed": seed,
        "rows": rows,
    }


# ---------------------------------------------------------------- as a locator


def _query_top(model: Any, prompts: Sequence[Prompt], top_k: int, cfg: LensConfig,
               W_out: Tensor) -> tuple[list[list[Any]], bool, list[float]]:
    """The top_k neurons of a query by log-prob increase averaged over its prompts (exact; certified in topk mode)."""
    L, dm = W_out.shape[0], W_out.shape[1]
    cache = lens_cache(model, prompts, check_tol=cfg.check_tol)
    k = min(top_k, L * dm)
    if cfg.mode == "exact":
        a = cache.coefficients
        full = torch.stack([_layer_scores_exact(W_out[layer], cache.lens.U, cache.layer_logits(layer), a[:, layer],
                                                cache.targets, cfg) for layer in range(L)], dim=1)
        top = _top_from_scores(full.mean(0), k)
    else:
        top = _top_bound(cache, W_out, k, cfg, groups=[list(range(cache.size))])[0]
    return top.to_list(), top.certified, cache.model_logp.cpu().tolist()


def lens_locate(
    model: Any,
    queries: Sequence[Query],
    proxy_cfg: ProxyConfig,
    *,
    pool: Sequence[Query] | None = None,
    top_k: int = 20,
    progress: bool = True,
    cfg: LensConfig = LensConfig(mode="topk"),
    prompts: dict[str, list[Prompt]] | None = None,
) -> dict[str, Any]:
    """The log-prob-increase locator: each query's top_k FFN neurons, in the ``neurons.json`` schema.

    ``prompts`` (query id -> its prompts), when given, are used as they are (e.g. the very prompts another
    locator ranked on); otherwise they are built with ``build_all_prompts(queries, proxy_cfg, ...)``.

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
    if prompts is None:
        prompts = build_all_prompts(queries, proxy, tokenizer_of(model), pool=pool, prepend_bos=bos)
    else:
        missing = [q for q in ids if not prompts.get(q)]
        if missing:
            raise QrncaError(f"no prompts given for queries {missing[:3]}; pass every query's prompts, or none")
    W_out = _start(model, [p for ps in prompts.values() for p in ps])
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
        "versions": library_versions(),
        "model_identity": model_identity(model),
        "model": model_name(model),
        "data": None,
        "layers": list(range(L)),
        "common_neurons": [],
        "queries": out,
        "summary": {"n_queries": len(out), "mean_qr_neurons": sum(len(v["qr_neurons"]) for v in out.values()) / len(out),
                    "n_common_neurons": 0, "all_certified": all(v["certified"] for v in out.values())},
    }


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    write_json_atomic(path, doc, indent=2)


def cmd_lens(args: argparse.Namespace) -> int:
    """``qrnca-lens lens``: write OUT/neurons.json (and OUT/lens.json with ``--compare``).

    Reads ``args.model, .data, .proxy, .out, .top_k, .limit, .shots, .templates, .seed, .bos ("auto"/"yes"/"no"),
    .chat``, and optionally ``.pool`` (examples and distractors from this data spec), ``.quiet``, ``.lens_mode``
    ("topk", default, or "exact"), ``.compare`` (also run the paper's comparison), ``.compare_prompts`` (its first
    N prompts; all by default) and ``.compare_k`` (10).
    """
    from . import models
    from .data import limit_per_group, load_data

    bos_arg = getattr(args, "bos", "auto")
    bos = {"auto": None, "yes": True, "no": False}.get(bos_arg, bos_arg) if isinstance(bos_arg, str) else bos_arg
    proxy = ProxyConfig(args.proxy, n_prompts=args.templates, n_shots=args.shots, seed=args.seed,
                        prepend_bos=bos, chat_template=bool(getattr(args, "chat", False)))
    quiet = bool(getattr(args, "quiet", False))
    data = load_data(args.data)
    queries = limit_per_group(data, args.limit)
    pool = load_data(args.pool) if getattr(args, "pool", None) else data  # --pool: examples from elsewhere
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
