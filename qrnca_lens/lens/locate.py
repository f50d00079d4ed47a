"""The lens as a locator: each query's top FFN neurons by log-probability increase, as a ``LensResult``.

Example:
    >>> res = lens_locate(model, queries, ProxyConfig("cloze"), top_k=20)       # doctest: +SKIP
    >>> res.qr_neurons(queries[0].id)[:2]                                       # doctest: +SKIP
    NeuronSet([(27, 1410, 0.93), (3, 88, 0.51)])
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..data.prompts import Prompt, ProxyConfig, build_all_prompts, tokenizer_identity
from ..data.queries import QueriesLike, Query, as_queries
from ..errors import QrncaError
from ..located import Located
from ..model.access import default_prepend_bos, model_name, model_numerics, n_layers, tokenizer_of
from ..neurons import NeuronSet
from ..protocols import HookedModel
from ..versions import library_versions, model_identity
from .cache import lens_cache, scoring_weights
from .config import LensConfig
from .exact import top_bound, top_from_scores
from .lse import layer_neuron_scores

__all__ = ["lens_locate", "LensResult"]


@dataclass(eq=False)
class LensResult(Located):
    """The lens's neurons per query (a ``Located``, like QRNCA's ``LocateResult``), with what produced them.

    ``certified[q]``: the top-k is certified exact (topk mode) or exact (exact mode); ``target_logprob[q]``: the
    model's mean log-probability of the first target token over the query's prompts. ``neurons_json()`` is the
    ``neurons.json`` document (no common neurons: the method has no collection-level step). ``prompts`` and
    ``query_records`` (the prompts scored, the queries as they were), ``dtype``/``device`` and ``costs``
    (``seconds``, ``seconds_per_query``, ``passes``) are what ``evaluate`` reads to judge it as ``logprob``.

    Example:
        >>> res = lens_locate(model, queries, ProxyConfig("cloze"), top_k=5, progress=False)  # doctest: +SKIP
        >>> res.write_neurons("runs/lens")                                                    # doctest: +SKIP
        PosixPath('runs/lens/neurons.json')
    """

    method: ClassVar[str] = "logprob-increase"
    score_name: ClassVar[str] = "logprob_increase"

    config: dict[str, Any]
    model: str
    model_identity: dict[str, Any]
    layers: list[int]
    groups: dict[str, str]
    neurons: dict[str, NeuronSet]
    certified: dict[str, bool]
    target_logprob: dict[str, float]
    data: str | None = None
    versions: dict[str, Any] = field(default_factory=library_versions)
    query_fields: dict[str, dict[str, str]] = field(default_factory=dict)  # per query: language, relation
    prompts: dict[str, list[Prompt]] = field(default_factory=dict, repr=False)
    query_records: dict[str, Query] = field(default_factory=dict, repr=False)
    dtype: str | None = None
    device: str | None = None
    costs: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def query_ids(self) -> list[str]:
        return list(self.neurons)

    def locator_name(self) -> str:
        return "logprob"

    def stored_prompts(self, query_ids: Iterable[str] | None = None) -> dict[str, list[Prompt]]:
        ids = self.query_ids if query_ids is None else list(query_ids)
        missing = [q for q in ids if q not in self.prompts]
        if missing:
            raise QrncaError(f"this LensResult holds no prompts for queries {missing[:3]} (made by hand, or before "
                             "lens_locate kept them); run lens_locate again")
        return {q: list(self.prompts[q]) for q in ids}

    def stored_queries(self, query_ids: Iterable[str] | None = None) -> list[Query]:
        ids = self.query_ids if query_ids is None else list(query_ids)
        missing = [q for q in ids if q not in self.query_records]
        if missing:
            raise QrncaError(f"this LensResult holds no queries {missing[:3]}; run lens_locate again")
        return [self.query_records[q] for q in ids]

    def stored_tokenizers(self, query_ids: Iterable[str]) -> set[str]:
        sha = self.tokenizer.get("vocab_sha256")
        return {sha} if sha else set()

    def proxy_config(self) -> ProxyConfig:
        if not isinstance(self.config.get("proxy"), dict):
            raise QrncaError("this LensResult records no proxy (its config has none); run lens_locate again")
        return ProxyConfig.from_dict(self.config["proxy"])

    def group_of(self, query_id: str) -> str:
        return self.groups[query_id]

    def qr_neurons(self, query_id: str) -> NeuronSet:
        return self.neurons[query_id]

    def neurons_json(self) -> dict[str, Any]:
        qs = {q: {"group": self.groups[q], **self.query_fields.get(q, {}), "qr_neurons": self.neurons[q].to_list(),
                  "certified": self.certified[q],
                  "target_logprob": self.target_logprob[q]} for q in self.neurons}
        return {
            "config": self.config, "versions": self.versions, "model_identity": self.model_identity,
            "model": self.model, "data": self.data, "layers": self.layers, "common_neurons": [], "queries": qs,
            "summary": {"n_queries": len(qs), "mean_qr_neurons": sum(len(v) for v in self.neurons.values()) / len(qs),
                        "n_common_neurons": 0, "all_certified": all(self.certified.values())},
        }

    def __repr__(self) -> str:
        s = self.neurons_json()["summary"]
        return (f"LensResult({self.model}, {s['n_queries']} queries, {s['mean_qr_neurons']:.1f} neurons/query, "
                f"{'all certified' if s['all_certified'] else 'some uncertified'})")


def _query_top(model: HookedModel, prompts: Sequence[Prompt], top_k: int, cfg: LensConfig,
               W_out: Tensor, layers: Sequence[int] | None = None) -> tuple[NeuronSet, bool, list[float]]:
    """The top_k neurons of a query by log-prob increase averaged over its prompts (exact; certified in topk mode).

    ``layers``: only these layers are searched; every neuron of them is scored exactly (the top-k mode's
    certificate ranks every layer's bounds together, so a subset is scored in full).
    """
    L, dm = W_out.shape[0], W_out.shape[1]
    cache = lens_cache(model, prompts, check_tol=cfg.check_tol)
    if layers is not None:
        a = cache.coefficients
        part = torch.stack([layer_neuron_scores(W_out[layer], cache.lens.U, cache.layer_logits(layer), a[:, layer],
                                                cache.targets, cfg) for layer in layers], dim=1)
        chosen = top_from_scores(part.mean(0), min(top_k, len(layers) * dm))
        neurons = NeuronSet([(layers[i], n, x) for i, n, x in chosen.to_list()])
        return neurons, True, cache.model_logp.cpu().tolist()
    k = min(top_k, L * dm)
    if cfg.mode == "exact":
        a = cache.coefficients
        full = torch.stack([layer_neuron_scores(W_out[layer], cache.lens.U, cache.layer_logits(layer), a[:, layer],
                                                cache.targets, cfg) for layer in range(L)], dim=1)
        top = top_from_scores(full.mean(0), k)
    else:
        top = top_bound(cache, W_out, k, cfg, groups=[list(range(cache.size))])[0]
    return NeuronSet(top.to_list()), top.certified, cache.model_logp.cpu().tolist()


def lens_locate(
    model: HookedModel,
    queries: QueriesLike,
    proxy_cfg: ProxyConfig,
    *,
    pool: Sequence[Query] | None = None,
    top_k: int = 20,
    progress: bool = True,
    cfg: LensConfig = LensConfig(mode="topk"),
    prompts: dict[str, list[Prompt]] | None = None,
    layers: Sequence[int] | None = None,
) -> LensResult:
    """The log-prob-increase locator: each query's top_k FFN neurons, as a ``LensResult``.

    A neuron's score is its log-probability increase (first target token, target position) **averaged** over the
    query's prompts. In topk mode the top_k by that mean is exact and certified: the group mean of the
    first-order bounds bounds the group mean of the exact scores, and neurons are rescored until the top_k-th
    mean clears every remaining bound. There are no common neurons (an empty list): the method has no
    collection-level step.

    Args:
        model: a TransformerLens model.
        queries: the queries (distinct ids).
        proxy_cfg: how prompts are built (``prepend_bos=None``: the model's default).
        pool: examples and distractors for the prompts (default: ``queries``).
        top_k: neurons kept per query.
        progress: show a progress bar over queries.
        cfg: ``mode="topk"`` (certified) or ``"exact"``, and the engine settings.
        prompts: query id -> its prompts, used as they are (e.g. the very prompts another locator ranked on);
            otherwise they are built with ``build_all_prompts(queries, proxy_cfg, ...)``.
        layers: search only these layers (default: all); each of their neurons is scored exactly.

    Returns:
        A ``LensResult``: ``qr_neurons(q)``, ``certified[q]``, ``target_logprob[q]``; ``neurons_json()`` is the
        ``neurons.json`` document (``config``, ``versions``, ``model_identity``, ``model``, ``data`` (None),
        ``layers``, ``common_neurons`` ([]), ``queries`` and ``summary``).

    Example:
        >>> res = lens_locate(model, queries, ProxyConfig("cloze"), progress=False)  # doctest: +SKIP
        >>> all(res.certified.values())                                              # doctest: +SKIP
        True
    """
    queries = as_queries(queries)
    proxy, prompts, layers, L = _lens_inputs(model, queries, proxy_cfg, top_k=top_k, pool=pool, prompts=prompts,
                                             layers=layers)
    ids = [q.id for q in queries]
    t0 = time.perf_counter()
    neurons, certified, logp, fields = _rank_queries(model, queries, prompts, top_k, cfg, layers, progress)
    config = {
        "method": "logprob-increase",
        "score": "log-probability increase of the first target token at the target position, averaged over "
                 "the query's prompts",
        "top_k": top_k,
        "proxy": proxy.to_dict(),
        "lens": cfg.to_dict(),
    }
    held = model_numerics(model)
    seconds = time.perf_counter() - t0
    n_prompts = sum(len(prompts[q]) for q in ids)
    return LensResult(config=config, model=model_name(model), model_identity=model_identity(model),
                      layers=list(layers) if layers is not None else list(range(L)),
                      groups={q.id: q.group for q in queries}, neurons=neurons, certified=certified,
                      target_logprob=logp, query_fields=fields, prompts={q: list(prompts[q]) for q in ids},
                      query_records={q.id: q for q in queries}, dtype=held["dtype"], device=held["device"],
                      costs={"seconds": seconds, "seconds_per_query": seconds / len(ids), "passes": n_prompts},
                      tokenizer=tokenizer_identity(tokenizer_of(model)))


def _lens_inputs(model: HookedModel, queries: list[Query], proxy_cfg: ProxyConfig, *, top_k: int,
                 pool: Sequence[Query] | None, prompts: dict[str, list[Prompt]] | None,
                 layers: Sequence[int] | None) -> tuple[ProxyConfig, dict[str, list[Prompt]], list[int] | None, int]:
    """lens_locate's checked inputs: the proxy with BOS resolved, every query's prompts, the layers, the depth L."""
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
    L = n_layers(model)
    searched = None
    if layers is not None:
        searched = list(dict.fromkeys(int(x) for x in layers))
        bad = [x for x in searched if not 0 <= x < L]
        if not searched or bad:
            raise QrncaError(f"layers {bad or 'none'} are not layers of this {L}-layer model; give layer numbers "
                             f"0..{L - 1}, or None for all")
    return proxy, prompts, searched, L


def _rank_queries(model: HookedModel, queries: Sequence[Query], prompts: dict[str, list[Prompt]], top_k: int,
                  cfg: LensConfig, layers: list[int] | None, progress: bool,
                  ) -> tuple[dict[str, NeuronSet], dict[str, bool], dict[str, float], dict[str, dict[str, str]]]:
    """Each query's top_k neurons, whether certified, its mean target log-prob and its language/relation."""
    W_out = scoring_weights(model, [p for ps in prompts.values() for p in ps])
    it: Any = queries
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(queries, desc="lens", unit="query")
    neurons: dict[str, NeuronSet] = {}
    certified: dict[str, bool] = {}
    logp: dict[str, float] = {}
    fields: dict[str, dict[str, str]] = {}
    with torch.no_grad():
        for q in it:
            neurons[q.id], certified[q.id], logps = _query_top(model, prompts[q.id], top_k, cfg, W_out, layers)
            logp[q.id] = sum(logps) / len(logps)
            # The report regroups by these, so neurons.json carries them.
            fields[q.id] = {k: getattr(q, k) for k in ("language", "relation") if getattr(q, k)}
    return neurons, certified, logp, fields
