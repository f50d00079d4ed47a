"""Query neurons of a value neuron: which earlier components made it fire.

The key κ of value neuron (l, i) (``value_keys``: the row of W_in, or W_gate for the gate of a GLU, times the ln2
weight, mean-removed for LayerNorm) reads ln2(resid_mid[l]), so <resid_mid[l], κ> splits exactly over the
earlier components (embedding, attention layers <= l, FFN neurons and biases < l). A component's score is
Imp(value) · <component, κ> / <resid_mid[l], κ>. The up and gate keys of a GLU are scored separately.

Example:
    >>> q = query_neurons(model, prompt, 20, 1234)                               # doctest: +SKIP
    >>> q["up"].top(5)                              # [[layer, neuron, score]]   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..data.prompts import Prompt
from ..errors import QrncaError
from ..protocols import HookedModel
from .cache import lens_cache, scoring_weights
from .config import LensConfig
from .exact import score_triples
from .heads import head_vectors
from .weights import value_keys

__all__ = ["QueryNeurons", "query_neurons"]


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
    kappa: Float[Tensor, " d_model"]
    total: float
    neurons: Float[Tensor, "layer d_mlp"]
    heads: Float[Tensor, "layer head"]
    ffn_layers: Float[Tensor, " layer"]
    attn_layers: Float[Tensor, " layer"]
    embed: float

    def top(self, k: int = 10) -> list[list[Any]]:
        """The k FFN query neurons with the largest scores: [[layer, neuron, score], ...]."""
        dm = self.neurons.shape[1]
        vals, idx = torch.topk(self.neurons.flatten(), min(k, self.neurons.numel()))
        return [[int(i // dm), int(i % dm), float(v)] for i, v in zip(idx.tolist(), vals.tolist())]


def query_neurons(model: HookedModel, prompt: Prompt, layer: int, neuron: int, cfg: LensConfig = LensConfig()) -> dict[str, QueryNeurons]:
    """Query neurons, heads and layers of value neuron (layer, neuron) on ``prompt``, one entry per key.

    Args:
        model: a TransformerLens model.
        prompt: one prompt, scored at its target position.
        layer, neuron: the value neuron.
        cfg: ``check_tol``.

    Returns:
        Key name (``"up"``/``"gate"`` for a GLU, ``"in"`` otherwise) -> ``QueryNeurons``.

    Example:
        >>> query_neurons(model, prompt, 1, 5)["up"].importance                  # doctest: +SKIP
    """
    W_out = scoring_weights(model, [prompt])
    keys = value_keys(model, layer, neuron)
    with torch.no_grad():
        c = lens_cache(model, [prompt], check_tol=cfg.check_tol)
        base = c.base_logits()
        one = torch.tensor([0], device=W_out.device)
        imp = float(score_triples(c, W_out, one, one + layer, one + neuron, base, torch.logsumexp(base, -1))[0])
        heads, rest = head_vectors(model, c)
        out = {}
        for name, kap in keys.items():
            total = float(c.resid_mid[0, layer] @ kap)
            if total == 0.0:
                raise QrncaError(f"<resid_mid, κ> is exactly 0 for neuron ({layer}, {neuron}): its {name} key reads "
                                 "nothing, so no component can be its query")
            f = imp / total
            per = torch.einsum("li,lid,d->li", c.writes[0], W_out, kap) * f  # each neuron's write, read by κ
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
