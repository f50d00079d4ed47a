"""The command handlers: each takes the parsed arguments, calls the Python API, prints, returns the exit code.

Heavy modules load inside the handlers, so a command pays only for what it uses.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..errors import QrncaError
from .groups import (
    eval_config,
    executor,
    grouping_config,
    ig_config,
    load_kwargs,
    proxy_config,
    queries_and_pool,
    run_load_kwargs,
    selection_config,
)

__all__ = ["cmd_accuracy", "cmd_locate", "cmd_reduce", "cmd_evaluate", "cmd_report", "cmd_bench", "shard",
           "print_summary", "evaluation_doc"]


def shard(spec: str | None) -> tuple[int, int]:
    """``--shard I/N`` as ``(I, N)``; a bad value names the option.

    Example:
        >>> shard("1/4")
        (1, 4)
    """
    from ..locate import parse_shard

    try:
        return parse_shard(spec)
    except QrncaError as e:
        raise QrncaError(f"--shard: {e}") from None


def print_summary(res: Any, path: Any) -> None:
    """One line about a run's QR neurons and the model's accuracy, then where neurons.json went."""
    s = res.neurons_json()["summary"]
    acc = f"{s['accuracy']:.2f}" if s["accuracy"] is not None else "-"
    p = f"{s['mean_target_prob']:.3f}" if s["mean_target_prob"] is not None else "-"
    print(f"{s['n_queries']} queries: {s['mean_qr_neurons']:.1f} QR neurons per query on average, "
          f"{s['n_common_neurons']} common neurons; the model answered {acc} of the prompts (mean target p {p})")
    print(f"wrote {path}")


def evaluation_doc(res: Any, run: Any) -> dict[str, Any]:
    """evaluation.json, recording which selection's neurons it judged (a later reduce warns when it differs)."""
    doc = res.to_dict()
    doc["meta"] = {**doc.get("meta", {}), "selection": run.config.selection.to_dict()}
    return doc


def cmd_accuracy(args: argparse.Namespace) -> int:
    """``qrnca-lens accuracy``: the model's accuracy and mean target probability on a proxy."""
    from .. import models
    from ..scoring import accuracy

    cfg = proxy_config(args)
    queries, pool = queries_and_pool(args)
    model = models.load_model(args.model, verbose=not args.json, **load_kwargs(args))
    res = accuracy(model, queries, cfg, pool=pool, progress=not args.json)
    print(res)
    if args.json:
        print(json.dumps({"accuracy": res.accuracy, "mean_target_prob": res.mean_target_prob, "n": res.n,
                          "n_queries": res.n_queries, "chance": res.chance, "proxy": args.proxy,
                          "data": args.data, "model": args.model, "per_group": res.per_group}))
    return 0


def cmd_locate(args: argparse.Namespace) -> int:
    """``qrnca-lens locate``: attribute every query into ``--out`` (resumable), then select the QR neurons."""
    from .. import models
    from ..locate import LocateConfig, locate

    where = shard(args.shard)
    cfg = LocateConfig(proxy=proxy_config(args), ig=ig_config(args), selection=selection_config(args))
    queries, pool = queries_and_pool(args)
    kw = _resume_load_kwargs(args)
    model = models.load_model(args.model, verbose=not args.quiet, **kw)
    ex = executor(args, args.model, kw["dtype"])
    try:
        res = locate(model, queries, cfg, pool=pool, out=args.out, shard=where, progress=not args.quiet,
                     name=args.model, data=args.data, executor=ex, pool_spec=args.pool or args.data,
                     group_by=grouping_config(args).group_by, allow_dtype_change=args.allow_dtype_change)
    finally:
        if ex is not None:
            ex.shutdown()
    if res is not None:
        print_summary(res, Path(args.out) / "neurons.json")
    return 0


def _resume_load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """locate's ``load_model`` keywords: a run to resume in ``--out`` gives the default dtype (and a refusal early,
    before the model loads, if ``--dtype`` names another without ``--allow-dtype-change``)."""
    from ..errors import StoreError
    from ..store import RunStore

    if not (Path(args.out) / "manifest.json").exists():
        return load_kwargs(args)
    try:
        recorded = RunStore.load(args.out).dtype
    except StoreError:  # not a run of ours, or corrupt: locate's own check says so with the fix
        return load_kwargs(args)
    if recorded is not None and args.dtype is None and recorded != "float32" and not args.quiet:
        print(f"[qrnca-lens] resuming {args.out} in the dtype it records, {recorded}")
    # An old run (no dtype recorded) is left to RunStore.open, which says its dtype is unknown.
    return run_load_kwargs(args, args.out, recorded, note=False)


def cmd_reduce(args: argparse.Namespace) -> int:
    """``qrnca-lens reduce``: reselect from the stored scores; options left out keep the recorded selection."""
    from ..locate import reduce
    from ..selection import SelectionConfig
    from ..store import RunStore

    t0 = time.perf_counter()
    base = SelectionConfig.from_dict(RunStore.load(args.out).manifest["selection"])
    res = reduce(args.out, selection_config(args, base))
    print_summary(res, Path(args.out) / "neurons.json")
    print(f"reduce took {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``qrnca-lens evaluate``: judge every locator's neurons on the run's stored prompts; write evaluation.json."""
    from .. import models
    from ..evaluation import evaluate
    from ..locate import reduce
    from ..store import write_json_atomic

    run = reduce(args.out, write=False)
    # The run's stored prompts and queries, not its data file: editing or deleting that file after
    # locate changes nothing here.
    queries = run.stored_queries()
    kw = run_load_kwargs(args, args.out, run.dtype, note=False)  # evaluate itself says when the dtype is unknown
    model = models.load_model(run.model, verbose=not args.quiet, **kw)
    _say_device(args, run.device, str(models.model_device(model)))
    cfg = eval_config(args)
    t0 = time.perf_counter()
    ex = executor(args, run.model, kw["dtype"])
    try:
        res = evaluate(model, run, queries, cfg=cfg, progress=not args.quiet, executor=ex,
                       allow_dtype_change=args.allow_dtype_change)
    finally:
        if ex is not None:
            ex.shutdown()
    path = Path(args.out) / "evaluation.json"
    write_json_atomic(path, evaluation_doc(res, run))
    print(f"\n{run.model} ({res.meta['dtype']}, {res.meta['device']}) on {run.data} ({run.config.proxy.kind}), "
          f"{len(queries)} queries; model accuracy on the "
          f"prompts {res.meta['model_accuracy']:.2f}, mean target p {res.meta['mean_target_prob']:.3f}")
    print(res.table())
    ff = res.free_form
    if ff:
        print(f"free-form (QR neurons ablated at every position): log-likelihood drop {ff['qrnca']['loglik_drop']:.3f} "
              f"vs random {ff['random']['loglik_drop']:.3f} (ratio {ff['drop_ratio'] or float('nan'):.1f}); greedy exact "
              f"match {ff['exact_match_before']:.2f} -> {ff['qrnca']['exact_match_after']:.2f} (random: "
              f"{ff['random']['exact_match_after']:.2f})")
    npred = res.neuron_prediction
    if npred and npred.get("n"):
        print(f"neuron-based prediction ({npred['note']}): {npred['neuron_accuracy']:.2f} vs the model's own "
              f"{npred['model_accuracy']:.2f} on {npred['n']} held-out queries (agreement {npred['agreement']:.2f})")
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")
    return 0


def cmd_report(args: Any) -> int:
    """``qrnca-lens report DIR [--model NAME] [--no-model] [--queries N] [--group-by F]``: write the report.

    Args:
        args: ``out`` (the run directory), and optionally ``model`` (default: the run's), ``no_model``
            (skip projections and views), ``queries`` (how many queries get views), ``group_by`` (the query
            field the maps group by; default: the run's).

    Returns:
        0; a model that cannot be loaded only drops the projections and views, with a message.
    """
    from ..errors import ModelError
    from ..models import load_model
    from ..render.report import load_run, write_report

    doc, _, manifest = load_run(args.out)
    name = getattr(args, "model", None) or doc.get("model")
    model = None
    if name and not getattr(args, "no_model", False):
        recorded = (manifest or {}).get("dtype") or doc.get("dtype")
        kw = run_load_kwargs(args, args.out, str(recorded) if recorded else None)
        try:
            model = load_model(name, verbose=True, **kw)
        except ModelError as e:
            print(f"[qrnca-lens] cannot load the run's model {name!r} ({e}); the report skips vocabulary "
                  "projections and views (pass --model NAME or a checkpoint directory)")
    path = write_report(args.out, model, n_queries=getattr(args, "queries", None),
                        group_by=grouping_config(args).group_by)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, self-contained: open it in a browser, no network needed)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``qrnca-lens bench``: fast vs reference IG (or, with ``--long-prompt-tokens``, memory); a JSON line last."""
    from .. import models
    from ..bench import run_bench, run_long_prompt_bench

    model = models.load_model(args.model, **load_kwargs(args))
    if args.long_prompt_tokens:
        res = run_long_prompt_bench(model, args.long_prompt_tokens, steps=args.steps,
                                    memory_budget_mb=args.memory_budget_mb, max_batch_rows=args.max_batch_rows,
                                    name=args.model)
    else:
        res = run_bench(model, steps=args.steps, reference_layers=args.reference_layers, repeats=args.repeats,
                        captum=not args.no_captum, max_batch_rows=args.max_batch_rows, name=args.model)
    print(json.dumps(res))
    return 0


def _say_device(args: argparse.Namespace, recorded: str | None, asked: str | None) -> None:
    """One line when a run made on one device is judged on another (allowed: only recorded)."""
    if recorded and asked and not getattr(args, "quiet", False) and asked.split(":")[0] != recorded.split(":")[0]:
        print(f"[qrnca-lens] {args.out} was made on {recorded}; this evaluation runs on {asked}")


def cmd_exhaustive(args: argparse.Namespace) -> int:
    """``qrnca-lens exhaustive DIR --query ID``: every neuron of some layers zero-ablated on one stored prompt.

    Prints the cost (seconds, rows) and the neurons with the largest |effect|; writes ``DIR/exhaustive-ID.json``.
    """
    from .. import models
    from ..ground_truth import exhaustive_effects
    from ..locate import reduce
    from ..store import write_json_atomic

    run = reduce(args.out, write=False)
    prompts = run.stored_prompts([args.query])[args.query]
    model = models.load_model(run.model, verbose=False, **run_load_kwargs(args, args.out, run.dtype))
    L = models.n_layers(model)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(L - 4, L))
    t0 = time.perf_counter()
    eff = exhaustive_effects(model, prompts[args.prompt], layers, progress=True)
    seconds = time.perf_counter() - t0
    order = eff.abs().flatten().argsort(descending=True)[: args.top].tolist()
    top = [[layers[i // eff.shape[1]], i % eff.shape[1], float(eff.flatten()[i])] for i in order]
    print(f"exhaustive: {eff.numel()} neurons ({len(layers)} layers) of {args.query} prompt {args.prompt}, "
          f"zero-ablated one at a time: {seconds:.1f} s ({1000 * seconds / eff.numel():.2f} ms per neuron)")
    for layer, n, e in top:
        print(f"  L{layer}.N{n}  {e:+.4f} nats")
    path = Path(args.out) / f"exhaustive-{args.query}.json"
    write_json_atomic(path, {"query": args.query, "prompt": args.prompt, "layers": layers, "seconds": seconds,
                             "top": top, "effects": eff.tolist()})
    print(f"wrote {path}")
    return 0
