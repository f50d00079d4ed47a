"""Reading any TransformerLens model the same way: sizes, hook names, weights, submodules, tokenizer, padding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import ModelError
from ..protocols import HookedModel

__all__ = ["default_prepend_bos", "model_name", "n_layers", "d_mlp", "is_gated", "mlp_hook_name", "post_hook_name", "model_device", "model_dtype", "DTYPES", "dtype_name", "parse_dtype", "W_out", "W_out_all", "W_U", "final_norm", "unembed", "blocks", "block", "hf_model", "tokenizer_of", "pad_token_id", "pad_batch", "model_numerics"]


_NATIVE_BOS_ATTR = "_qrnca_native_prepend_bos"


def _set_native_bos(model: HookedModel, value: bool) -> None:
    object.__setattr__(model, _NATIVE_BOS_ATTR, value)


def default_prepend_bos(model: HookedModel) -> bool:
    """Whether prompts get a BOS token by default.

    For models from ``load_model``, what the model's own HF tokenizer does (SmolLM2: no BOS; TL's bridge
    would prepend ``<|im_start|>``). For other models, TL's ``cfg.default_prepend_bos``.
    """
    native = getattr(model, _NATIVE_BOS_ATTR, None)
    if native is not None:
        return bool(native)
    return bool(getattr(model.cfg, "default_prepend_bos", True))


def model_name(model: HookedModel) -> str:
    return str(getattr(model.cfg, "model_name", None) or type(model).__name__)


def n_layers(model: HookedModel) -> int:
    return int(model.cfg.n_layers)


def d_mlp(model: HookedModel) -> int:
    value = getattr(model.cfg, "d_mlp", None)
    if not value:
        raise ModelError(f"{model_name(model)} has no MLP (cfg.d_mlp is {value!r}); QRNCA attributes FFN neurons")
    return int(value)


def _hook_dict(model: HookedModel) -> dict[str, Any]:
    return model.hook_dict


def is_gated(model: HookedModel) -> bool:
    """True when the MLP has a linear (up) branch hook, ``blocks.0.mlp.hook_pre_linear``."""
    return "blocks.0.mlp.hook_pre_linear" in _hook_dict(model)


def mlp_hook_name(model: HookedModel, layer: int, *, require_gated: bool = False) -> str:
    """The hook QRNCA attributes and intervenes on: the linear branch of a gated MLP, else ``hook_pre``."""
    hooks = _hook_dict(model)
    gated = f"blocks.{layer}.mlp.hook_pre_linear"
    if gated in hooks:
        return gated
    if require_gated:
        raise ModelError(
            f"{model_name(model)} has no gated MLP ({gated!r} is missing); this method needs the linear "
            "branch of a GLU. Use a gated model (Llama, Gemma, Mistral...) or allow the plain-MLP hook_pre"
        )
    plain = f"blocks.{layer}.mlp.hook_pre"
    if plain in hooks:
        return plain
    raise ModelError(
        f"{model_name(model)} exposes neither {gated!r} nor {plain!r}: it has no MLP hook to attribute "
        "(attention-only model?)"
    )


def post_hook_name(model: HookedModel, layer: int) -> str:
    name = f"blocks.{layer}.mlp.hook_post"
    if name not in _hook_dict(model):
        raise ModelError(f"{model_name(model)} has no {name!r} hook")
    return name


def model_device(model: HookedModel) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model: HookedModel) -> torch.dtype:
    return next(model.parameters()).dtype


# The weight dtypes a run can be made in, by the name the CLI (``--dtype``) and the run manifest use.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: how a run records its dtype.

    Example:
        >>> dtype_name(torch.bfloat16)
        'bfloat16'
    """
    return str(dtype).removeprefix("torch.")


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A ``torch.dtype``, or one of ``DTYPES``' names (``"torch.float16"`` too), as a ``torch.dtype``.

    Example:
        >>> parse_dtype("bfloat16"), parse_dtype(torch.float16)
        (torch.bfloat16, torch.float16)
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def W_out(model: HookedModel, layer: int) -> Float[Tensor, "d_mlp d_model"]:
    """Output weights of layer ``layer``'s MLP, neuron-major (TL convention)."""
    return cast(Any, model).W_out[layer]


def W_out_all(model: HookedModel) -> Float[Tensor, "layer d_mlp d_model"]:
    """Every layer's MLP output weights, stacked (TL's ``model.W_out``; a copy on a bridge)."""
    return cast(Any, model).W_out


def W_U(model: HookedModel) -> Float[Tensor, "d_model d_vocab"]:
    return cast(Any, model).W_U


def final_norm(model: HookedModel) -> Any:
    """The final norm module (``ln_final``), or None for a model without one."""
    return getattr(model, "ln_final", None)


def unembed(model: HookedModel) -> Any:
    """The unembedding module (``unembed``)."""
    return cast(Any, model).unembed


def blocks(model: HookedModel) -> Any:
    """All blocks (``model.blocks``), in layer order."""
    return cast(Any, model).blocks


def block(model: HookedModel, layer: int) -> Any:
    """Block ``layer`` (``blocks[layer]``): its ``ln1``, ``ln2``, ``attn``, ``mlp`` submodules."""
    return cast(Any, model).blocks[layer]


def hf_model(model: HookedModel) -> Any:
    """The transformers model behind a ``TransformerBridge`` (``original_model``)."""
    return cast(Any, model).original_model


def tokenizer_of(model: HookedModel) -> Any:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ModelError(f"{model_name(model)} has no tokenizer; pass one when you build the model")
    return tok


def pad_token_id(model: HookedModel) -> int:
    """The id to pad a batch with: the tokenizer's pad token, else its EOS, else 0.

    Any id works for right padding (no real position attends to a later one); a real special token keeps
    the padded batch readable.
    """
    tok = tokenizer_of(model)
    for cand in (tok.pad_token_id, tok.eos_token_id, 0):
        if cand is not None:
            return int(cand)
    return 0


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str) -> Int[Tensor, "batch seq"]:
    """Right-pad token lists into one ``[batch, longest]`` long tensor on ``device``.

    Right padding leaves every real position of a causal model exact: the one padding helper of the
    package (scoring, greedy decoding, the row engine's prefix and full-sequence passes, report views).

    Args:
        seqs: token id lists, at least one.
        pad_id: the id written after each shorter list (``pad_token_id(model)``, or any real token).
        device: where the batch goes.

    Returns:
        The padded batch.

    Example:
        >>> pad_batch([[5, 6, 7], [8]], 0, "cpu").tolist()
        [[5, 6, 7], [8, 0, 0]]
    """
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    return out.to(device)


def model_numerics(model: HookedModel) -> dict[str, str]:
    """``{"dtype": "bfloat16", "device": "cuda:0"}``: how the model's weights are held, as a run records it."""
    return {"dtype": dtype_name(model_dtype(model)), "device": str(model_device(model))}
