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
import warnings
from dataclasses import asdict, dataclass
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .errors import QrncaError
from .hooks import capture, hooked, prefix_cache_kwarg
from .models import d_mlp, mlp_hook_name, model_device, n_layers
from .proxies import Prompt

__all__ = [
    "IGConfig",
    "alphas",
    "attribute_prompt",
    "attribute_prompts",
    "reference_ig",
    "fast_backend",
]


@dataclass(frozen=True)
class IGConfig:
    """Integrated-gradients settings. ``method``: ``"fast"`` (default), ``"reference"`` or ``"auto"``."""

    steps: int = 16
    alpha_schedule: str = "riemann"
    method: str = "fast"
    max_batch_rows: int = 240
    require_gated: bool = False
    # Peak working memory of one pass (prefix or row chunk), estimated by ``_chunk_bytes``/``_prefix_bytes``:
    # chunks shrink (and a query's prompts split into several passes) as prompts grow. 1 GB keeps a
    # 2,000-token prompt on SmolLM2 (30 layers, float32) under 4 GB RSS with the model loaded.
    memory_budget_mb: int = 1024

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise QrncaError(f"steps (m) must be at least 1, got {self.steps}")
        if self.alpha_schedule not in ("riemann", "linspace"):
            raise QrncaError(f"alpha_schedule must be 'riemann' (k/m) or 'linspace' (authors'), got {self.alpha_schedule!r}")
        if self.method not in ("fast", "reference", "auto"):
            raise QrncaError(f"method must be 'fast', 'reference' or 'auto', got {self.method!r}")
        if self.max_batch_rows < 1:
            raise QrncaError(f"max_batch_rows must be at least 1, got {self.max_batch_rows}")
        if self.memory_budget_mb < 1:
            raise QrncaError(f"memory_budget_mb must be at least 1, got {self.memory_budget_mb}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IGConfig":
        return cls(**d)


def alphas(steps: int, schedule: str = "riemann") -> Float[Tensor, "steps"]:
    """The scaling factors: k/m for k = 1..m (the paper's Riemann sum) or linspace(0, 1, m) (authors' code)."""
    if schedule == "linspace":
        return torch.linspace(0.0, 1.0, steps)
    return torch.arange(1, steps + 1, dtype=torch.float32) / steps


# ---------------------------------------------------------------- shared guards


@contextlib.contextmanager
def _gradients_on(model: Any) -> Iterator[None]:
    """Enable autograd for inputs only: parameters are frozen here and restored on exit."""
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


def _target_prob(logp: Float[Tensor, "rows n_target vocab"], targets: Int[Tensor, "rows n_target"]) -> Float[Tensor, "rows"]:
    """P(target) per row: the product of the teacher-forced token probabilities."""
    return logp.gather(-1, targets[..., None])[..., 0].sum(-1).exp()


def _check_finite(scores: Tensor, prompt: Prompt) -> Tensor:
    if not torch.isfinite(scores).all():
        bad = sorted({int(i) for i in torch.nonzero(~torch.isfinite(scores))[:, 0]})
        raise QrncaError(
            f"non-finite attribution scores for query {prompt.query_id!r} (template {prompt.template}) at layers "
            f"{bad[:10]}: the model's probabilities overflowed; run the model in float32"
        )
    return scores


def _clean_values(model: Any, seq: Tensor, names: Sequence[str], pos: int, **kw: Any) -> dict[str, Tensor]:
    store: dict[str, Tensor] = {}
    with torch.no_grad(), hooked(model, fwd=[(n, capture(store, n)) for n in names]):
        model(seq, **kw)
    # A detached copy: a view would silently follow later in-place writes to the activation.
    return {n: store[n][0, pos].detach().clone() for n in names}


def _layers_and_names(model: Any, layers: Sequence[int] | None, require_gated: bool) -> tuple[list[int], list[str]]:
    d_mlp(model)
    chosen = list(range(n_layers(model))) if layers is None else list(layers)
    for layer in chosen:
        if not 0 <= layer < n_layers(model):
            raise QrncaError(f"layer {layer} is out of range for a {n_layers(model)}-layer model")
    return chosen, [mlp_hook_name(model, layer, require_gated=require_gated) for layer in chosen]


# ---------------------------------------------------------------- reference path


def reference_ig(
    model: Any, prompt: Prompt, layer: int, *, steps: int = 16, alpha_schedule: str = "riemann",
    require_gated: bool = False,
) -> Float[Tensor, "d_mlp"]:
    """IG of one layer as the authors ran it: m full-sequence copies, one forward/backward."""
    (layer,), (name,) = _layers_and_names(model, [layer], require_gated)
    device = model_device(model)
    pos = prompt.target_position
    seq = torch.tensor([list(prompt.tokens) + list(prompt.target[:-1])], device=device)
    fbar = _clean_values(model, seq, [name], pos)[name].float()
    a = alphas(steps, alpha_schedule).to(device)
    with _gradients_on(model):
        x = (a[:, None] * fbar).to(_act_dtype(model)).detach().requires_grad_(True)

        def scale(act: Tensor, hook: Any) -> Tensor:
            out = act.clone()  # the other positions stay live in the graph
            out[:, pos] = x
            return out

        with hooked(model, fwd=[(name, scale)]):
            logits = model(seq.expand(steps, -1), return_type="logits")
        n_t = len(prompt.target)
        logp = torch.log_softmax(logits[:, pos : pos + n_t].float(), dim=-1)
        targets = torch.tensor([list(prompt.target)], device=logp.device).expand(steps, -1)
        (grad,) = torch.autograd.grad(_target_prob(logp, targets).sum(), x)
    return _check_finite((fbar * grad.float().sum(0) / steps).cpu()[None], prompt)[0]


def _act_dtype(model: Any) -> torch.dtype:
    return next(model.parameters()).dtype


# ---------------------------------------------------------------- fast path: backends


def fast_backend(model: Any) -> str | None:
    """Which fast-path backend fits this model: ``"sequence"`` (bridge over transformers), ``"batch"``
    (HookedTransformer), or None (reference only)."""
    original = getattr(model, "original_model", None)
    if original is not None:
        try:
            from transformers import PreTrainedModel
        except ImportError:  # pragma: no cover
            return None
        return "sequence" if isinstance(original, PreTrainedModel) else None
    return "batch" if _is_hooked_transformer(model) else None


def _is_hooked_transformer(model: Any) -> bool:
    """True for a TL 3.x ``HookedTransformer`` and its subclasses (SAELens' ``HookedSAETransformer``...).

    The import is lazy and may fail: TL 4.x has no ``HookedTransformer``.
    """
    try:
        from transformer_lens import HookedTransformer
    except ImportError:
        return False
    return isinstance(model, HookedTransformer)


def _row_plan(layers: Sequence[int], steps: int, max_rows: int) -> list[list[tuple[int, int]]]:
    """(layer index, step) rows in chunks; a chunk never splits a layer's steps when it can avoid it."""
    rows = [(li, k) for li in range(len(layers)) for k in range(steps)]
    per_chunk = max(steps, (max_rows // steps) * steps) if max_rows >= steps else max_rows
    return [rows[i : i + per_chunk] for i in range(0, len(rows), per_chunk)]



# ---------------------------------------------------------------- fast path: memory plan


@dataclass(frozen=True)
class _Dims:
    """What a pass's memory depends on: the model's shapes and activation width in bytes."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_mlp: int
    d_vocab: int
    act_bytes: int

    @classmethod
    def of(cls, model: Any) -> "_Dims":
        c = model.cfg
        return cls(c.n_layers, c.n_heads, getattr(c, "n_key_value_heads", None) or c.n_heads, c.d_head, c.d_model,
                   c.d_mlp, c.d_vocab, _act_dtype(model).itemsize)


# Coefficients measured with torch's allocator (profiler peak) on tiny and SmolLM2-shaped Llama bridges:
# per layer, one attention-score tensor and the prefix keys/values (the cache concatenation and the GQA
# expansion) are kept for backward, ~4 d_mlp + 6 d_model per row token; ~3 score tensors are live at once
# in the layer being computed; ~3-4 float32 vocabulary vectors per row token (logits, log-softmax, their
# gradient). The estimate comes out 1.5x the measured peak, which the allocator's fragmentation eats.
_SCORE_TRANSIENT, _ROW_PER_LAYER, _VOCAB_COPIES, _PREFIX_SCORE_COPIES = 3, (4, 6), 4, 3


def _kv_cache_bytes(d: _Dims, n_prompts: int, C: int) -> int:
    return d.act_bytes * n_prompts * C * d.n_layers * 2 * d.n_kv_heads * d.d_head


def _prefix_bytes(d: _Dims, n_prompts: int, C: int) -> int:
    """Peak of the prefix pass (no gradient, stops before the unembedding): one layer's attention scores
    [prompts, heads, C, C] at a time, plus the cache it fills."""
    scores = n_prompts * d.n_heads * C * C
    return d.act_bytes * _PREFIX_SCORE_COPIES * scores + _kv_cache_bytes(d, n_prompts, C)


def _chunk_bytes(d: _Dims, backend: str, n_prompts: int, rows: int, T: int, C: int) -> int:
    """Peak of one row chunk's forward/backward: ``rows`` rows of ``T`` tokens for each of ``n_prompts``
    prompts against a cached prefix of ``C`` positions (the cache itself included)."""
    if backend == "sequence":  # rows along the sequence: every row sees the prefix and its chunk's rows
        seqs, queries, keys = n_prompts, rows * T, C + rows * T
    else:  # rows along the batch: TL concatenates the prefix keys/values per row
        seqs, queries, keys = n_prompts * rows, T, C + T
    scores = seqs * d.n_heads * queries * keys
    kv = seqs * keys * 2 * (d.n_heads + d.n_kv_heads) * d.d_head
    tokens = n_prompts * rows * T
    a, b = _ROW_PER_LAYER
    per_layer = scores + kv + tokens * (a * d.d_mlp + b * d.d_model)
    return (d.act_bytes * (d.n_layers * per_layer + _SCORE_TRANSIENT * scores)
            + 4 * _VOCAB_COPIES * tokens * d.d_vocab + _kv_cache_bytes(d, n_prompts, C))


def _prompts_per_pass(d: _Dims, backend: str, n_prompts: int, C: int, T: int, budget: int) -> int:
    """How many prompts share a pass: the most whose prefix pass and one-row chunk fit the budget (>= 1)."""
    if backend != "sequence":
        return 1
    for b in range(n_prompts, 1, -1):
        if max(_prefix_bytes(d, b, C), _chunk_bytes(d, backend, b, 1, T, C)) <= budget:
            return b
    return 1


def _rows_per_chunk(d: _Dims, backend: str, n_prompts: int, C: int, T: int, max_rows: int, budget: int) -> int:
    """Rows per prompt in a chunk: the most whose estimated peak fits the budget, at most ``max_rows`` shared
    by the prompts of the pass, at least 1 (a budget below one row is exceeded, not refused)."""
    lo, hi = 1, max(1, max_rows // n_prompts)
    while lo < hi:  # the estimate grows with rows: bisect for the largest that fits
        mid = (lo + hi + 1) // 2
        if _chunk_bytes(d, backend, n_prompts, mid, T, C) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


class _Stop(Exception):
    """Raised from a hook to end a forward pass early (the KV cache is already filled by then)."""


def _stop_hook(act: Tensor, hook: Any) -> Tensor:
    raise _Stop


class _SequenceRows:
    """Bridge backend: the prompts of a query along the batch, each with its cached prefix; behind it, that
    prompt's rows laid along the sequence under a block-diagonal mask, every row at the target position.

    Prompts are right-padded to a common length; a prompt's pad positions (and its own last token, which
    each row re-creates) are masked out of its rows' attention, so padding changes nothing.
    """

    def __init__(self, model: Any, prompts: Sequence[Prompt], names: Sequence[str]) -> None:
        from transformers import DynamicCache

        self.model, self.names = model, list(names)
        self.device = model_device(model)
        self.T = len(prompts[0].target)
        self.P = torch.tensor([len(p.tokens) - 1 for p in prompts], device=self.device)
        self.rows = torch.tensor([[p.tokens[-1], *p.target[:-1]] for p in prompts], device=self.device)
        self.config = model.original_model.config
        self._cache_cls = DynamicCache
        full = [list(p.tokens) for p in prompts]
        width = max(len(t) for t in full)
        pad = full[0][0]  # any real token: padded positions are never attended
        ids = torch.tensor([t + [pad] * (width - len(t)) for t in full], device=self.device)
        self.C = width  # cached positions
        store: dict[str, Tensor] = {}
        cache = self._new_cache()
        # One pass over the whole prompts fills the cache and records f̄ at each last position; it stops before
        # the final norm, so no prefix logits (a full-vocabulary product per position) are computed.
        stops = [("ln_final.hook_in", _stop_hook)] if "ln_final.hook_in" in model.hook_dict else []
        with torch.no_grad(), hooked(model, fwd=[(n, capture(store, n)) for n in self.names] + stops), \
                prefix_cache_kwarg(model) as keyword:
            try:
                model(ids, **{keyword: cache})
            except _Stop:
                pass
        last = self.P
        self.fbar = {n: store[n][torch.arange(len(prompts)), last].detach().clone() for n in self.names}
        self.kv = [(layer.keys, layer.values) for layer in cache.layers]

    def _new_cache(self) -> Any:
        try:
            return self._cache_cls(config=self.config)
        except TypeError:  # older transformers
            return self._cache_cls()

    def _cache(self) -> Any:
        cache = self._new_cache()
        for i, (k, v) in enumerate(self.kv):
            cache.update(k, v, i)
        return cache

    def _kwargs(self, n_rows: int) -> dict[str, Any]:
        B, T, C, n = len(self.P), self.T, self.C, n_rows * self.T
        t = torch.arange(T, device=self.device)
        pos_ids = (self.P[:, None] + t.repeat(n_rows)[None, :])
        mask = torch.full((B, 1, n, C + n), float("-inf"), device=self.device, dtype=_act_dtype(self.model))
        prefix_ok = torch.arange(C, device=self.device)[None, :] < self.P[:, None]  # [B, C]
        mask[:, 0, :, :C].masked_fill_(prefix_ok[:, None, :], 0.0)
        rid = torch.arange(n, device=self.device) // T
        tid = torch.arange(n, device=self.device) % T
        own = (rid[:, None] == rid[None, :]) & (tid[None, :] <= tid[:, None])
        mask[:, 0, :, C:].masked_fill_(own, 0.0)
        return {"attention_mask": mask, "position_ids": pos_ids}

    def run(self, chunk: Sequence[tuple[int, int]], leaves: dict[int, Tensor]) -> Tensor:
        """Forward the chunk's rows for every prompt, each layer's leaf [prompt, rows, d_mlp] written at its rows.

        Returns log-probabilities [prompt * rows, T, vocab] (prompt-major).
        """
        n_rows = len(chunk)
        seq = self.rows.repeat(1, n_rows)
        hooks = []
        for li, leaf in leaves.items():
            idx = torch.tensor([r for r, (lj, _) in enumerate(chunk) if lj == li], device=self.device) * self.T
            hooks.append((self.names[li], _write_rows(lambda a: (slice(None), a), idx, leaf)))
        with hooked(self.model, fwd=hooks), prefix_cache_kwarg(self.model) as keyword:
            logits = self.model(seq, return_type="logits", **self._kwargs(n_rows), **{keyword: self._cache()})
        B = len(self.P)
        return torch.log_softmax(logits.float(), dim=-1).view(B * n_rows, self.T, -1)


class _BatchRows:
    """HookedTransformer backend: rows along the batch, a frozen cache of broadcast prefix views."""

    def __init__(self, model: Any, prompts: Sequence[Prompt], names: Sequence[str]) -> None:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        if len(prompts) != 1:
            raise QrncaError("the HookedTransformer backend attributes one prompt at a time")
        prompt = prompts[0]
        self.model, self.names = model, list(names)
        self.device = model_device(model)
        self.P = len(prompt.tokens) - 1
        self.T = len(prompt.target)
        self.row = [prompt.tokens[-1]] + list(prompt.target[:-1])
        self._cls = TransformerLensKeyValueCache
        self.prefix = TransformerLensKeyValueCache.init_cache(model.cfg, self.device, batch_size=1)
        with torch.no_grad():
            if self.P > 0:
                model(torch.tensor([list(prompt.tokens[:-1])], device=self.device), past_kv_cache=self.prefix)
        self.prefix.freeze()
        clean = _clean_values(model, torch.tensor([self.row], device=self.device), self.names, 0,
                              past_kv_cache=self._cache(1))
        self.fbar = {n: v[None] for n, v in clean.items()}

    def _cache(self, n_rows: int) -> Any:
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        entries = [
            TransformerLensKeyValueCacheEntry(
                past_keys=e.past_keys.expand(n_rows, -1, -1, -1),
                past_values=e.past_values.expand(n_rows, -1, -1, -1),
                frozen=True,
            )
            for e in self.prefix.entries
        ]
        mask = self.prefix.previous_attention_mask.expand(n_rows, -1)
        return self._cls(entries=entries, previous_attention_mask=mask, frozen=True)

    def run(self, chunk: Sequence[tuple[int, int]], leaves: dict[int, Tensor]) -> Tensor:
        n_rows = len(chunk)
        seq = torch.tensor([self.row] * n_rows, device=self.device)
        hooks = []
        for li, leaf in leaves.items():
            idx = torch.tensor([r for r, (lj, _) in enumerate(chunk) if lj == li], device=self.device)
            hooks.append((self.names[li], _write_rows(lambda a: (a, 0), idx, leaf[0])))
        with hooked(self.model, fwd=hooks):
            logits = self.model(seq, return_type="logits", past_kv_cache=self._cache(n_rows))
        return torch.log_softmax(logits.float(), dim=-1)


def _write_rows(where: Any, idx: Tensor, leaf: Tensor) -> Any:
    """A hook writing ``leaf`` at the rows ``idx``: ``where(idx)`` gives the (batch, position) index."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        out = act.clone()  # other rows stay live: rows scaled at lower layers flow through here
        out[where(idx)] = leaf.to(act.dtype)
        return out

    return hook


# ---------------------------------------------------------------- public API


def attribute_prompt(
    model: Any,
    prompt: Prompt,
    cfg: IGConfig = IGConfig(),
    *,
    layers: Sequence[int] | None = None,
) -> Float[Tensor, "layer d_mlp"]:
    """IG scores of every MLP neuron (rows: ``layers``, all by default) for one prompt, float32 on the CPU."""
    return attribute_prompts(model, [prompt], cfg, layers=layers)[0]


def attribute_prompts(
    model: Any, prompts: Sequence[Prompt], cfg: IGConfig = IGConfig(), *, layers: Sequence[int] | None = None,
) -> Float[Tensor, "prompt layer d_mlp"]:
    """IG scores for each prompt (of a query), stacked. On a bridge the prompts share each forward/backward."""
    if not prompts:
        raise QrncaError("no prompts to attribute")
    chosen, names = _layers_and_names(model, layers, cfg.require_gated)
    method, backend = cfg.method, fast_backend(model)
    if method in ("fast", "auto") and backend is None:
        if method == "fast":
            warnings.warn(
                f"no fast IG path for {type(model).__name__} over {type(getattr(model, 'original_model', None)).__name__}; "
                "using the reference path (exact, slower)", stacklevel=2,
            )
        method = "reference"
    if method == "reference":
        return torch.stack([
            torch.stack([reference_ig(model, p, layer, steps=cfg.steps, alpha_schedule=cfg.alpha_schedule,
                                      require_gated=cfg.require_gated) for layer in chosen])
            for p in prompts
        ])
    out: list[Tensor | None] = [None] * len(prompts)
    if backend == "sequence":
        # Prompts batch together when their targets have the same length (always, for one query's letters).
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(len(p.target), []).append(i)
        batches = list(groups.values())
    else:
        batches = [[i] for i in range(len(prompts))]
    batches = [part for batch in batches for part in _split_for_memory(model, [prompts[i] for i in batch], batch, cfg)]
    for batch in batches:
        group = [prompts[i] for i in batch]
        scores = _fast(model, group, chosen, names, cfg, _SequenceRows if backend == "sequence" else _BatchRows)
        for i, sc in zip(batch, scores):
            out[i] = _check_finite(sc, prompts[i])
    return torch.stack([x for x in out if x is not None])


def _split_for_memory(model: Any, group: Sequence[Prompt], idx: list[int], cfg: IGConfig) -> list[list[int]]:
    """Split one pass's prompts so that each prefix pass and one-row chunk fits the memory budget."""
    if len(idx) == 1:
        return [idx]
    C, T = max(len(p.tokens) for p in group), len(group[0].target)
    per = _prompts_per_pass(_Dims.of(model), "sequence", len(idx), C, T, cfg.memory_budget_mb * 2**20)
    return [idx[i : i + per] for i in range(0, len(idx), per)]


# Float error of a cached row against a plain forward is ~1e-5 nats in float32; a broken cache contract
# (an empty or shifted prefix) moves log-probabilities by far more than these bounds.
_SELF_CHECK_TOL = {torch.float32: 1e-3, torch.float64: 1e-6}
_SELF_CHECK_TOL_LOW = 5e-2  # float16 / bfloat16


def _plain_logprobs(model: Any, prompts: Sequence[Prompt]) -> Float[Tensor, "prompt n_target vocab"]:
    """Each prompt's log-probabilities at its target positions from an ordinary forward (no cache, no
    intervention; the final norm and unembedding run on the target positions only)."""
    from .scoring import logprobs_at

    device = model_device(model)
    out = []
    with torch.no_grad():
        for p in prompts:
            seq = torch.tensor([list(p.tokens) + list(p.target[:-1])], device=device)
            pos = p.target_position
            # Logits only at the target positions: a long prompt's full-vocabulary logits would dwarf the rest.
            out.append(logprobs_at(model, seq, [range(pos, pos + len(p.target))])[0])
    return torch.stack(out)


def _self_check(row_logp: Tensor, plain: Tensor, prompts: Sequence[Prompt], layer: int, dtype: torch.dtype) -> None:
    """The α = 1 row re-creates the clean prompt: its log-probabilities must equal the plain forward's.

    Compared on the tokens the plain forward gives at least 1e-6 probability (float error on the far tail
    of log-probabilities is large and says nothing about the cache).
    """
    from .errors import FastPathError
    from .versions import versions_line

    plain = plain.to(row_logp.device)
    if not torch.isfinite(plain).all():
        return  # the model itself overflows: _check_finite names that problem and its fix
    live = plain > -13.8  # p > 1e-6
    diff = ((row_logp - plain).abs() * live).amax(dim=(-1, -2))  # [prompt]
    tol = _SELF_CHECK_TOL.get(dtype, _SELF_CHECK_TOL_LOW)
    worst = int(diff.argmax())
    if not torch.isfinite(diff).all() or float(diff[worst]) > tol:
        raise FastPathError(
            f"the fast IG path does not reproduce a plain forward: for query {prompts[worst].query_id!r} "
            f"(template {prompts[worst].template}) the unscaled row at layer {layer} differs from the clean "
            f"prompt's log-probabilities by {float(diff[worst]):.3g} nats (tolerance {tol:g}). The prefix-cache "
            f"contract of the installed libraries has changed ({versions_line()}). Use "
            "IGConfig(method='reference') (exact, slower) and report the versions; no scores were returned"
        )


def _fast(model: Any, prompts: Sequence[Prompt], chosen: Sequence[int], names: Sequence[str], cfg: IGConfig,
          backend: type) -> Float[Tensor, "prompt layer d_mlp"]:
    a = alphas(cfg.steps, cfg.alpha_schedule).to(model_device(model))
    runner = backend(model, prompts, names)
    plain = _plain_logprobs(model, prompts)
    full_step = int(torch.nonzero(a == 1.0)[-1])  # both schedules end at α = 1
    B = len(prompts)
    fbar = torch.stack([runner.fbar[n].float() for n in names], dim=1)  # [prompt, layer, d_mlp]
    grads = torch.zeros(B, len(chosen), d_mlp(model), dtype=torch.float32)
    # Rows per chunk from the memory plan: attention grows with rows x (prefix + rows), so chunks shrink as
    # prompts grow; max_batch_rows, shared by the prompts of the pass, stays the upper bound.
    kind = "sequence" if backend is _SequenceRows else "batch"
    C = max(len(p.tokens) for p in prompts)
    per_prompt = _rows_per_chunk(_Dims.of(model), kind, B, C, len(prompts[0].target), cfg.max_batch_rows,
                                 cfg.memory_budget_mb * 2**20)
    targets = torch.tensor([list(p.target) for p in prompts], device=a.device)  # [prompt, T]
    with _gradients_on(model):
        for chunk in _row_plan(chosen, cfg.steps, per_prompt):
            leaves: dict[int, Tensor] = {}
            for li in sorted({li for li, _ in chunk}):
                ks = torch.tensor([k for lj, k in chunk if lj == li], device=a.device)
                leaves[li] = (a[None, ks, None] * fbar[:, li, None].to(a.device)).detach().requires_grad_(True)
            logp = runner.run(chunk, leaves)  # [prompt * rows, T, vocab], prompt-major
            with torch.no_grad():
                by_prompt = logp.detach().view(B, len(chunk), *logp.shape[1:])
                for r, (li, k) in enumerate(chunk):
                    if k == full_step:
                        _self_check(by_prompt[:, r], plain, prompts, chosen[li], _act_dtype(model))
            prob = _target_prob(logp, targets.repeat_interleave(len(chunk), dim=0))
            order = sorted(leaves)
            got = torch.autograd.grad(prob.sum(), [leaves[li] for li in order])
            for li, g in zip(order, got):
                grads[:, li] += g.float().sum(1).cpu()
    return fbar.cpu() * grads / cfg.steps
