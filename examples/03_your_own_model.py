# %% [markdown]
# # Bring your own TransformerLens model
# Any TL 4.x `TransformerBridge` or TL 3.x `HookedTransformer` works; nothing here is SmolLM2-specific.
# This builds a tiny random bridge so it runs anywhere in seconds (no weights to download). It borrows a
# tokenizer: SmolLM2's, or that of `QRNCA_EXAMPLE_MODEL` (an embedded model or a local checkpoint directory).

# %%
import os

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformer_lens.model_bridge import TransformerBridge

import qrnca_lens as ql
from qrnca_lens.model.hooks import active_hook_count
from qrnca_lens.model.loading import EMBEDDED_MODELS, cache_root

tokenizer_dir = os.environ.get("QRNCA_EXAMPLE_MODEL", "smollm2")   # any local tokenizer directory works
if tokenizer_dir in EMBEDDED_MODELS:
    ql.load_model(tokenizer_dir)                     # only to make sure its tokenizer is in the cache
    tokenizer_dir = cache_root() / tokenizer_dir
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2)
torch.manual_seed(0)
model = TransformerBridge.boot_transformers("my-tiny-llama", hf_model=LlamaForCausalLM(cfg).eval(),
                                            tokenizer=tokenizer)

# %% IG of one prompt, fast path (exact) vs the authors' reference path
pool = ql.load_data("builtin:facts")
prompt = ql.build_prompts(pool[0], ql.ProxyConfig("cloze", n_prompts=1), model.tokenizer, pool=pool)[0]
fast = ql.attribute_prompt(model, prompt, ql.IGConfig(steps=16))
ref = ql.attribute_prompt(model, prompt, ql.IGConfig(steps=16, method="reference"))
print("scores", tuple(fast.shape), "max rel diff", float((fast - ref).abs().max() / ref.abs().max()))

# %% Hooks only enter through one door, and leave even when the body fails
with ql.hooked(model, fwd=[("blocks.0.mlp.hook_pre_linear", ql.capture(store := {}, "f"))]):
    model(torch.tensor([prompt.tokens]))
print(store["f"].shape, "hooks left:", active_hook_count(model))

# %% The same model in bfloat16, as on a GPU: scores come back float32 and agree with float32's to bf16 rounding
half = TransformerBridge.boot_transformers("my-tiny-llama-bf16", hf_model=LlamaForCausalLM(cfg).eval(),
                                           tokenizer=tokenizer)
half.original_model.load_state_dict(model.original_model.state_dict())
half = half.to(torch.bfloat16)
got = ql.attribute_prompt(half, prompt, ql.IGConfig(steps=16))
print("bf16:", got.dtype, "max rel diff to float32", float((got - fast).abs().max() / fast.abs().max()))

# %% Your own hook stays yours: the fast path names it instead of applying it at the wrong positions
with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", lambda act, hook: act)]):
    try:
        ql.attribute_prompt(model, prompt, ql.IGConfig(steps=4))
    except ql.FastPathError as e:
        print("refused:", str(e)[:90], "...")
    steered = ql.attribute_prompt(model, prompt, ql.IGConfig(steps=4, method="auto"))  # the reference path
