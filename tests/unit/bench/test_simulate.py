"""Scale by simulation: the planner's whole-query prediction, and (slow) a Llama-3.2-1B-shaped locate on CPU."""

from __future__ import annotations

import pytest
import torch

from qrnca_lens.engine.plan import Dims, model_bytes, plan_query, weight_bytes
from qrnca_lens.bench.simulate import SHAPES


def _is_bias(name):
    last = name.rsplit(".", 1)[-1]
    return last == "bias" or last.startswith("b_")


def test_weight_bytes_are_the_models_parameters(tiny_llama):
    """The planner counts a bias-free Llama: what the model holds beyond it is its biases, and only them (TL 3's
    bridge adds an unembedding bias, ``lm_head.bias``, d_vocab floats that TL 4's does not)."""
    params = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in tiny_llama.parameters()}
    biases = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
              for name, p in tiny_llama.named_parameters() if _is_bias(name)}
    assert weight_bytes(Dims.of(tiny_llama), tied=False) + sum(biases.values()) == sum(params.values())
    # at most an unembedding bias: the planner counts every other parameter
    assert sum(biases.values()) <= tiny_llama.cfg.d_vocab * Dims.of(tiny_llama).act_bytes
    assert model_bytes(tiny_llama) >= sum(params.values())


def test_llama_shapes_have_their_published_sizes():
    # Llama-3.2-1B: 1.24 B parameters (tied); Llama-3.1-8B: 8.03 B (untied)
    assert weight_bytes(SHAPES["llama-3.2-1b"].dims(), tied=True) / 2 == pytest.approx(1.236e9, rel=0.01)
    assert weight_bytes(SHAPES["llama-3.1-8b"].dims(), tied=False) / 2 == pytest.approx(8.03e9, rel=0.01)


def test_plan_query_follows_the_budget():
    d = SHAPES["llama-3.1-8b"].dims(torch.bfloat16)
    small = plan_query(d, [100, 100, 100], 1, 16, d.n_layers, 2**30, tied=False)
    big = plan_query(d, [100, 100, 100], 1, 16, d.n_layers, 16 * 2**30, tied=False)
    assert small.working <= 2**30 and big.working <= 16 * 2**30
    assert small.rows_per_chunk[0] < big.rows_per_chunk[0] <= 240
    assert small.peak == small.weights + small.working


@pytest.mark.scale  # ~2.5 GB of bf16 weights built and run on the CPU in a child process: 10-30 minutes
def test_llama_1b_shaped_locate_stays_within_25_percent_of_the_plan():
    from qrnca_lens.bench.simulate import simulate

    r = simulate("llama-3.2-1b", steps=4, prompts=2, threads=torch.get_num_threads())
    assert r["scores_nonzero"] > 0
    assert 0.75 <= r["ratio"] <= 1.25, r
