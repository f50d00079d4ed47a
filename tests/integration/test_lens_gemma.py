"""The log-probability lens on Gemma-3: post-attention / post-MLP norms and ``(1 + w)`` RMSNorms.

The oracles never read a norm weight: a neuron's (or head's) write is taken from the model itself, with only
that neuron (head) active at the target and the post-norm's scale pinned (``hook_scale``) to the clean run's,
then added to resid_mid (resid_pre) and read through ``_frozen_logp`` (final residual replaced, final scale
pinned). The tiny Gemma-3 has random norm weights around 0, so a lens that read w instead of 1 + w, or forgot a
post-norm, would fail.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_lens import _acts, _clean_logp, _frozen_logp, _pre_names, _prompts, _subset_agrees_with_everywhere

from qrnca_lens.errors import ModelError
from qrnca_lens.model.hooks import hooked
from qrnca_lens.lens import (
    LensConfig,
    head_vectors,
    layer_scores,
    lens_cache,
    lens_locate,
    neuron_scores,
    query_neurons,
    value_keys,
)
from qrnca_lens.lens.weights import gain_offset, post_norm_gains
from qrnca_lens.model.access import n_layers, post_hook_name


@pytest.fixture(scope="module")
def facts():
    from qrnca_lens.data.queries import load_data

    return load_data("builtin:facts")


def _pinned(model, prompt, layer, hook, values, scale_hook, capture):
    """Rows of one prompt, row r with ``hook`` at the target set to values[r] and ``scale_hook`` pinned to its
    clean value at layer ``layer``; returns ``capture`` at the target, per row."""
    pos = prompt.target_position
    clean, _ = _acts(model, prompt, [scale_hook])
    s = clean[scale_hook][pos]
    n = values.shape[0]
    store = {}

    def put(act, hook):
        out = act.clone()
        out[:, pos] = values.to(act.dtype).reshape(out[:, pos].shape)
        return out

    def freeze(act, hook):
        out = act.clone()
        out[:, pos] = s.to(act.dtype)
        return out

    def keep(act, hook):
        store["x"] = act[:, pos].detach().float().clone()
        return act

    with torch.no_grad(), hooked(model, fwd=[(hook, put), (scale_hook, freeze), (capture, keep)]), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="A forward hook edited hook_scale")  # pinning it is the point
        model(torch.tensor([list(prompt.tokens)] * n))
    return store["x"]


def _neuron_writes(model, prompt, layer):
    """Each neuron's write into the residual, through the post-MLP norm with its scale pinned (from the model)."""
    acts, _ = _acts(model, prompt, [post_hook_name(model, layer)])
    m = acts[post_hook_name(model, layer)][prompt.target_position]
    alone = torch.diag(m)  # row i: only neuron i active
    return _pinned(model, prompt, layer, post_hook_name(model, layer), alone, f"blocks.{layer}.ln2_post.hook_scale",
                   f"blocks.{layer}.hook_mlp_out")


def test_bridge_keeps_gemmas_raw_weight_and_flags_the_offset(tiny_gemma3):
    """What TL's bridge does with Gemma's RMSNorm: ``ln_final.w`` is the checkpoint's raw w (not 1 + w), the norm
    says ``uses_weight_offset``, and its output is x / rms(x) ⊙ (1 + w)."""
    hf_w = tiny_gemma3.original_model.model.norm.weight.detach().float()
    assert torch.equal(tiny_gemma3.ln_final.w.detach().float(), hf_w)
    assert gain_offset(tiny_gemma3, tiny_gemma3.ln_final) == 1.0
    x = torch.randn(3, 32)
    eps = tiny_gemma3.original_model.config.rms_norm_eps
    want = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * (1 + hf_w)
    with torch.no_grad():
        got = tiny_gemma3.ln_final(x[None])[0].float()
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, want / (1 + hf_w) * hf_w, atol=1e-2)


def test_vocab_projection_applies_one_plus_w_by_hand(tiny_gemma3):
    """project_neurons = (W_out[l, i] ⊙ (1 + w_post[l]) ⊙ (1 + w)) @ W_U: the block's post-feedforward norm, then
    the final norm, each with the checkpoint's own weight w and Gemma's offset."""
    from qrnca_lens.render.analysis import project_neurons

    hf = tiny_gemma3.original_model
    gain = 1 + hf.model.norm.weight.detach().float()
    W_U = hf.lm_head.weight.detach().float().T
    for (layer, n), p in zip([(0, 3), (1, 40)], project_neurons(tiny_gemma3, [(0, 3), (1, 40)], k=5)):
        row = hf.model.layers[layer].mlp.down_proj.weight.detach().float()[:, n]
        post = 1 + hf.model.layers[layer].post_feedforward_layernorm.weight.detach().float()
        top = ((row * post * gain) @ W_U).topk(5)
        assert torch.allclose(torch.tensor(p.logits), top.values, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(torch.tensor(p.logits), ((row * (gain - 1)) @ W_U).topk(5).values, atol=1e-3)
        assert not torch.allclose(torch.tensor(p.logits), ((row * gain) @ W_U).topk(5).values, atol=1e-3)


def test_post_norm_gains_are_one_plus_w(tiny_gemma3):
    layers = tiny_gemma3.original_model.model.layers
    mlp, attn = post_norm_gains(tiny_gemma3, "mlp"), post_norm_gains(tiny_gemma3, "attn")
    for layer, hf in enumerate(layers):
        assert torch.allclose(mlp[layer], 1 + hf.post_feedforward_layernorm.weight.float())
        assert torch.allclose(attn[layer], 1 + hf.post_attention_layernorm.weight.float())


def test_gemma_lens_passes_its_self_check_and_reproduces_the_model(tiny_gemma3, tiny_tokenizer, facts):
    prompts = _prompts(facts, tiny_tokenizer, n=2, shots=1)
    cache = lens_cache(tiny_gemma3, prompts)  # raises if the lens or the decomposition does not hold
    for b, p in enumerate(prompts):
        assert abs(float(cache.model_logp[b]) - _clean_logp(tiny_gemma3, p)) < 1e-4
    assert not torch.allclose(cache.mlp_scale, torch.ones_like(cache.mlp_scale))  # the post-norms do scale


def test_gemma_neuron_scores_equal_brute_force(tiny_gemma3, tiny_tokenizer, facts):
    model = tiny_gemma3
    prompts = _prompts(facts, tiny_tokenizer, n=1, shots=1) + _prompts(facts[1:], tiny_tokenizer, n=1, shots=2)
    L, dm = n_layers(model), model.cfg.d_mlp
    want = []
    for prompt in prompts:
        pos = prompt.target_position
        acts, _ = _acts(model, prompt, [f"blocks.{l}.hook_resid_mid" for l in range(L)])
        vecs, bases = [], []
        for l in range(L):
            mid = acts[f"blocks.{l}.hook_resid_mid"][pos]
            bases.append(mid)
            vecs += list(mid[None] + _neuron_writes(model, prompt, l))
        lp = _frozen_logp(model, prompt, vecs + bases)
        want.append((lp[: L * dm].view(L, dm) - lp[L * dm :, None]).float())
    want = torch.stack(want)
    assert want.abs().max() > 1e-3
    for engine, radius in [("direct", 0.5), ("series", 0.5), ("series", 4.0)]:
        got = neuron_scores(model, prompts, LensConfig(engine=engine, series_radius=radius, chunk=20, batch_size=2))
        assert torch.allclose(got, want, atol=2e-4, rtol=1e-3), (engine, radius, float((got - want).abs().max()))


def test_gemma_heads_equal_their_writes_through_the_post_attention_norm(tiny_gemma3, tiny_tokenizer, facts):
    model = tiny_gemma3
    prompt = _prompts(facts, tiny_tokenizer, n=1)[0]
    cache = lens_cache(model, [prompt])
    heads, rest = head_vectors(model, cache)
    assert torch.allclose(heads.sum(2) + rest, cache.attn_out, atol=1e-5)
    pos, H = prompt.target_position, model.cfg.n_heads
    for layer in range(n_layers(model)):
        name = f"blocks.{layer}.attn.hook_z"
        acts, _ = _acts(model, prompt, [name])
        z = acts[name][pos]  # [head, d_head]
        rows = torch.stack([z * (torch.arange(H) == h)[:, None] for h in range(H)] + [torch.zeros_like(z)])
        out = _pinned(model, prompt, layer, name, rows, f"blocks.{layer}.ln1_post.hook_scale",
                      f"blocks.{layer}.hook_attn_out")
        assert torch.allclose(heads[0, layer], out[:H] - out[H], atol=1e-5)
        assert torch.allclose(rest[0, layer], out[H], atol=1e-5)  # Gemma has no biases: 0
    ls = layer_scores(model, [prompt])
    total = float(ls.ffn.sum() + ls.attn.sum())
    assert abs(total - float(ls.final_logp[0] - ls.embed_logp[0])) < 1e-4


def test_gemma_value_keys_read_through_the_one_plus_w_norm(tiny_gemma3, tiny_tokenizer, facts):
    """pre[p] - pre[q] = <x_p, κ>/s_p - <x_q, κ>/s_q with κ built from ln2's 1 + w."""
    model, layer = tiny_gemma3, 1
    prompt = _prompts(facts, tiny_tokenizer, n=1)[0]
    pre = _pre_names(model, layer)
    names = [f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.ln2.hook_scale", *pre.values()]
    acts, _ = _acts(model, prompt, names)
    x, s = acts[names[0]], acts[names[1]][:, 0]
    for neuron in (0, 7, 31):
        for name, hook in pre.items():
            read = (x @ value_keys(model, layer, neuron)[name]) / s
            h = acts[hook][:, neuron]
            assert torch.allclose(h - h[-1], read - read[-1], atol=1e-4), name


def test_gemma_query_neurons_split_the_importance(tiny_gemma3, tiny_tokenizer, facts):
    model, layer = tiny_gemma3, 1
    prompt = _prompts(facts, tiny_tokenizer, n=1)[0]
    scores = neuron_scores(model, [prompt])[0]
    neuron = int(scores[layer].argmax())
    writes = _neuron_writes(model, prompt, 0)  # layer 0's neurons, as the residual receives them
    for name, q in query_neurons(model, prompt, layer, neuron).items():
        assert abs(q.importance - float(scores[layer, neuron])) < 1e-5
        assert abs(q.embed + float(q.attn_layers.sum() + q.ffn_layers.sum()) - q.importance) < 1e-4
        kap = value_keys(model, layer, neuron)[name]
        want = q.importance * (writes @ kap) / q.total
        assert torch.allclose(q.neurons[0], want, atol=1e-5 * (1 + float(want.abs().max())))


def test_final_logit_softcapping_is_refused(tiny_tokenizer, facts):
    from builders import tiny_gemma3_bridge

    model = tiny_gemma3_bridge(tiny_tokenizer)  # a fresh copy: its config is changed
    model.original_model.config.final_logit_softcapping = 30.0
    with pytest.raises(ModelError, match="soft-caps its logits"):
        lens_cache(model, _prompts(facts, tiny_tokenizer, n=1))


def test_gemma_lens_locate_is_the_exact_top_k_of_the_mean_score(tiny_gemma3, tiny_tokenizer, facts):
    from qrnca_lens.data.prompts import ProxyConfig, build_all_prompts

    proxy = ProxyConfig("cloze", n_prompts=2, n_shots=1, prepend_bos=True)
    prompts = build_all_prompts(facts[:2], proxy, tiny_tokenizer, pool=facts)
    doc = lens_locate(tiny_gemma3, facts[:2], proxy, top_k=5, progress=False, prompts=prompts).neurons_json()
    assert doc["summary"]["all_certified"]
    for q in facts[:2]:
        mean = neuron_scores(tiny_gemma3, prompts[q.id]).mean(0)
        rows = doc["queries"][q.id]["qr_neurons"]
        assert [round(r[2], 4) for r in rows] == [round(float(v), 4) for v in mean.flatten().topk(5).values]
        for layer, neuron, score in rows:
            assert abs(score - float(mean[layer, neuron])) < 1e-5


@pytest.mark.slow
def test_gemma3_270m_lens_self_check_and_top_neurons(gemma3, facts):
    """The real Gemma 3: the frozen-norm lens reproduces its log-probabilities (self-check), the top-k over every
    layer is certified, and the certified top-k equals the exact top-k of one prompt among the neurons of a
    global-attention layer (11, which holds the model-wide best neuron), a sliding-window one (12, the runner-up)
    and the last (17, global): the exact side scores 3 of the 18 layers against the 262k vocabulary."""
    from qrnca_lens.lens import top_neurons
    from qrnca_lens.data.prompts import ProxyConfig, build_prompts

    cfg = gemma3.original_model.config
    assert getattr(cfg, "final_logit_softcapping", None) is None
    layers = [11, 12, n_layers(gemma3) - 1]
    assert [cfg.layer_types[x] for x in layers] == ["full_attention", "sliding_attention", "full_attention"]
    prompt = build_prompts(facts[0], ProxyConfig("cloze", n_prompts=1, n_shots=2), gemma3.tokenizer, pool=facts)[0]
    cache = lens_cache(gemma3, [prompt])
    assert abs(float(cache.model_logp[0]) - _clean_logp(gemma3, prompt)) < 1e-3
    every = top_neurons(gemma3, [prompt], k=10, cfg=LensConfig(mode="topk"))[0]
    top = top_neurons(gemma3, [prompt], k=10, cfg=LensConfig(mode="topk"), layers=layers)[0]
    exact = top_neurons(gemma3, [prompt], k=10, cfg=LensConfig(mode="exact"), layers=layers)[0]
    assert every.certified and top.certified
    assert torch.allclose(top.scores, exact.scores, atol=1e-4)
    assert {tuple(x) for x in top.neurons.tolist()} == {tuple(x) for x in exact.neurons.tolist()}
    assert top.rescored < len(layers) * gemma3.cfg.d_mlp  # the bound pruned: the certificate did the work
    _subset_agrees_with_everywhere(every, top, layers, 1e-4)
