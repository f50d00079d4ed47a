"""On a CUDA GPU: the fast path equals the reference path, the bench runs (captum included), and a bfloat16
``locate`` of one query runs end to end. Skipped without a GPU (marker ``cuda``; ``make gpu-check`` runs them).

Everything here runs on ``cuda:0``: a tensor created off the model's device raises a device mismatch, which is
what these tests exist to catch on the first GPU (``test_devices.py`` catches the static part on any machine).
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU (torch.cuda.is_available() is False)"),
]

DEVICE = "cuda:0"


@pytest.fixture(scope="module")
def cuda_llama(tiny_tokenizer):
    """The tiny Llama bridge, float32, on the GPU."""
    from builders import _freeze, tiny_llama_hf
    from transformer_lens.model_bridge import TransformerBridge

    hf = tiny_llama_hf(tiny_tokenizer).to(DEVICE)
    return _freeze(TransformerBridge.boot_transformers("tiny-llama", hf_model=hf, tokenizer=tiny_tokenizer, device=DEVICE))


def _prompts(tok, kind="mcqa-letter", n=2):
    from qrnca_lens.data.queries import load_data
    from qrnca_lens.data.prompts import ProxyConfig, build_prompts

    facts = load_data("builtin:facts")
    return build_prompts(facts[0], ProxyConfig(kind, n_prompts=n, n_shots=1), tok, pool=facts)


def test_the_model_is_on_the_gpu(cuda_llama):
    from qrnca_lens.model.access import model_device

    assert model_device(cuda_llama).type == "cuda"


@pytest.mark.parametrize("kind", ["mcqa-letter", "cloze"])
def test_fast_equals_reference_on_cuda(cuda_llama, tiny_tokenizer, kind):
    from qrnca_lens.qrnca.ig import IGConfig, attribute_prompts

    prompts = _prompts(tiny_tokenizer, kind)
    fast = attribute_prompts(cuda_llama, prompts, IGConfig(steps=6, max_batch_rows=7))
    ref = attribute_prompts(cuda_llama, prompts, IGConfig(steps=6, method="reference"))
    assert fast.device.type == "cpu" and ref.device.type == "cpu"  # results come back to the host
    assert ref.abs().max() > 0
    # TF32 matmuls (if a user enabled them) would loosen this; the default float32 GPU path is ~1e-6.
    assert (fast - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_bench_runs_on_cuda(cuda_llama):
    from qrnca_lens.bench.ig import run_bench

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # captum's own deprecations are not ours
        res = run_bench(cuda_llama, steps=4, reference_layers=2, repeats=1, name="tiny-llama-cuda")
    assert res["max_rel_diff"] < 1e-3
    assert res["captum_s"] is None or res["captum_s"] > 0  # captum's comparison ran on the model's device
    assert res["max_abs_logprob_diff"] < 1e-3 and res["eval_same_predictions"]


def test_bf16_locate_of_one_query_on_cuda():
    """The researchers' setting: SmolLM2 in bfloat16 on the GPU, one query end to end."""
    import qrnca_lens as ql
    from qrnca_lens.qrnca.ig import IGConfig
    from qrnca_lens.qrnca.locate import LocateConfig
    from qrnca_lens.model.access import d_mlp, model_device, model_dtype, n_layers
    from qrnca_lens.data.prompts import ProxyConfig

    model = ql.load_model("smollm2", device=DEVICE, dtype=torch.bfloat16)
    assert model_device(model).type == "cuda" and model_dtype(model) == torch.bfloat16
    pool = ql.load_data("builtin:facts")
    cfg = LocateConfig(proxy=ProxyConfig("cloze", n_prompts=3), ig=IGConfig(steps=8))
    res = ql.locate(model, pool[:1], cfg, pool=pool, progress=False)
    assert res is not None
    scores = res.scores[pool[0].id]
    assert scores.shape == (3, n_layers(model), d_mlp(model))
    assert torch.isfinite(scores).all() and (scores != 0).any()
