"""Builders for tiny random-weight models and a tiny tokenizer, all made in-process (no hub, no files)."""

from __future__ import annotations

import json
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import torch

TINY_KINDS_BRIDGE = ("llama-bridge", "gpt2-bridge", "native-gated", "native-plain-ln")
TINY_KINDS_HT = ("hooked-gated", "hooked-plain-ln")


def has_hooked_transformer() -> bool:
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def _corpus() -> list[str]:
    lines = []
    for name in ("domains", "facts"):
        text = resources.files("qrnca_lens.data").joinpath("builtin").joinpath(f"{name}.jsonl").read_text()
        for row in map(json.loads, text.splitlines()):
            lines.append(" ".join([row["question"], row["answer"], *row.get("options", [])]))
    lines += ["Question: Answer: The correct option is A B C D (A) (B) A) B) Choices: Facts: Q: A:"] * 5
    return lines


def build_tiny_tokenizer(directory: Path, vocab_size: int = 512) -> Any:
    """A byte-level BPE trained on the built-in texts: " A".." D" are single tokens, answers often are not.

    TL reloads tokenizers from ``name_or_path``, so it is saved to ``directory`` and loaded back from there.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<bos>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(_corpus(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tok.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def _widened(hf: Any) -> Any:
    """Random init leaves tiny activations; widen the matrices so gradients and probabilities are not degenerate."""
    with torch.no_grad():
        for _, p in hf.named_parameters():
            if p.ndim == 2:
                p.mul_(3.0)
    return hf.eval()


def _freeze(model: Any) -> Any:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tiny_llama_hf(tokenizer: Any, *, n_layers: int = 3, seed: int = 0) -> Any:
    """A tiny transformers ``LlamaForCausalLM``: RMSNorm, rotary, grouped-query attention, SwiGLU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return _widened(LlamaForCausalLM(cfg))


def tiny_llama_bridge(tokenizer: Any, *, n_layers: int = 3, seed: int = 0) -> Any:
    """``tiny_llama_hf`` wrapped by TL's bridge."""
    from transformer_lens.model_bridge import TransformerBridge

    hf = tiny_llama_hf(tokenizer, n_layers=n_layers, seed=seed)
    return _freeze(TransformerBridge.boot_transformers("tiny-llama", hf_model=hf, tokenizer=tokenizer))


def tiny_gpt2_bridge(tokenizer: Any, *, n_layers: int = 3, seed: int = 0) -> Any:
    """A tiny transformers ``GPT2LMHeadModel`` (plain GELU MLP, LayerNorm, learned positions) in a bridge."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformer_lens.model_bridge import TransformerBridge

    cfg = GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=n_layers, n_head=4, n_inner=48, n_positions=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    hf = _widened(GPT2LMHeadModel(cfg))
    return _freeze(TransformerBridge.boot_transformers("tiny-gpt2", hf_model=hf, tokenizer=tokenizer))


def tiny_gemma3_bridge(tokenizer: Any, *, n_layers: int = 2, seed: int = 0) -> Any:
    """A tiny transformers ``Gemma3ForCausalLM`` in a bridge: its RMSNorms scale by ``1 + w``.

    The norm weights start at zero in transformers (gain 1); they are drawn at random so that the offset shows.
    """
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512, sliding_window=16,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, architectures=["Gemma3ForCausalLM"],
    )
    torch.manual_seed(seed)
    hf = _widened(Gemma3ForCausalLM(cfg))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.normal_(0.0, 0.5)
    return _freeze(TransformerBridge.boot_transformers("tiny-gemma3", hf_model=hf, tokenizer=tokenizer))


def tiny_native_bridge(tokenizer: Any, *, gated: bool = True, norm: str = "RMS", rotary: bool = True,
                       n_layers: int = 3, seed: int = 0) -> Any:
    """TL's own native model in a bridge: gated/plain MLP, RMSNorm/LayerNorm, rotary/learned positions."""
    from transformer_lens.model_bridge import TransformerBridge

    cfg = dict(
        n_layers=n_layers, d_model=32, n_ctx=512, d_head=8, n_heads=4, d_mlp=48, d_vocab=len(tokenizer),
        act_fn="silu" if gated else "gelu", gated_mlp=gated, normalization_type=norm,
        positional_embedding_type="rotary" if rotary else "standard", seed=seed,
    )
    if gated:
        cfg["n_key_value_heads"] = 2
    return _freeze(TransformerBridge.boot_native(cfg, tokenizer=tokenizer))


def tiny_hooked_transformer(tokenizer: Any, *, gated: bool = True, n_layers: int = 3, seed: int = 0,
                            cls: type | None = None) -> Any:
    """A TL 3.x ``HookedTransformer``, or the subclass ``cls`` of it (needs TL < 4)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    kw: dict[str, Any] = dict(
        n_layers=n_layers, d_model=32, n_ctx=512, d_head=8, n_heads=4, d_mlp=48, d_vocab=len(tokenizer),
        act_fn="silu" if gated else "gelu", gated_mlp=gated, seed=seed,
        normalization_type="RMS" if gated else "LN",
        positional_embedding_type="rotary" if gated else "standard",
    )
    if gated:
        kw["n_key_value_heads"] = 2
    with warnings.catch_warnings():
        # TL 3.9 deprecates the class itself; building it is the point here (the TL 3.x support we test).
        warnings.filterwarnings("ignore", r"Hooked\w* is deprecated", DeprecationWarning)
        return _freeze((cls or HookedTransformer)(HookedTransformerConfig(**kw), tokenizer=tokenizer))


def build_tiny(kind: str, tokenizer: Any) -> Any:
    if kind == "llama-bridge":
        return tiny_llama_bridge(tokenizer)
    if kind == "gpt2-bridge":
        return tiny_gpt2_bridge(tokenizer)
    if kind == "native-gated":
        return tiny_native_bridge(tokenizer, gated=True, norm="RMS", rotary=True)
    if kind == "native-plain-ln":
        return tiny_native_bridge(tokenizer, gated=False, norm="LN", rotary=False)
    if kind == "hooked-gated":
        return tiny_hooked_transformer(tokenizer, gated=True)
    if kind == "hooked-plain-ln":
        return tiny_hooked_transformer(tokenizer, gated=False)
    raise ValueError(kind)


def randomise_norms_and_biases(model: Any, seed: int = 1) -> None:
    """Norm weights 1 ± 0.5 and every bias ~ N(0, 0.3), from a private generator (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            last = name.split(".")[-1].lstrip("_")
            if p.ndim == 1 and last in ("weight", "w"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            elif last in ("bias", "b") or last.startswith("b_"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
