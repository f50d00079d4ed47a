"""The lens as a locator: each query's top FFN neurons by log-probability increase, in the ``neurons.json`` schema.

Example:
    >>> doc = lens_locate(model, queries, ProxyConfig("cloze"), top_k=20)       # doctest: +SKIP
    >>> doc["queries"][queries[0].id]["qr_neurons"][:2]   # [[layer, neuron, score], ...]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..data import Query
from ..errors import QrncaError
from ..models import default_prepend_bos, model_name, n_layers, tokenizer_of
from ..proxies import Prompt, ProxyConfig, build_all_prompts
from ..versions import library_versions, model_identity
from .cache import lens_cache, scoring_weights
from .config import LensConfig
from .exact import top_bound, top_from_scores
from .lse import layer_neuron_scores

__all__ = ["lens_locate"]


def _query_top(model: Any, prompts: Sequence[Prompt], top_k: int, cfg: LensConfig,
               W_out: Tensor) -> tuple[list[list[Any]], bool, list[float]]:
    """The top_k neurons of a query by log-prob increase averaged over its prompts (exact; certified in topk mode)."""
    L, dm = W_out.shape[0], W_out.shape[1]
    cache = lens_cache(model, prompts, check_tol=cfg.check_tol)
    k = min(top_k, L * dm)
    if cfg.mode == "exact":
        a = cache.coefficients
        full = torch.stack([layer_neuron_scores(W_out[layer], cache.lens.U, cache.layer_logits(layer), a[:, layer],
                                                cache.targets, cfg) for layer in range(L)], dim=1)
        top = top_from_scores(full.mean(0), k)
    else:
        top = top_bound(cache, W_out, k, cfg, groups=[list(range(cache.size))])[0]
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

    Returns:
        The ``neurons.json`` document: ``config``, ``versions``, ``model_identity``, ``model``, ``data`` (None),
        ``layers``, ``common_neurons`` ([]), ``queries`` (id -> ``group, qr_neurons, certified,
        target_logprob``) and ``summary``.

    Example:
        >>> doc = lens_locate(model, queries, ProxyConfig("cloze"), progress=False)  # doctest: +SKIP
        >>> doc["summary"]["all_certified"]                                          # doctest: +SKIP
        True
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
    W_out = scoring_weights(model, [p for ps in prompts.values() for p in ps])
    it: Any = queries
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(queries, desc="lens", unit="query")
    out: dict[str, Any] = {}
    with torch.no_grad():
        for q in it:
            rows, certified, logps = _query_top(model, prompts[q.id], top_k, cfg, W_out)
            fields = {k: getattr(q, k) for k in ("language", "relation") if getattr(q, k)}  # the report regroups by these
            out[q.id] = {"group": q.group, **fields, "qr_neurons": rows, "certified": certified,
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
