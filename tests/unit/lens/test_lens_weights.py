"""What the lens reads from the weights (qrnca_lens/lens/weights.py): biases add up, and a wrong read of
the final norm is caught by the check against the model."""

from __future__ import annotations

import pytest
import torch

from qrnca_lens.errors import ModelError
from qrnca_lens.model.hooks import active_hook_count
from qrnca_lens.lens import (
    ablation_metrics,
    attention_source_scores,
    compare_methods,
    head_vectors,
    layer_scores,
    lens_cache,
    neuron_scores,
    query_neurons,
    top_neurons,
)
from qrnca_lens.lens import weights as lens_mod
from test_lens import _fresh, _prompts, facts, rich  # noqa: F401  (fixtures)


def test_query_heads_and_biases_add_up_to_their_layers(rich, tiny_tokenizer, facts):
    prompt = _prompts(facts, tiny_tokenizer, n=1)[0]
    res = query_neurons(rich, prompt, 1, 5)
    cache = lens_cache(rich, [prompt])
    heads, rest = head_vectors(rich, cache)
    b_out = lens_mod._param(rich, "b_out")
    for q in res.values():
        f = q.importance / q.total
        assert torch.allclose(q.heads[:2].sum(-1) + f * (rest[0, :2] @ q.kappa), q.attn_layers[:2], atol=1e-5)
        bias = 0.0 if b_out is None else f * (b_out[0].detach().float() @ q.kappa)
        assert abs(float(q.ffn_layers[0] - q.neurons[0].sum()) - float(bias)) < 1e-5


def test_hooks_are_removed_after_every_call(tiny_model, tiny_tokenizer, facts, monkeypatch):
    prompts = _prompts(facts, tiny_tokenizer, n=2)
    count = active_hook_count(tiny_model)
    calls = [
        lambda: neuron_scores(tiny_model, prompts),
        lambda: top_neurons(tiny_model, prompts, k=3),
        lambda: layer_scores(tiny_model, prompts),
        lambda: attention_source_scores(tiny_model, prompts[0]),
        lambda: query_neurons(tiny_model, prompts[0], 1, 2),
        lambda: ablation_metrics(tiny_model, prompts, [torch.tensor([[0, 1]]), torch.tensor([[2, 3]])]),
        lambda: compare_methods(tiny_model, prompts[:1], k=2, random_repeats=1),
    ]
    for call in calls:
        call()
        assert active_hook_count(tiny_model) == count
    real = lens_mod._norm_affine  # a wrong final-norm weight: the check after the forward pass fails
    monkeypatch.setattr(lens_mod, "_norm_affine", lambda m, norm, d, dev: (real(m, norm, d, dev)[0] * 3, *real(m, norm, d, dev)[1:]))
    with pytest.raises(ModelError, match="does not reproduce"):
        neuron_scores(tiny_model, prompts)
    assert active_hook_count(tiny_model) == count


def test_models_without_mlp_or_with_unsupported_heads_are_refused(tiny_tokenizer, facts, monkeypatch):
    from transformer_lens.model_bridge import TransformerBridge

    attn_only = TransformerBridge.boot_native(
        dict(n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_vocab=len(tiny_tokenizer), attn_only=True,
             act_fn="gelu", normalization_type="LN"), tokenizer=tiny_tokenizer)
    prompt = _prompts(facts, tiny_tokenizer, n=1)[0]
    with pytest.raises(ModelError, match="FFN neurons"):
        neuron_scores(attn_only, [prompt])
    capped = _fresh("llama-bridge", tiny_tokenizer)
    monkeypatch.setattr(capped.cfg, "output_logits_soft_cap", 30.0, raising=False)
    with pytest.raises(ModelError, match="soft-caps"):
        neuron_scores(capped, [prompt])
    # a final norm read wrongly (as for Gemma's (1 + w) RMSNorm) is caught by the check against the model
    model = _fresh("llama-bridge", tiny_tokenizer)
    real = lens_mod._norm_affine
    monkeypatch.setattr(lens_mod, "_norm_affine", lambda m, norm, d, dev: (real(m, norm, d, dev)[0] + 1, *real(m, norm, d, dev)[1:]))
    with pytest.raises(ModelError, match="does not reproduce"):
        neuron_scores(model, [prompt])
