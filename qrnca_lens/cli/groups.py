"""The option groups several commands share, and the configs, data and executor built from them.

The options that mirror a config field are declared once here (``PROXY``, ``IG``, ``SELECTION``, ``EVAL``,
``BENCH``) and generated from the dataclasses (``args.py``); the rest (paths, the model name, the executor)
are plain argparse options.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..data.grouping import GroupingConfig
from ..data.prompts import ProxyConfig
from ..errors import QrncaError
from ..evaluation.judge import EvalConfig
from ..lens.config import LensRunConfig
from ..qrnca.ig import IGConfig
from ..qrnca.selection import SelectionConfig
from .args import add_options, build, options

__all__ = ["PROXY", "IG", "SELECTION", "EVAL", "BENCH", "LENS", "GROUPING", "add_proxy_args", "add_selection_args",
           "add_executor_args", "add_numerics_args", "proxy_config", "ig_config", "selection_config", "eval_config",
           "grouping_config", "queries_and_pool", "executor", "load_kwargs", "run_load_kwargs", "DTYPE_CHOICES"]

DTYPE_CHOICES = ("float32", "bfloat16", "float16")  # models.DTYPES' names (kept here so --help imports no torch)

PROXY = options(ProxyConfig, ["kind", "n_prompts", "n_shots", "seed", "prepend_bos", "chat_template"],
                kind="--proxy", n_prompts="--templates", n_shots="--shots", prepend_bos="--bos",
                chat_template="--chat")
# locate's --method names the locator; the IG path is --ig-method.
IG = options(IGConfig, ["steps", "alpha_schedule", "method", "max_batch_rows", "memory_budget_mb"], method="--ig-method")
SELECTION = options(SelectionConfig, ["t", "u", "v", "cluster_mode", "use_ica", "remove_common"],
                    use_ica="--no-ica", remove_common="--keep-common")
EVAL = options(EvalConfig, ["methods", "seed", "every_position", "n_boot", "batch_size", "group_by", "ground_truth",
                           "ground_truth_k", "ground_truth_queries", "symbol_binding"], n_boot="--bootstrap",
               symbol_binding="--no-symbol-binding")
BENCH = options(IGConfig, ["steps", "max_batch_rows", "memory_budget_mb"])
LENS = options(LensRunConfig, ["top_k", "mode", "compare_prompts", "compare_k"], top_k="--top", mode="--lens-mode")
GROUPING = options(GroupingConfig, ["group_by"])  # locate and report; evaluate's is EvalConfig.group_by


def add_proxy_args(p: argparse.ArgumentParser) -> None:
    """The model, the data and how queries become prompts (accuracy, locate, lens)."""
    p.add_argument("--model", default="smollm2", help="an embedded model name (smollm2, gemma3-270m)")
    p.add_argument("--data", required=True, help="a path (.jsonl, .csv, .json) or builtin:domains / builtin:facts / builtin:languages")
    add_options(p, PROXY[:1])
    p.add_argument("--limit", type=int, default=None, help="keep the first N queries of every group")
    p.add_argument("--pool", default=None,
                   help="take in-context examples and distractors from this set instead of --data (same syntax: "
                        "a path or builtin:NAME); for a small --data file")
    add_options(p, PROXY[1:])


def add_selection_args(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """t, u, v and the rest; ``defaults=False`` (reduce): an option left out keeps the run's recorded value."""
    add_options(p, SELECTION, defaults=defaults)


def add_executor_args(p: argparse.ArgumentParser) -> None:
    """Where the per-query work runs (locate, evaluate): serial, or a Ray cluster."""
    g = p.add_argument_group("scale-out", "run the per-query work on a Ray cluster (pip install 'qrnca-lens[ray]'; "
                                          "see docs/ray.md)")
    g.add_argument("--executor", choices=["serial", "ray"], default="serial", help="where the per-query work runs")
    g.add_argument("--address", default=None,
                   help="Ray cluster (HEAD:6379, auto); default: $RAY_ADDRESS, else the `ray start` cluster of this "
                        "machine, else a new local one")
    g.add_argument("--workers", type=int, default=2, help="Ray actors, each holding one model replica")
    g.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs reserved per actor (the model goes on cuda)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads per actor, also the CPUs it reserves (default: this process's count, which "
                        "keeps results bit-identical to a serial run; 1 CPU reserved)")


def add_numerics_args(p: argparse.ArgumentParser, *, run: bool = False, allow: bool | None = None) -> None:
    """``--dtype`` and ``--device`` for a command that loads a model; ``--allow-dtype-change`` where it meets a run.

    Args:
        p: the command's parser.
        run: the command works on an existing run (evaluate, report, exhaustive): ``--dtype`` defaults to the
            dtype the run recorded.
        allow: add ``--allow-dtype-change`` (default: ``run``); locate and demo, which may resume a run, too.
    """
    g = p.add_argument_group("numerics", "how the model's weights are held (recorded in the run)")
    g.add_argument("--dtype", choices=list(DTYPE_CHOICES), default=None,
                   help=("the weights' dtype (default: the one the run recorded; float32 for a run that records "
                         "none)") if run else
                        "the weights' dtype (default: float32, or the recorded one when --out holds a run to resume)")
    g.add_argument("--device", default=None,
                   help="where the weights go: cpu, cuda, cuda:1, mps... (default: TransformerLens's choice); "
                        "recorded, never checked: a run made on cuda resumes and evaluates on cpu")
    if run if allow is None else allow:
        g.add_argument("--allow-dtype-change", action="store_true",
                       help="use a model of another dtype than the run recorded (refused without it); the change "
                            "is recorded")


def load_kwargs(args: argparse.Namespace, dtype: str | None = None) -> dict[str, Any]:
    """``load_model`` keywords from ``--dtype``/``--device`` (``dtype``: the default when --dtype is not given)."""
    return {"dtype": getattr(args, "dtype", None) or dtype or "float32", "device": getattr(args, "device", None)}


def run_load_kwargs(args: argparse.Namespace, where: Any, recorded: str | None, *, note: bool = True) -> dict[str, Any]:
    """``load_model`` keywords for a command on an existing run: the run's dtype unless ``--dtype`` says otherwise.

    Another dtype than the recorded one is refused in one line (``store.check_run_dtype``) before any model is
    loaded, unless ``--allow-dtype-change``. A run that records none loads in ``--dtype`` or float32; ``note``
    prints a line saying its dtype is unknown (evaluate leaves that to ``evaluate``'s own warning).
    """
    from ..qrnca.store import check_run_dtype

    asked = getattr(args, "dtype", None)
    if recorded is None:
        if note:
            print(f"[qrnca-lens] {where} does not record its dtype (made before qrnca-lens recorded it): treated "
                  f"as unknown; loading the model in {asked or 'float32'}")
    elif asked is not None:
        check_run_dtype(where, recorded, asked, bool(getattr(args, "allow_dtype_change", False)))
    return load_kwargs(args, recorded)


def proxy_config(args: argparse.Namespace) -> ProxyConfig:
    """``ProxyConfig`` from ``--proxy --templates --shots --seed --bos --chat``."""
    return build(ProxyConfig, args, PROXY)


def ig_config(args: argparse.Namespace) -> IGConfig:
    """``IGConfig`` from ``--steps --alpha-schedule --method --max-batch-rows --memory-budget-mb``."""
    return build(IGConfig, args, IG)


def selection_config(args: argparse.Namespace, base: SelectionConfig | None = None) -> SelectionConfig:
    """The selection the options ask for, on top of ``base`` (reduce: the run's recorded one)."""
    return build(SelectionConfig, args, SELECTION, base)


def eval_config(args: argparse.Namespace) -> EvalConfig:
    """``EvalConfig`` from ``--methods --seed --every-position --bootstrap --batch-size --group-by --budget``."""
    cfg = build(EvalConfig, args, EVAL)
    budget = getattr(args, "budget", None)
    if budget is None:
        return cfg
    text = str(budget).strip()
    return dataclasses.replace(cfg, budget=int(text) if text.lstrip("-").isdigit() else text)


def grouping_config(args: argparse.Namespace) -> GroupingConfig:
    """``GroupingConfig`` from ``--group-by`` (an args object without it: the defaults)."""
    return build(GroupingConfig, args, GROUPING) if hasattr(args, "group_by") else GroupingConfig()


def queries_and_pool(args: argparse.Namespace) -> tuple[list[Any], list[Any]]:
    """The queries (--data, --limit per group) and where their examples and distractors come from."""
    from ..data.queries import limit_per_group, load_data

    data = load_data(args.data)
    pool = load_data(args.pool) if args.pool else data
    return limit_per_group(data, args.limit), pool


def executor(args: argparse.Namespace, model_name: str, dtype: str = "float32") -> Any:
    """None (serial, on the driver's model) or a RayExecutor whose replicas load in ``dtype``; the caller shuts it down."""
    if args.executor != "ray":
        if args.address is not None or args.gpus_per_worker or args.threads is not None:
            raise QrncaError("--address, --gpus-per-worker and --threads only apply with --executor ray")
        return None
    from ..qrnca.executors import RayExecutor

    return RayExecutor(model_name, address=args.address, workers=args.workers,
                       gpus_per_worker=args.gpus_per_worker, threads=args.threads, dtype=dtype)
