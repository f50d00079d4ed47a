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
  Δ_i = lse(L_b + a_i P_i) - lse(L_b), computed by a direct or a (default) series engine (see ``lse``): the
  series' truncation is bounded below float32 rounding of a direct logsumexp.
- Top-K mode: the tangent of t -> log p(w | lens(b + t v)) at t = 0 bounds a neuron's exact score from above, so neurons are
  rescored in decreasing order of that bound until the k-th exact score clears every remaining bound: the exact
  top k with a certificate (``TopNeurons.certified``; see ``exact``), not an approximation.
- Query neurons of a value neuron: its key κ splits <resid_mid[l], κ> exactly over the earlier components,
  which share the neuron's importance in proportion (see ``query_neurons``).

TL's weight processing (``enable_compatibility_mode()`` on a bridge: fold_ln, centred writing weights and
unembedding, folded value biases; or a HookedTransformer with processed weights) leaves every score unchanged:
the lens removes the mean for LayerNorm models, log-softmax ignores the unembedding's centring, and a head's
vector excludes its constant (bias) share, which TL moves into b_O.

Gemma-style models: an RMSNorm that scales by ``1 + w`` is read with its offset (TL's bridge keeps the raw w and
flags ``uses_weight_offset``), and a post-MLP (post-attention) norm is frozen like the final one: a neuron's write
m_i W_out[l, i] reaches the residual as (m_i / s_l) (W_out[l, i] ⊙ w_l), s_l the norm's scale in the real forward
(``LensCache.mlp_scale``), so W_out carries w_l and the coefficient a = m / (s s_l). Soft-capped final logits are
refused with an error. Every forward pass checks that the lens reproduces the model's own log-probabilities and
that the residual stream decomposes as assumed.

Example:
    >>> from qrnca_lens.data.queries import load_data
    >>> from qrnca_lens.lens import LensConfig, neuron_scores, query_neurons, top_neurons
    >>> from qrnca_lens.model.loading import load_model
    >>> from qrnca_lens.data.prompts import ProxyConfig, build_all_prompts
    >>> pool = load_data("builtin:facts")
    >>> model = load_model("smollm2")                                          # doctest: +SKIP
    >>> prompts = build_all_prompts(pool[:2], ProxyConfig("cloze"), model.tokenizer, pool=pool)  # doctest: +SKIP
    >>> ps = [p for v in prompts.values() for p in v]                          # doctest: +SKIP
    >>> scores = neuron_scores(model, ps)                    # [prompt, layer, d_mlp]  # doctest: +SKIP
    >>> top = top_neurons(model, ps, k=10, cfg=LensConfig(mode="topk"))        # doctest: +SKIP
    >>> top[0].to_list()[:2]                                 # [[layer, neuron, score], ...]  # doctest: +SKIP
    >>> q = query_neurons(model, ps[0], *top[0].to_list()[0][:2])              # doctest: +SKIP
    >>> q["up"].top(5)                                                         # doctest: +SKIP

The package, in the order the data flows (each module holds what its name says):

- ``config``: ``LensConfig`` and the engine and mode names.
- ``weights``: the weights the lens reads, the frozen lens built from them, neuron keys and head constants.
- ``cache``: one forward pass (``lens_cache``) at the targets, with the self-check against the model.
- ``lse``: the per-neuron log-sum-exp engine (pure tensor functions).
- ``exact``: exact neuron scores and the certified top k.
- ``heads``: layer, head and per-source attention scores.
- ``query_neurons``: the query neurons of a value neuron.
- ``baselines``: the paper's 7 alternative scores and the ablation comparison.
- ``locate``: the lens as a locator (``neurons.json``).
- ``bench``: the benchmark (``python -m qrnca_lens.bench.lens``); the ``qrnca-lens lens`` handler lives in ``qrnca_lens.cli.lens``.
"""

from __future__ import annotations

# ``query_neurons`` names both a submodule and a function: the from-import below binds the function over the
# submodule attribute the import system sets (the submodule stays importable as ``qrnca_lens.lens.query_neurons``).
from .baselines import BASELINES, ablation_metrics, baseline_scores, compare_methods, comparison_report
from .cache import LensCache, lens_cache
from .config import ENGINES, MODES, LensConfig, LensRunConfig
from .exact import TopNeurons, neuron_scores, score_neurons, top_neurons
from .heads import LayerScores, attention_source_scores, head_vectors, layer_scores
from .locate import LensResult, lens_locate
from .query_neurons import QueryNeurons, query_neurons
from .weights import FrozenLens, frozen_lens, value_keys

__all__ = [
    "ENGINES",
    "MODES",
    "BASELINES",
    "LensConfig",
    "LensRunConfig",
    "LensResult",
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
]
