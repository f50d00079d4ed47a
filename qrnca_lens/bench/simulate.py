"""Scale by simulation: a random-weight model with a real model's shapes, built in-process (no download).

``simulate("llama-3.2-1b")`` runs ``locate`` of one query on a random-weight ``LlamaForCausalLM`` with
Llama-3.2-1B's shapes (in a TransformerBridge, bfloat16, on the CPU by default) in a child process, and
compares the child's peak RSS (its own ``ru_maxrss``: the caller's memory does not count) with what the
memory planner predicts for that query (``plan.plan_query``: weights + the largest pass) plus the child's
own runtime before the model existed (Python, torch, tokenizer). The tokenizer is a small byte-level BPE
trained on the built-in texts: prompts are real built-in queries, the model's 128k vocabulary is only
partly used, which changes no shape the planner sees.

Run from a shell: ``python -m qrnca_lens.bench.simulate llama-3.2-1b --steps 4 --prompts 2``; the last line
printed is one JSON object (``peak_rss_mb``, ``predicted_mb``, ``ratio``, ``seconds``, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["SHAPES", "Shape", "simulated_model", "simulation_tokenizer", "simulate"]


@dataclass(frozen=True)
class Shape:
    """A Llama-family model's shapes (what the planner and the memory depend on; the weights are random)."""

    d_model: int
    n_layers: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_vocab: int
    tied: bool
    rope_theta: float = 500000.0

    def dims(self, dtype: torch.dtype = torch.bfloat16) -> Any:
        from ..engine.plan import Dims

        return Dims(self.n_layers, self.n_heads, self.n_kv_heads, self.d_head, self.d_model, self.d_mlp, self.d_vocab,
                    dtype.itemsize)


SHAPES = {
    "llama-3.2-1b": Shape(2048, 16, 8192, 32, 8, 64, 128256, tied=True),
    "llama-3.1-8b": Shape(4096, 32, 14336, 32, 8, 128, 128256, tied=False),
}


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def simulation_tokenizer(directory: str | Path, vocab_size: int = 512) -> Any:
    """A byte-level BPE trained on the built-in texts (saved to ``directory``: TL reloads tokenizers by path)."""
    from importlib import resources

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    lines = []
    for name in ("domains", "facts"):
        text = resources.files("qrnca_lens.data").joinpath("builtin").joinpath(f"{name}.jsonl").read_text()
        for row in map(json.loads, text.splitlines()):
            lines.append(" ".join([row["question"], row["answer"], *row.get("options", [])]))
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>", "<pad>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tok.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def simulated_model(name: str, tokenizer: Any, *, dtype: torch.dtype = torch.bfloat16,
                    device: str | torch.device | None = None, seed: int = 0) -> Any:
    """A random-weight ``LlamaForCausalLM`` with ``SHAPES[name]``, created directly in ``dtype``, in a bridge."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPES[name]
    # rope_theta / rope_scaling: transformers 4.x's keywords; 5.x folds them into rope_parameters itself
    kw: dict[str, Any] = dict(
        vocab_size=s.d_vocab, hidden_size=s.d_model, intermediate_size=s.d_mlp, num_hidden_layers=s.n_layers,
        num_attention_heads=s.n_heads, num_key_value_heads=s.n_kv_heads, head_dim=s.d_head,
        max_position_embeddings=131072, rope_theta=s.rope_theta, tie_word_embeddings=s.tied,
        rope_scaling={"rope_type": "llama3", "factor": 32.0 if s.tied else 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    cfg = LlamaConfig(**kw)
    torch.manual_seed(seed)
    hf = LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()  # parameters born in dtype: no float32 copy
    kwargs: dict[str, Any] = {"hf_model": hf, "tokenizer": tokenizer, "dtype": dtype}
    if device is not None:
        kwargs["device"] = device
    model = TransformerBridge.boot_transformers(f"simulated-{name}", **kwargs)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _child(args: dict[str, Any]) -> dict[str, Any]:
    """The measured process: build, plan, locate one query, report."""
    import qrnca_lens as ql

    from ..data.prompts import ProxyConfig, build_all_prompts
    from ..engine.plan import Dims, model_bytes, plan_query, weight_bytes
    from ..model.access import default_prepend_bos
    from ..qrnca.ig import IGConfig
    from ..qrnca.locate import LocateConfig, locate

    torch.set_num_threads(args["threads"])
    dtype = getattr(torch, args["dtype"])
    rss_runtime = _rss_now_mb()
    with tempfile.TemporaryDirectory() as tmp:
        tok = simulation_tokenizer(tmp)
        t0 = time.perf_counter()
        model = simulated_model(args["name"], tok, dtype=dtype, device=args["device"])
        build_s = time.perf_counter() - t0
    rss_loaded, peak_loaded = _rss_now_mb(), _peak_mb()
    pool = ql.load_data("builtin:facts")
    proxy = ProxyConfig("cloze", n_prompts=args["prompts"], n_shots=args["shots"], prepend_bos=default_prepend_bos(model))
    ig = IGConfig(steps=args["steps"], memory_budget_mb=args["budget_mb"])
    query = pool[:1]
    prompts = build_all_prompts(query, proxy, tok, pool=pool)[query[0].id]
    d = Dims.of(model)
    shape = SHAPES[args["name"]]
    plan = plan_query(d, [len(p.tokens) for p in prompts], len(prompts[0].target), ig.steps, d.n_layers,
                      ig.memory_budget_mb * 2**20, ig.max_batch_rows)
    t0 = time.perf_counter()
    res = locate(model, query, LocateConfig(proxy=proxy, ig=ig), pool=pool, progress=False)
    locate_s = time.perf_counter() - t0
    assert res is not None
    scores = res.scores[query[0].id]
    return {
        "model": args["name"], "dtype": args["dtype"], "device": str(args["device"] or "cpu"), "steps": ig.steps,
        "prompt_tokens": [len(p.tokens) for p in prompts], "target_tokens": len(prompts[0].target),
        "threads": args["threads"], "memory_budget_mb": ig.memory_budget_mb,
        "rss_runtime_mb": rss_runtime, "rss_loaded_mb": rss_loaded, "peak_loaded_mb": peak_loaded,
        "peak_rss_mb": _peak_mb(), "build_s": build_s, "locate_s": locate_s,
        "model_bytes_mb": model_bytes(model) / 2**20,
        "planned_weights_mb": weight_bytes(d, tied=shape.tied) / 2**20,
        "plan": plan.to_dict(),
        "scores_nonzero": int((scores != 0).sum()), "scores_shape": list(scores.shape),
    }


def simulate(name: str = "llama-3.2-1b", *, steps: int = 4, prompts: int = 2, shots: int = 2,
             dtype: str = "bfloat16", device: str | None = None, budget_mb: int | None = None,
             threads: int | None = None, timeout: float = 3600.0) -> dict[str, Any]:
    """``locate`` of one query on a random-weight model of ``SHAPES[name]`` in a child process: its peak RSS
    against the planner's prediction (+ the child's runtime RSS before the model was built).

    ``ratio`` = peak RSS / predicted; the planner is honest when it is within 1 ± 0.25.
    """
    from ..qrnca.ig import IGConfig

    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    args = {"name": name, "steps": steps, "prompts": prompts, "shots": shots, "dtype": dtype, "device": device,
            "budget_mb": IGConfig().memory_budget_mb if budget_mb is None else budget_mb,
            "threads": threads or torch.get_num_threads()}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "qrnca_lens.bench.simulate", "--child", json.dumps(args)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the simulation's child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    predicted = out["rss_runtime_mb"] + out["plan"]["weights_mb"] + out["plan"]["working_mb"]
    out["predicted_mb"] = predicted
    out["ratio"] = out["peak_rss_mb"] / predicted
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m qrnca_lens.bench.simulate", description=__doc__.splitlines()[0])
    ap.add_argument("name", nargs="?", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--shots", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--memory-budget-mb", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child is not None:
        print(json.dumps(_child(json.loads(a.child))))
        return
    r = simulate(a.name, steps=a.steps, prompts=a.prompts, shots=a.shots, dtype=a.dtype, device=a.device,
                 budget_mb=a.memory_budget_mb, threads=a.threads)
    p = r["plan"]
    print(f"simulated {r['model']} ({r['dtype']}, {r['device']}): locate of one query, {len(r['prompt_tokens'])} prompts "
          f"of {r['prompt_tokens']} tokens, m = {r['steps']}: {r['locate_s']:.1f} s (model built in {r['build_s']:.1f} s)")
    print(f"peak RSS {r['peak_rss_mb']:.0f} MB; predicted {r['predicted_mb']:.0f} MB = runtime {r['rss_runtime_mb']:.0f} "
          f"+ weights {p['weights_mb']:.0f} + largest pass {p['working_mb']:.0f} (planner); ratio {r['ratio']:.3f}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()


def gpu_estimates(gpus_gb: tuple[int, ...] = (24, 80), *, prompt_tokens: tuple[int, ...] = (100, 2000), n_prompts: int = 3,
                  steps: int = 16, max_rows: tuple[int, ...] = (240, 1024), reserve_gb: float = 1.5,
                  dtype: torch.dtype = torch.bfloat16) -> list[dict[str, Any]]:
    """The planner's plan of one query on each shape of ``SHAPES`` on GPUs of ``gpus_gb`` (estimates, no GPU
    needed): the budget is what the GPU holds after the weights and ``reserve_gb`` (CUDA context, allocator
    slack); rows per chunk at each ``max_batch_rows`` cap, prompts per pass, and the planned peak."""
    from ..engine.plan import plan_query, weight_bytes

    out = []
    for name, s in SHAPES.items():
        d = s.dims(dtype)
        weights = weight_bytes(d, tied=s.tied)
        for gb in gpus_gb:
            budget = int(gb * 1e9 - weights - reserve_gb * 2**30)
            for n in prompt_tokens:
                for cap in max_rows:
                    row: dict[str, Any] = {"model": name, "gpu_gb": gb, "prompt_tokens": n, "max_batch_rows": cap,
                                           "weights_gb": weights / 1e9, "budget_mb": budget // 2**20}
                    if budget <= 0:
                        row.update(fits=False)
                    else:
                        p = plan_query(d, [n] * n_prompts, 1, steps, d.n_layers, budget, cap, tied=s.tied)
                        row.update(fits=True, prompts_per_pass=max(len(g) for g in p.passes),
                                   rows_per_chunk=min(p.rows_per_chunk),
                                   chunks=sum(-(-len(g) * d.n_layers * steps // r) for g, r in zip(p.passes, p.rows_per_chunk)),
                                   working_gb=p.working / 1e9, peak_gb=(p.peak + reserve_gb * 2**30) / 1e9)
                    out.append(row)
    return out
