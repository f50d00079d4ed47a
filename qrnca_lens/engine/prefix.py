"""One prefix group of the row engine: the cached prefixes, the rows behind them, their interventions.

See ``qrnca_lens.engine`` for the idea; ``Row`` is a short row, ``Prefix`` runs rows of its prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import QrncaError
from ..model.access import d_mlp, hf_model, mlp_hook_name, model_device, model_dtype, n_layers, pad_batch
from ..model.hooks import capture, hooked
from ..model.readout import StopForward, final_residual_hook, head32
from ..model.surgery import prefix_cache_kwarg, skip_blocks
from ..protocols import HookedModel

__all__ = ["Row", "Scale", "Prefix", "Backend", "backend_of", "choose_backend"]

Backend = Literal["packed", "batch", "full"]
"""How rows run (the one spelling of "fast path or full-sequence oracle", for the engine, IG and scoring):

- ``"packed"``: a TL 4.x ``TransformerBridge`` over a transformers model; a group's prefixes share one cache,
  rows follow along the sequence behind a 4D mask.
- ``"batch"``: a TL 3.x ``HookedTransformer``; rows of one prompt go along the batch behind its frozen cache.
- ``"full"``: every row is a full sequence (prompt + row), no cache: exact and slow. The oracle, and the only
  backend of other models (TL-native bridges).

``backend_of(model)`` is a model's fastest; ``choose_backend(model, fast=False)`` asks for the oracle.
"""

Scale = tuple[tuple[int, tuple[int, ...], float], ...]  # (layer, neurons, factor), at the row's first token


@dataclass(frozen=True)
class Row:
    """One short row behind a cached prompt: ``tokens[0]`` is the prompt's last token (where interventions
    act), the rest are teacher-forced. ``scale``: (layer, neurons, factor) triples at ``tokens[0]``."""

    prompt: int
    tokens: tuple[int, ...]
    scale: Scale = ()

    @property
    def start(self) -> int | None:
        """The lowest layer the row changes (None: a clean row)."""
        return min((layer for layer, idx, _ in self.scale if idx), default=None)

    def clean(self) -> "Row":
        return Row(self.prompt, self.tokens)


_FINAL = "\0final"  # the store key of the final residual (no hook has this name)


def _stop_at_final(store: dict[str, Tensor]) -> Any:
    def hook(act: Tensor, hook: Any) -> Tensor:
        store[_FINAL] = act
        raise StopForward

    return hook


# ---------------------------------------------------------------- backends


def backend_of(model: HookedModel) -> Backend:
    """The fastest ``Backend`` of this model: ``"packed"`` (bridge over transformers), ``"batch"``
    (HookedTransformer) or ``"full"``."""
    original = getattr(model, "original_model", None)
    if original is not None:
        try:
            from transformers import PreTrainedModel
        except ImportError:  # pragma: no cover
            return "full"
        return "packed" if isinstance(original, PreTrainedModel) else "full"
    try:
        from transformer_lens import HookedTransformer
    except ImportError:
        return "full"
    return "batch" if isinstance(model, HookedTransformer) else "full"


def choose_backend(model: HookedModel, fast: bool = True) -> Backend:
    """The backend a caller's choice runs on: the model's own (``backend_of``) for the fast path, ``"full"`` for
    the full-sequence oracle (``IGConfig(method="reference")``, ``EvalConfig(engine=False)``,
    ``score_items(engine=False)`` all mean ``fast=False``).

    Example:
        >>> choose_backend(model, fast=False)   # doctest: +SKIP
        'full'
    """
    return backend_of(model) if fast else "full"


# ---------------------------------------------------------------- one prefix group


def _new_cache() -> Any:
    from transformers import DynamicCache

    # No config: every layer keeps all its keys (a sliding-window cache layer would crop a packed prefix;
    # the window is enforced by the rows' mask instead).
    return DynamicCache()


class Prefix:
    """The cached prefixes of a group of prompts and the clean values recorded there.

    ``prompts``: token lists; a row of prompt ``b`` recreates its last token, so the cache holds
    ``tokens[:-1]``. ``record``: hook names whose clean value at each last position is kept in ``clean``
    ([prompt, width] per name). ``continuations``: teacher-forced tokens per prompt; on a bridge the prefix
    pass runs them too (masked from every row) and keeps the plain forward's log-probabilities at the last
    prompt token and each of them in ``plain`` ([1 + len, vocab] per prompt): the self-check's reference,
    without a second forward. Elsewhere ``plain`` is None.
    """

    def __init__(self, model: HookedModel, prompts: Sequence[Sequence[int]], *, record: Sequence[str] = (),
                 backend: Backend | None = None, continuations: Sequence[Sequence[int]] | None = None) -> None:
        if not prompts or any(len(p) < 1 for p in prompts):
            raise QrncaError("every prompt needs at least one token")
        self.model, self.backend = model, backend or backend_of(model)
        self.device, self.L = model_device(model), n_layers(model)
        self.prompts = [list(p) for p in prompts]
        self.P = [len(p) - 1 for p in self.prompts]  # cached positions per prompt
        self._resid: dict[tuple[int, tuple[int, ...]], Tensor] = {}  # clean row -> [layer, T, d_model]
        self.clean: dict[str, Tensor] = {}
        self.plain: list[Tensor] | None = None
        if self.backend == "packed":
            self._fill_packed(record, continuations)
        elif self.backend == "batch":
            self._fill_batch(record)
        else:
            self._fill_full(record)

    # ------------------------------------------------------------ prefix passes

    def _fill_packed(self, record: Sequence[str], continuations: Sequence[Sequence[int]] | None) -> None:
        model = self.model
        conts = [list(c) for c in continuations] if continuations is not None else [[] for _ in self.prompts]
        full = [p + c for p, c in zip(self.prompts, conts)]
        # Any real token pads: pad positions are never attended.
        ids = pad_batch(full, self.prompts[0][0], self.device)
        store: dict[str, Tensor] = {}
        cache = _new_cache()
        final = final_residual_hook(model)

        def stop(act: Tensor, hook: Any) -> Tensor:
            store[final] = act
            raise StopForward  # the cache is filled; logits are read below at the few positions needed

        with torch.no_grad(), hooked(model, fwd=[(n, capture(store, n)) for n in record] + [(final, stop)]), \
                prefix_cache_kwarg(model) as keyword:
            try:
                model(ids, **{keyword: cache})
            except StopForward:
                pass
        if continuations is not None:
            resid = store[final]
            self.plain = [
                torch.log_softmax(head32(model, resid[b : b + 1, P : P + 1 + len(c)])[0], dim=-1)
                for b, (P, c) in enumerate(zip(self.P, conts))
            ]
        last = torch.tensor(self.P, device=self.device)
        rows = torch.arange(len(self.prompts), device=self.device)
        self.clean = {n: store[n][rows, last].detach().clone() for n in record}
        # One sequence: prompt b's cached positions at [offset_b, offset_b + P_b).
        self.offsets = [sum(self.P[:b]) for b in range(len(self.P))]
        self.C = sum(self.P)
        self.kv = [
            tuple(torch.cat([t[b : b + 1, :, : self.P[b]] for b in range(len(self.P))], dim=2) for t in (layer.keys, layer.values))
            for layer in cache.layers
        ]
        hf_cfg = hf_model(model).config
        types = getattr(hf_cfg, "layer_types", None) or []
        self.window = getattr(hf_cfg, "sliding_window", None) if "sliding_attention" in types else None

    def _fill_batch(self, record: Sequence[str]) -> None:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        self._tl_cache = TransformerLensKeyValueCache
        self.caches = []
        for p in self.prompts:
            cache = TransformerLensKeyValueCache.init_cache(self.model.cfg, self.device, batch_size=1)
            with torch.no_grad():
                if len(p) > 1:
                    # return_type=None: HookedTransformer stops before the unembedding (no logits per position)
                    self.model(torch.tensor([p[:-1]], device=self.device), past_kv_cache=cache, return_type=None)
            cache.freeze()
            self.caches.append(cache)
        self._record_from_rows(record)

    def _fill_full(self, record: Sequence[str]) -> None:
        self._record_from_rows(record)

    def _record_from_rows(self, record: Sequence[str]) -> None:
        if not record:
            return
        got: dict[str, list[Tensor]] = {n: [] for n in record}
        for b, p in enumerate(self.prompts):
            rows = [Row(b, (p[-1],))]
            acts: dict[str, Tensor] = {}
            with torch.no_grad():
                self.forward(rows, capture_names=record, acts_out=acts)
            for n in record:
                got[n].append(acts[n][0])
        self.clean = {n: torch.stack(v) for n, v in got.items()}

    # ------------------------------------------------------------ rows

    def forward(
        self,
        rows: Sequence[Row],
        *,
        start: int = 0,
        writes: Mapping[int, tuple[Sequence[int], Tensor]] | None = None,
        capture_names: Sequence[str] = (),
        acts_out: dict[str, Tensor] | None = None,
    ) -> Float[Tensor, "tokens vocab"]:
        """Log-probabilities (float32) at every token of ``rows``, concatenated in row order.

        ``start``: the layer the rows start at (every row must be clean below it). ``writes``: per layer,
        (row indices, values [n, d_mlp]) written at those rows' first token on the MLP hook (IG's leaves).
        ``capture_names``: hooks whose values at every row token are put in ``acts_out`` ([tokens, width]).
        """
        if not rows:
            raise QrncaError("no rows to run")
        if start > 0 and self.backend == "full":
            start = 0
        lengths = [len(r.tokens) for r in rows]
        firsts = [sum(lengths[:i]) for i in range(len(rows))]
        hooks = self._intervention_hooks(rows, firsts, writes)
        store: dict[str, Tensor] = {}
        hooks += [(n, capture(store, n, detach=False)) for n in capture_names]
        # Every forward stops at the final residual; the logits come from it in float32 (``head32``), so a
        # half-precision model's target probability and its gradient are not rounded to its dtype.
        hooks.append((final_residual_hook(self.model), _stop_at_final(store)))
        if self.backend == "packed":
            resid = self._packed(rows, start, hooks, store)
            if acts_out is not None:
                acts_out.update({n: store[n][0] for n in capture_names})
        elif self.backend == "batch":
            resid = self._batch(rows, start, hooks, store, acts_out, capture_names)
        else:
            resid = self._full(rows, hooks, store, acts_out, capture_names)
        return torch.log_softmax(head32(self.model, resid), dim=-1)

    def _intervention_hooks(self, rows: Sequence[Row], firsts: Sequence[int],
                            writes: Mapping[int, tuple[Sequence[int], Tensor]] | None) -> list[tuple[str, Any]]:
        """Per layer one hook: row r's first token scaled by its factors, or overwritten by its written value.
        Positions are flat row-token indices; each backend maps them to (batch, position) in ``_where``."""
        width = d_mlp(self.model)
        scales: dict[int, tuple[list[int], list[Tensor]]] = {}
        for r, row in enumerate(rows):
            for layer, idx, factor in row.scale:
                if not idx:
                    continue
                pos, mats = scales.setdefault(layer, ([], []))
                if not pos or pos[-1] != firsts[r]:
                    pos.append(firsts[r])
                    mats.append(torch.ones(width))
                mats[-1][list(idx)] = float(factor)
        hooks = []
        for layer, (pos, mats) in sorted(scales.items()):
            hooks.append((mlp_hook_name(self.model, layer), self._scale_hook(pos, torch.stack(mats))))
        for layer, (ridx, values) in sorted((writes or {}).items()):
            hooks.append((mlp_hook_name(self.model, layer), self._write_hook([firsts[r] for r in ridx], values)))
        return hooks

    def _scale_hook(self, flat: Sequence[int], factors: Tensor) -> Any:
        def hook(act: Tensor, hook: Any) -> Tensor:
            b, p, keep = self._where(flat, act)
            out = act.clone()
            out[b, p] = act[b, p] * factors[keep.cpu()].to(device=act.device, dtype=act.dtype)
            return out

        return hook

    def _write_hook(self, flat: Sequence[int], values: Tensor) -> Any:
        def hook(act: Tensor, hook: Any) -> Tensor:
            b, p, keep = self._where(flat, act)
            out = act.clone()  # the other rows stay live: rows written at lower layers flow through here
            out[b, p] = values[keep].to(act.dtype)
            return out

        return hook

    def _where(self, flat: Sequence[int], act: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Flat row-token indices -> (batch, position) in the current forward, and which of them it holds
        (the batch backend runs a chunk's rows in several forwards)."""
        idx = torch.tensor(list(flat), device=act.device, dtype=torch.long)
        if self._layout is None:  # packed: one sequence
            return torch.zeros_like(idx), idx, torch.ones_like(idx, dtype=torch.bool)
        bmap, pmap = self._layout
        b, p = bmap[idx], pmap[idx]
        keep = b >= 0
        return b[keep], p[keep], keep

    _layout: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------ packed backend

    def _mask(self, rows: Sequence[Row], window: int | None) -> Tensor:
        """[1, 1, row tokens, cached + row tokens]: each row token sees its own prompt's cached span and its
        own row's earlier tokens (within ``window`` positions on sliding-window layers)."""
        dev, dtype = self.device, model_dtype(self.model)
        key_prompt = torch.tensor([b for b, P in enumerate(self.P) for _ in range(P)], device=dev, dtype=torch.long)
        key_pos = torch.tensor([k for P in self.P for k in range(P)], device=dev, dtype=torch.long)
        tok_prompt = torch.tensor([r.prompt for r in rows for _ in r.tokens], device=dev)
        tok_q = torch.tensor([self.P[r.prompt] + t for r in rows for t in range(len(r.tokens))], device=dev)
        firsts, i = [], 0
        for r in rows:
            firsts += [i] * len(r.tokens)
            i += len(r.tokens)
        first = torch.tensor(firsts, device=dev)
        me = torch.arange(i, device=dev)
        prefix_ok = key_prompt[None, :] == tok_prompt[:, None]
        own_ok = (me[None, :] >= first[:, None]) & (me[None, :] <= me[:, None])
        if window is not None:
            prefix_ok &= key_pos[None, :] > tok_q[:, None] - window
            own_ok &= me[:, None] - me[None, :] < window
        allowed = torch.cat([prefix_ok, own_ok], dim=1)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=dev)
        mask.masked_fill_(~allowed, float("-inf") if dtype == torch.float32 else torch.finfo(dtype).min)
        return mask[None, None]

    def _packed(self, rows: Sequence[Row], start: int, hooks: list[tuple[str, Any]], store: dict[str, Tensor]) -> Tensor:
        model = self.model
        self._layout = None
        pos = torch.tensor([self.P[r.prompt] + t for r in rows for t in range(len(r.tokens))], device=self.device)
        full = self._mask(rows, None)
        mask: Any = full
        if self.window is not None:
            mask = {"full_attention": full, "sliding_attention": self._mask(rows, self.window)}
        cache = _new_cache()
        for i, (k, v) in enumerate(self.kv):
            cache.update(k, v, i)
        if start > 0:
            inp: Tensor = torch.cat([self.resid(r)[start] for r in rows])[None].to(model_dtype(model))
        else:
            inp = torch.tensor([[t for r in rows for t in r.tokens]], device=self.device)
        with hooked(model, fwd=hooks), prefix_cache_kwarg(model) as keyword, skip_blocks(model, start):
            try:
                model(inp, return_type="logits", attention_mask=mask, position_ids=pos[None], **{keyword: cache})
            except StopForward:
                pass
        return store[_FINAL][0]

    # ------------------------------------------------------------ HookedTransformer backend

    def _batch(self, rows: Sequence[Row], start: int, hooks: list[tuple[str, Any]], store: dict[str, Tensor],
               acts_out: dict[str, Tensor] | None, names: Sequence[str]) -> Tensor:
        """Rows of the same prompt and length share a forward (a broadcast of that prompt's cache)."""
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        groups: dict[tuple[int, int], list[int]] = {}
        for r, row in enumerate(rows):
            groups.setdefault((row.prompt, len(row.tokens)), []).append(r)
        lengths = [len(r.tokens) for r in rows]
        firsts = [sum(lengths[:i]) for i in range(len(rows))]
        n = sum(lengths)
        out: list[Tensor | None] = [None] * len(rows)
        acts: dict[str, list[Tensor | None]] = {nm: [None] * len(rows) for nm in names}
        for (b, T), members in groups.items():
            # The flat token index of each row token -> (batch row, position) inside this forward.
            bmap = torch.full((n,), -1, dtype=torch.long)
            pmap = torch.full((n,), -1, dtype=torch.long)
            for j, r in enumerate(members):
                bmap[firsts[r] : firsts[r] + T] = j
                pmap[firsts[r] : firsts[r] + T] = torch.arange(T)
            if start > 0:  # first: a clean row's residuals may need a (nested) clean pass of their own
                inp = torch.stack([self.resid(rows[r])[start] for r in members]).to(model_dtype(self.model))
                kw: dict[str, Any] = {"start_at_layer": start}
            else:
                inp = torch.tensor([list(rows[r].tokens) for r in members], device=self.device)
                kw = {}
            self._layout = (bmap.to(self.device), pmap.to(self.device))
            prefix = self.caches[b]
            k = len(members)
            entries = [TransformerLensKeyValueCacheEntry(past_keys=e.past_keys.expand(k, -1, -1, -1),
                                                         past_values=e.past_values.expand(k, -1, -1, -1), frozen=True)
                       for e in prefix.entries]
            cache = self._tl_cache(entries=entries, previous_attention_mask=prefix.previous_attention_mask.expand(k, -1),
                                   frozen=True)
            store.clear()
            with hooked(self.model, fwd=hooks):
                try:
                    self.model(inp, return_type="logits", past_kv_cache=cache, **kw)
                except StopForward:
                    pass
            for j, r in enumerate(members):
                out[r] = store[_FINAL][j]
                for nm in names:
                    acts[nm][r] = store[nm][j]
        self._layout = None
        if acts_out is not None:
            acts_out.update({nm: torch.cat([a for a in v if a is not None]) for nm, v in acts.items()})
        return torch.cat([o for o in out if o is not None])

    # ------------------------------------------------------------ full-sequence backend

    def _full(self, rows: Sequence[Row], hooks: list[tuple[str, Any]], store: dict[str, Tensor],
              acts_out: dict[str, Tensor] | None, names: Sequence[str]) -> Tensor:
        """Each row as a full sequence (prompt[:-1] + row tokens), right-padded, batched."""
        seqs = [self.prompts[r.prompt][:-1] + list(r.tokens) for r in rows]
        ids = pad_batch(seqs, seqs[0][0], self.device)
        bmap = torch.tensor([i for i, r in enumerate(rows) for _ in r.tokens])
        pmap = torch.tensor([self.P[r.prompt] + t for r in rows for t in range(len(r.tokens))])
        self._layout = (bmap.to(self.device), pmap.to(self.device))
        try:
            with hooked(self.model, fwd=hooks):
                try:
                    self.model(ids, return_type="logits")
                except StopForward:
                    pass
        finally:
            self._layout = None
        if acts_out is not None:
            acts_out.update({n: store[n][bmap, pmap] for n in names})
        final = store[_FINAL]
        return final[bmap.to(final.device), pmap.to(final.device)]

    # ------------------------------------------------------------ clean residuals

    def resid(self, row: Row) -> Float[Tensor, "layer tokens d_model"]:
        """The clean residual entering every block at the row's tokens (computed once per clean row)."""
        key = (row.prompt, tuple(row.tokens))
        if key not in self._resid:
            self.clean_pass([row])
        return self._resid[key]

    def clean_pass(self, rows: Sequence[Row], capture_names: Sequence[str] = ()
                   ) -> tuple[Tensor, dict[str, Tensor], dict[Row, tuple[int, int]]]:
        """Run the distinct clean versions of ``rows`` from layer 0 and keep their residuals for later starts.

        Returns the clean rows' log-probs, the captured values, and each clean row's (offset, length) in them.
        """
        clean = list(dict.fromkeys(r.clean() for r in rows))
        names = [f"blocks.{layer}.hook_resid_pre" for layer in range(self.L)]
        acts: dict[str, Tensor] = {}
        with torch.no_grad():
            lp = self.forward(clean, capture_names=list(dict.fromkeys([*capture_names, *names])), acts_out=acts)
        at: dict[Row, tuple[int, int]] = {}
        i = 0
        for r in clean:
            T = len(r.tokens)
            self._resid[(r.prompt, r.tokens)] = torch.stack([acts[n][i : i + T].detach() for n in names])
            at[r] = (i, T)
            i += T
        return lp, acts, at
