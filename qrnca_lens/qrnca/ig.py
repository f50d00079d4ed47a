"""Integrated-gradients attribution of FFN neurons (METHOD section 2), as hooks on the MLP's linear branch.

For prompt q, layer l and neuron i, with f̄ the clean value of ``blocks.l.mlp.hook_pre_linear`` (``hook_pre``
for a plain MLP) at the last prompt position:

    ig[l, i] = f̄_i / m * Σ_k dP(α_k f̄) / df_i,    α_k = k/m (k = 1..m), baseline 0,

where all neurons of layer l are scaled together at that position only, layers above see the consequences,
and P is the full-vocabulary softmax probability of the target (for a multi-token target the product over
its tokens under teacher forcing). ``alpha_schedule="linspace"`` gives the authors' linspace(0, 1, m).

Two paths compute the same numbers:

- ``reference``: as the authors ran it. For each layer, m full-sequence copies go through one
  forward/backward. It is the oracle of the tests and the baseline of the benchmark.
- ``fast`` (default): scaling the last position leaves every earlier position identical to the clean run in
  every layer (attention is causal). So the prefix runs once, and each (layer, step) becomes a *row*: the
  last prompt token (plus the teacher-forced answer tokens), scaled at its own layer, attending to the
  prefix's cached keys/values. Rows of all layers and steps go through one forward/backward per chunk of
  at most ``max_batch_rows`` rows; chunks shrink as prompts grow, so that the estimated peak of a pass
  (attention scores grow with rows x (prefix + rows)) stays within ``memory_budget_mb``, and a query's
  prompts split into several passes when even one row each would not fit.
    * TL 4.x ``TransformerBridge`` over a transformers model: the rows are laid out along the *sequence* of
      one batch element after the cached prefix, with a block-diagonal 4D attention mask and explicit
      position ids (every row sits at the target position). The prefix keys/values are therefore shared by
      all rows without being copied; the price is each row's masked-out scores against the other rows of its
      chunk, which is small next to the MLPs and the unembedding.
    * TL 3.x ``HookedTransformer``: its forward takes no 4D mask or position ids, but takes a
      ``TransformerLensKeyValueCache``. The rows go along the batch dimension, and each chunk gets a frozen
      cache whose entries are broadcast views of the prefix; TL's attention concatenates them per row, so a
      chunk holds B copies of the prefix keys/values (bounded by ``max_batch_rows``).
  Other models (e.g. TL-native bridges) fall back to the reference path with a warning.

Gradients are taken even when the caller disabled them (not under ``torch.inference_mode``, which cannot be
overridden: that raises). Parameters are frozen for the duration, so no parameter gradient is built, and
restored afterwards. Scores accumulate in float32 whatever the model's dtype.

Example:
    >>> scores = attribute_prompt(model, prompt, IGConfig(steps=16))   # doctest: +SKIP
    >>> scores.shape                                                     # doctest: +SKIP
    torch.Size([30, 1536])
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..config import Config
from ..data.prompts import Prompt, as_prompt, as_prompts
from ..engine import (
    Backend,
    CleanRowCheck,
    Prefix,
    Row,
    backend_of,
    choose_backend,
    plan_row_chunks,
    skipping_is_exact,
)
from ..engine.plan import DEFAULT_MAX_PREFIX_TOKENS, DEFAULT_MEMORY_BUDGET_MB, Dims, plan_groups
from ..errors import QrncaError
from ..model.access import d_mlp, mlp_hook_name, model_device, model_dtype, n_layers
from ..model.hooks import capture, hooked, hooked_points, refuse_caller_hooks
from ..model.readout import final_residual, head32
from ..protocols import HookedModel

__all__ = [
    "IGConfig",
    "alphas",
    "attribute_prompt",
    "attribute_prompts",
    "reference_ig",
    "resolve_layers",
    "fast_backend",
    "gradients_on",
    "target_prob",
]


AlphaSchedule = Literal["riemann", "linspace"]
IGMethod = Literal["fast", "reference", "auto"]


@dataclass(frozen=True)
class IGConfig(Config):
    """Integrated-gradients settings. ``method``: ``"fast"`` (default), ``"reference"`` or ``"auto"``.

    Example:
        >>> cfg = IGConfig(steps=8, alpha_schedule="linspace")
        >>> alphas(cfg.steps, cfg.alpha_schedule)[[0, -1]].tolist()
        [0.0, 1.0]
        >>> IGConfig(steps=0)
        Traceback (most recent call last):
        ...
        qrnca_lens.errors.QrncaError: steps (m) must be at least 1, got 0
    """

    steps: int = field(default=16, metadata={"help": "m, integration steps"})
    alpha_schedule: AlphaSchedule = field(
        default="riemann", metadata={"help": "riemann: k/m, k=1..m (paper); linspace: linspace(0,1,m) (authors' code)"})
    method: IGMethod = field(
        default="fast", metadata={"help": "fast: rows behind a cached prefix (the reference path, with a warning, "
                                          "where a model has no fast path); reference: the authors' full-sequence "
                                          "copies; auto: fast, falling back without a warning"})
    max_batch_rows: int = field(default=240, metadata={"help": "at most this many rows per forward/backward"})
    require_gated: bool = False
    # Peak working memory of one pass (prefix or row chunk), estimated by ``plan.chunk_bytes``/``plan.prefix_bytes``:
    # chunks shrink (and a query's prompts split into several passes) as prompts grow.
    memory_budget_mb: int = field(
        default=DEFAULT_MEMORY_BUDGET_MB,
        metadata={"help": "estimated peak memory of one pass; chunks shrink as prompts grow"})

    def validate(self) -> None:
        if self.steps < 1:
            raise QrncaError(f"steps (m) must be at least 1, got {self.steps}")
        if self.alpha_schedule not in get_args(AlphaSchedule):
            raise QrncaError(f"alpha_schedule must be 'riemann' (k/m) or 'linspace' (authors'), got {self.alpha_schedule!r}")
        if self.method not in get_args(IGMethod):
            raise QrncaError(f"method must be 'fast', 'reference' or 'auto', got {self.method!r}")
        if self.max_batch_rows < 1:
            raise QrncaError(f"max_batch_rows must be at least 1, got {self.max_batch_rows}")
        if self.memory_budget_mb < 1:
            raise QrncaError(f"memory_budget_mb must be at least 1, got {self.memory_budget_mb}")


def alphas(steps: int, schedule: str = "riemann") -> Float[Tensor, " steps"]:
    """The scaling factors: k/m for k = 1..m (the paper's Riemann sum) or linspace(0, 1, m) (authors' code)."""
    if schedule == "linspace":
        return torch.linspace(0.0, 1.0, steps)
    return torch.arange(1, steps + 1, dtype=torch.float32) / steps


# ---------------------------------------------------------------- shared guards


@contextlib.contextmanager
def gradients_on(model: HookedModel) -> Iterator[None]:
    """Enable autograd for inputs only: parameters are frozen here and restored on exit.

    Works inside ``torch.no_grad()``; refuses ``torch.inference_mode()`` (which cannot be overridden) with a
    ``QrncaError``. Shared by every gradient-based scorer (IG here, attribution patching in ``first_order``).

    Args:
        model: the model whose parameters stay gradient-free for the duration.

    Returns:
        A context manager.

    Example:
        >>> with torch.no_grad(), gradients_on(model):        # doctest: +SKIP
        ...     grad, = torch.autograd.grad(prob, leaf)
    """
    if torch.is_inference_mode_enabled():
        raise QrncaError(
            "gradients are disabled by torch.inference_mode(), which cannot be overridden; call the "
            "attribution outside `with torch.inference_mode():` (torch.no_grad() is fine)"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p in params:
            p.requires_grad_(True)


def target_prob(logp: Float[Tensor, "rows n_target vocab"], targets: Int[Tensor, "rows n_target"]) -> Float[Tensor, " rows"]:
    """P(target) per row: the product of the teacher-forced token probabilities.

    Args:
        logp: log-probabilities at the target positions (the prompt's last position, then one per
            teacher-forced answer token).
        targets: the target tokens.

    Returns:
        P per row (the first token's probability for a one-token target).

    Example:
        >>> lp = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75]]]))
        >>> float(target_prob(lp, torch.tensor([[0, 1]])))
        0.375
    """
    return logp.gather(-1, targets[..., None])[..., 0].sum(-1).exp()


def _prob_grad(logp: Float[Tensor, "rows n_target vocab"], targets: Int[Tensor, "rows n_target"],
               leaf: Float[Tensor, "rows d_mlp"]) -> Float[Tensor, "rows d_mlp"]:
    """dP_r/d leaf_r for independent rows, float32, as P_r * d log P_r / d leaf_r.

    The gradient that flows back through a half-precision model is that of log P (order 1), never that of P:
    an fp16 gradient of a probability of 1e-9 flushes to zero in the first layer it meets. Rows do not see
    each other (batch copies, or block-diagonal packed rows), so the row-wise product is exact."""
    logP = logp.gather(-1, targets[..., None])[..., 0].sum(-1)  # [rows], float32
    (g,) = torch.autograd.grad(logP.sum(), leaf)
    return g.float() * logP.detach().exp()[:, None]


def _check_nonzero(scores: Float[Tensor, "layer d_mlp"], prompt: Prompt, layers: Sequence[int], prob: float | None,
                   dtype: torch.dtype) -> Tensor:
    """All-zero scores while 0 < P < 1 mean the gradient vanished (a half-precision underflow), not "no neuron
    matters": refuse them, and warn about a single all-zero layer. (P = 1 in float32 has a zero gradient, so
    with P unknown, ``prob=None``, all-zero scores only warn.)"""
    if prob is not None and not 0.0 < prob < 1.0 - 1e-6:
        return scores
    dead = [layers[i] for i in range(scores.shape[0]) if not bool(scores[i].any())]
    where = f"query {prompt.query_id!r} (template {prompt.template})"
    p_text = f" while P(target) = {prob:.3g}" if prob is not None else ""
    if dead and len(dead) == scores.shape[0] and prob is not None:
        raise QrncaError(
            f"every attribution score of {where} is exactly 0 in {str(dtype).replace('torch.', '')}{p_text}: the "
            "gradient vanished; load the model in float32 (load_model(..., dtype=torch.float32)) or report it"
        )
    if dead:
        warnings.warn(
            f"all attribution scores of {where} at layers {dead[:10]} are exactly 0 in "
            f"{str(dtype).replace('torch.', '')}{p_text}: their gradient vanished; float32 would show them",
            stacklevel=3,
        )
    return scores


def _check_finite(scores: Tensor, prompt: Prompt) -> Tensor:
    if not torch.isfinite(scores).all():
        bad = sorted({int(i) for i in torch.nonzero(~torch.isfinite(scores))[:, 0]})
        raise QrncaError(
            f"non-finite attribution scores for query {prompt.query_id!r} (template {prompt.template}) at layers "
            f"{bad[:10]}: the model's probabilities overflowed; run the model in float32"
        )
    return scores


def _clean_values(model: HookedModel, seq: Tensor, names: Sequence[str], pos: int, **kw: Any) -> dict[str, Tensor]:
    store: dict[str, Tensor] = {}
    with torch.no_grad(), hooked(model, fwd=[(n, capture(store, n)) for n in names]):
        model(seq, **kw)
    # A detached copy: a view would silently follow later in-place writes to the activation.
    return {n: store[n][0, pos].detach().clone() for n in names}


def resolve_layers(model: HookedModel | int, layers: Iterable[Any] | None) -> list[int]:
    """Layer indices as the model's own non-negative numbers; negative ones count from the last, as in Python.

    The one place layers given by a caller are checked against the model's depth: attribution, ATP/DLA, the
    exhaustive ground truth and ``locate`` (whose manifest thus records 29, never -1) all resolve through it.
    Configs that cannot know the depth (``LocateConfig.layers``) let negative numbers through to here.

    Args:
        model: the model, or its number of layers.
        layers: layer indices in ``-n_layers .. n_layers - 1``, in the order wanted; None for all.

    Returns:
        The layers as numbers in ``0 .. n_layers - 1``, in the given order; a ``QrncaError`` naming the valid
        range for one out of it, and for an empty list, a non-integer or a layer named twice.

    Example:
        >>> resolve_layers(30, [-1, 0, -2])
        [29, 0, 28]
        >>> resolve_layers(30, [30])
        Traceback (most recent call last):
        ...
        qrnca_lens.errors.QrncaError: layer 30 is out of range for a 30-layer model: give 0..29, or -30..-1 counting from the last
    """
    L = model if isinstance(model, int) else n_layers(model)
    if layers is None:
        return list(range(L))
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise QrncaError(f"layers must be a list of layer indices such as [0, -1], got {type(layers).__name__}")
    chosen = list(layers)
    if not chosen:
        raise QrncaError("no layers given: pass at least one layer index (or None for all of them)")
    out = []
    for layer in chosen:
        # Integers of any kind (numpy, a 0-d tensor) but not bools or floats: 1.0 as a layer is a bug upstream.
        try:
            i = operator.index(layer)
        except TypeError:
            i = None
        if i is None or isinstance(layer, bool):
            raise QrncaError(f"layer {layer!r} is not an integer: give layer indices such as [0, -1]")
        if not -L <= i < L:
            raise QrncaError(f"layer {i} is out of range for a {L}-layer model: give 0..{L - 1}, or -{L}..-1 counting "
                             "from the last")
        out.append(i % L)
    twice = sorted({x for x in out if out.count(x) > 1})
    if twice:
        raise QrncaError(f"layers {chosen} name layer(s) {twice} twice (a negative index counts from the last); "
                         "give each layer once")
    return out


def _layers_and_names(model: HookedModel, layers: Sequence[int] | None, require_gated: bool) -> tuple[list[int], list[str]]:
    d_mlp(model)
    chosen = resolve_layers(model, layers)
    return chosen, [mlp_hook_name(model, layer, require_gated=require_gated) for layer in chosen]


# ---------------------------------------------------------------- reference path


def reference_ig(
    model: HookedModel, prompt: Prompt, layer: int, *, steps: int = 16, alpha_schedule: str = "riemann",
    require_gated: bool = False,
) -> Float[Tensor, " d_mlp"]:
    """IG of one layer as the authors ran it: m full-sequence copies, one forward/backward.

    The slow oracle of the fast path; ``attribute_prompt(..., IGConfig(method="reference"))`` runs it per layer.

    Args:
        model: the TL model.
        prompt: the prompt; its target is scored at ``prompt.target_position``.
        layer: the MLP layer whose neurons are scaled.
        steps: m, the integration steps.
        alpha_schedule: ``"riemann"`` (k/m, k = 1..m) or ``"linspace"`` (linspace(0, 1, m)).
        require_gated: refuse a plain (non-gated) MLP instead of using its ``hook_pre``.

    Returns:
        ``[d_mlp]`` float32 IG scores on the CPU.

    Example:
        >>> ig = reference_ig(model, prompt, layer=14, steps=16)   # doctest: +SKIP
        >>> ig.shape                                                # doctest: +SKIP
        torch.Size([1536])
    """
    (layer,), (name,) = _layers_and_names(model, [layer], require_gated)
    device = model_device(model)
    pos = prompt.target_position
    seq = torch.tensor([list(prompt.tokens) + list(prompt.target[:-1])], device=device)
    fbar = _clean_values(model, seq, [name], pos)[name].float()
    a = alphas(steps, alpha_schedule).to(device)
    with gradients_on(model):
        x = (a[:, None] * fbar).to(model_dtype(model)).detach().requires_grad_(True)

        def scale(act: Tensor, hook: Any) -> Tensor:
            out = act.clone()  # the other positions stay live in the graph
            out[:, pos] = x
            return out

        n_t = len(prompt.target)
        resid = final_residual(model, seq.expand(steps, -1), fwd=[(name, scale)])
        logp = torch.log_softmax(head32(model, resid[:, pos : pos + n_t]), dim=-1)
        targets = torch.tensor([list(prompt.target)], device=logp.device).expand(steps, -1)
        grad = _prob_grad(logp, targets, x)
    return _check_finite((fbar * grad.sum(0) / steps).cpu()[None], prompt)[0]


# ---------------------------------------------------------------- fast path: rows of the engine


def fast_backend(model: HookedModel) -> Backend | None:
    """The engine ``Backend`` IG's fast path runs on for this model: ``"packed"`` (bridge over transformers),
    ``"batch"`` (HookedTransformer), or None (reference only).

    Example:
        >>> fast_backend(model)   # doctest: +SKIP
        'packed'
    """
    backend = backend_of(model)
    return None if backend == "full" else backend


# ---------------------------------------------------------------- public API


def _check_cfg(cfg: Any) -> None:
    """The third argument is the IGConfig: a target given there (``attribute_prompt(model, text, " Paris")``)
    is named, not run into an AttributeError."""
    if not isinstance(cfg, IGConfig):
        raise QrncaError(f"the third argument is the IGConfig, got {type(cfg).__name__} {str(cfg)[:40]!r}; pass the "
                         "answer by name: target=\" Paris\"")


def attribute_prompt(
    model: HookedModel,
    prompt: Any,
    cfg: IGConfig = IGConfig(),
    *,
    target: Any = None,
    layers: Sequence[int] | None = None,
) -> Float[Tensor, "layer d_mlp"]:
    """IG scores of every MLP neuron (rows: ``layers``, all by default) for one prompt, float32 on the CPU.

    Args:
        model: the TL model.
        prompt: a ``Prompt`` (from ``build_prompts``); a text (then ``target=`` is required; tokenised with
            the model's default BOS, as ``locate`` does: ``Prompt.from_text``); or token ids as you hold them
            (a list of ints, a 1-D or ``[1, seq]`` tensor, taken as they are: ``Prompt.from_tokens``).
        cfg: integration steps, schedule, fast or reference path, memory budget.
        target: for a text or ids, the answer scored: its text as it follows the prompt (``" Paris"``) or its
            token ids.
        layers: the layers to attribute, in the order of the result's rows (default: all); negative indices
            count from the last, as in Python.

    Returns:
        ``[layer, d_mlp]`` float32 scores.

    Example:
        >>> scores = attribute_prompt(model, "The capital of France is", target=" Paris")   # doctest: +SKIP
        >>> scores.shape                                                                      # doctest: +SKIP
        torch.Size([30, 1536])
        >>> attribute_prompt(model, prompt, IGConfig(steps=16), layers=[-1]).shape            # doctest: +SKIP
        torch.Size([1, 1536])
    """
    _check_cfg(cfg)
    return attribute_prompts(model, [as_prompt(model, prompt, target)], cfg, layers=layers)[0]


def attribute_prompts(
    model: HookedModel, prompts: Any, cfg: IGConfig = IGConfig(), *, targets: Any = None,
    layers: Sequence[int] | None = None,
) -> Float[Tensor, "prompt layer d_mlp"]:
    """IG scores for each prompt (of a query), stacked. On a bridge the prompts share each forward/backward.

    Args:
        model: the TL model.
        prompts: the prompts (usually the |Q| prompts of one query): ``Prompt``s, texts and token-id lists
            (mixed freely, as ``attribute_prompt`` takes them), or an ``[n, seq]`` tensor of ids.
        cfg: integration steps, schedule, fast or reference path, memory budget.
        targets: for texts and ids, the answers: one string for all, or one entry per prompt (text or token
            ids; None for a ``Prompt``).
        layers: the layers to attribute (default: all); negative indices count from the last.

    Returns:
        ``[prompt, layer, d_mlp]`` float32 scores.

    Example:
        >>> scores = attribute_prompts(model, prompts[:3], layers=[0, 14])   # doctest: +SKIP
        >>> scores.shape                                                      # doctest: +SKIP
        torch.Size([3, 2, 1536])
        >>> attribute_prompts(model, ["Paris is in", "Rome is in"], targets=[" France", " Italy"]).shape  # doctest: +SKIP
        torch.Size([2, 30, 1536])
    """
    _check_cfg(cfg)
    prompts = as_prompts(model, prompts, targets)
    if not prompts:
        raise QrncaError("no prompts to attribute")
    chosen, names = _layers_and_names(model, layers, cfg.require_gated)
    # "full" here is the reference path (``reference_ig``, the authors' full-sequence copies): IG's oracle.
    backend = choose_backend(model, fast=cfg.method != "reference")
    if backend == "full" and cfg.method == "fast":
        warnings.warn(
            f"no fast IG path for {type(model).__name__} over {type(getattr(model, 'original_model', None)).__name__}; "
            "using the reference path (exact, slower)", stacklevel=2,
        )
    if backend != "full" and cfg.method == "auto" and hooked_points(model):
        backend = "full"  # the caller's hooks would see the rows' layout; the reference path honours them
    dtype = model_dtype(model)
    if backend == "full":
        return torch.stack([
            _check_nonzero(torch.stack([reference_ig(model, p, layer, steps=cfg.steps, alpha_schedule=cfg.alpha_schedule,
                                                     require_gated=cfg.require_gated) for layer in chosen]),
                           p, chosen, None, dtype)
            for p in prompts
        ])
    refuse_caller_hooks(model, "IGConfig(method='reference') (exact, slower; it runs your hooks as they are)")
    out: list[Tensor | None] = [None] * len(prompts)
    # Prompts share a prefix pass when their targets have the same length (always, for one query's letters)
    # and the memory plan allows; the HookedTransformer backend caches one prompt at a time.
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p.target), []).append(i)
    d, budget = Dims.of(model), cfg.memory_budget_mb * 2**20
    for same_t in groups.values():
        lengths = [len(prompts[i].tokens) - 1 for i in same_t]
        for part in plan_groups(lengths, d, backend, budget, max(DEFAULT_MAX_PREFIX_TOKENS, max(lengths))):
            batch = [same_t[j] for j in part]
            scores, probs = _fast(model, [prompts[i] for i in batch], chosen, names, cfg, backend)
            for i, sc, prob in zip(batch, scores, probs):
                out[i] = _check_nonzero(_check_finite(sc, prompts[i]), prompts[i], chosen, prob, dtype)
    return torch.stack([x for x in out if x is not None])


def _fast(model: HookedModel, prompts: Sequence[Prompt], chosen: Sequence[int], names: Sequence[str], cfg: IGConfig,
          backend: Backend) -> tuple[Float[Tensor, "prompt layer d_mlp"], list[float]]:
    """IG rows of every (prompt, layer, step) behind one prefix pass, each row starting at its own layer;
    also each prompt's clean P(target) (its α = 1 row)."""
    a = alphas(cfg.steps, cfg.alpha_schedule).to(model_device(model))
    prefix = Prefix(model, [list(p.tokens) for p in prompts], record=names, backend=backend,
                    continuations=[p.target[:-1] for p in prompts])
    # The α = 1 rows re-create the clean prompts: the self-check's evidence, against the prefix pass's own
    # logits on a bridge (no second forward), else one ordinary forward per prompt.
    self_check = CleanRowCheck(prefix, "IGConfig(method='reference') (exact, slower)")
    full_step = int(torch.nonzero(a == 1.0)[-1])  # both schedules end at α = 1
    B, T = len(prompts), len(prompts[0].target)
    fbar = torch.stack([prefix.clean[n].float() for n in names], dim=1)  # [prompt, layer, d_mlp]
    # Accumulated on the model's device: the host sees the scores once per prompt group, not once per chunk.
    grads = torch.zeros(B, len(chosen), d_mlp(model), dtype=torch.float32, device=a.device)
    clean_p = torch.zeros(B, dtype=torch.float32, device=a.device)
    tokens = [(p.tokens[-1], *p.target[:-1]) for p in prompts]
    skip = skipping_is_exact(prefix)
    # Rows of a layer start at that layer. The engine's planner cuts them into chunks: rows per chunk from the
    # memory plan with a backward through them (attention grows with rows x (prefix + rows), so chunks shrink
    # as prompts grow; max_batch_rows stays the upper bound), depths mixed where that costs less than a forward.
    by_layer = [(chosen[li] if skip else 0, [(b, li, k) for k in range(cfg.steps) for b in range(B)])
                for li in range(len(chosen))]
    chunks = plan_row_chunks(prefix, by_layer, T, cfg.max_batch_rows, cfg.memory_budget_mb * 2**20, grad=True)
    targets = torch.tensor([list(p.target) for p in prompts], device=a.device)  # [prompt, T]
    with gradients_on(model):
        for start, chunk in chunks:
            rows = [Row(b, tokens[b]) for b, _, _ in chunk]
            leaves: dict[int, tuple[list[int], Tensor]] = {}
            for li in sorted({li for _, li, _ in chunk}):
                mine = [r for r, (_, lj, _) in enumerate(chunk) if lj == li]
                bs = torch.tensor([chunk[r][0] for r in mine], device=a.device)
                ks = torch.tensor([chunk[r][2] for r in mine], device=a.device)
                leaf = (a[ks, None] * fbar[bs, li]).detach().requires_grad_(True)
                leaves[chosen[li]] = (mine, leaf)
            logp = prefix.forward(rows, start=start, writes=leaves).view(len(chunk), T, -1)
            with torch.no_grad():
                for r, (b, li, k) in enumerate(chunk):
                    if k == full_step:
                        self_check.add(b, logp[r], tokens[b], f"for query {prompts[b].query_id!r} (template "
                                       f"{prompts[b].template}) the unscaled row at layer {chosen[li]}",
                                       targets=prompts[b].target)
            idx = torch.tensor([b for b, _, _ in chunk], device=a.device)
            # P_r * d log P_r: the gradient through a half-precision model is that of log P (see _prob_grad)
            logP = logp.gather(-1, targets[idx][..., None])[..., 0].sum(-1)  # [rows], float32
            order = sorted(leaves)
            got = torch.autograd.grad(logP.sum(), [leaves[layer][1] for layer in order])
            P = logP.detach().exp()
            for layer, g in zip(order, got):
                mine = leaves[layer][0]
                rows_b = torch.tensor([chunk[r][0] for r in mine], device=grads.device)
                grads[:, chosen.index(layer)].index_add_(0, rows_b, g.float() * P[mine, None])
            for r, (b, _, k) in enumerate(chunk):
                if k == full_step:
                    clean_p[b] = P[r]
    self_check.verify()
    probs = [float(p) for p in clean_p.cpu()]
    return fbar.cpu() * grads.cpu() / cfg.steps, probs
