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
           "print_summary", "evaluation_doc", "check_method", "load_located"]


def shard(spec: str | None) -> tuple[int, int]:
    """``--shard I/N`` as ``(I, N)``; a bad value names the option.

    Example:
        >>> shard("1/4")
        (1, 4)
    """
    from ..qrnca.locate import parse_shard

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
    """evaluation.json as ``evaluate`` writes it (``evaluation.evaluation_doc``): kept here for older imports."""
    from ..evaluation.judge import evaluation_doc as doc

    return doc(res, run)


def cmd_accuracy(args: argparse.Namespace) -> int:
    """``qrnca-lens accuracy``: the model's accuracy and mean target probability on a proxy."""
    from ..engine.scoring import accuracy
    from ..model import loading as models

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


IG_PATHS = ("fast", "reference", "auto")  # what --method meant before it named the locator (now --ig-method)


def check_method(name: str) -> None:
    """``--method``: a registered locator; an IG path (the option's old meaning) names ``--ig-method``.

    Example:
        >>> check_method("auto")
        Traceback (most recent call last):
        ...
        qrnca_lens.errors.QrncaError: --method names the locator now (qrnca, atp, ...); the IG path is --ig-method auto
    """
    if name in IG_PATHS:
        raise QrncaError(f"--method names the locator now (qrnca, atp, ...); the IG path is --ig-method {name}")
    from ..locators.registry import LOCATORS

    if name not in LOCATORS:
        raise QrncaError(f"--method {name!r} is not a registered locator; choose one of {sorted(LOCATORS)}")


def cmd_locate(args: argparse.Namespace) -> int:
    """``qrnca-lens locate``: QRNCA attributes every query into ``--out`` (resumable), then selects the QR neurons;
    ``--method NAME`` runs another registered locator and writes its result to ``--out``."""
    from ..model import loading as models
    from ..qrnca.locate import LocateConfig, locate

    method = getattr(args, "method", None) or "qrnca"
    check_method(method)
    layers = _layers(getattr(args, "layers", None))
    cfg = LocateConfig(proxy=proxy_config(args), ig=ig_config(args), selection=selection_config(args), layers=layers)
    if method != "qrnca" or getattr(args, "run", None):
        return _locate_method(args, method, cfg)
    if getattr(args, "top", None) is not None:
        raise QrncaError("--top sets how many neurons a ranking --method keeps; QRNCA's count is its selection (--v)")
    where = shard(args.shard)
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


def _layers(text: str | None) -> tuple[int, ...] | None:
    """``--layers 0,1,5`` -> (0, 1, 5); a bad value names the option."""
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise QrncaError(f"--layers must be comma-separated layer numbers (e.g. 0,1,5), got {text!r}") from None


def _locate_method(args: argparse.Namespace, method: str, base: Any) -> int:
    """``locate --method NAME`` (or ``--run DIR``): the method's ``Located``, saved to ``--out``."""
    from dataclasses import replace

    from ..locators.registry import LOCATORS, coerce_config, locate
    from ..model import loading as models
    from ..qrnca.locate import reduce

    if args.shard is not None or args.executor != "serial":
        raise QrncaError(f"--shard and --executor apply to QRNCA's attribution only, not to --method {method}")
    cfg = coerce_config(LOCATORS[method], base)
    if getattr(args, "top", None) is not None:
        if not hasattr(cfg, "top_k"):
            raise QrncaError(f"--top does not apply to --method {method} (its count is the QRNCA selection's)")
        cfg = replace(cfg, top_k=args.top)
    run = reduce(args.run, write=False) if getattr(args, "run", None) else None
    queries, pool = queries_and_pool(args)
    kw = run_load_kwargs(args, args.run, run.dtype, note=False) if run is not None else load_kwargs(args)
    model = models.load_model(args.model, verbose=not args.quiet, **kw)
    t0 = time.perf_counter()
    res = locate(model, queries, cfg, method=method, pool=pool, out=args.out, progress=not args.quiet,
                 name=args.model, data=args.data, group_by=grouping_config(args).group_by, run=run)
    assert res is not None  # only QRNCA's shards leave work to others
    s = res.neurons_json()["summary"]
    print(f"{method}: {s['n_queries']} queries, {s['mean_qr_neurons']:.1f} neurons per query on average "
          f"({time.perf_counter() - t0:.1f} s); wrote {Path(args.out) / 'neurons.json'}")
    return 0


def _resume_load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """locate's ``load_model`` keywords: a run to resume in ``--out`` gives the default dtype (and a refusal early,
    before the model loads, if ``--dtype`` names another without ``--allow-dtype-change``)."""
    from ..errors import StoreError
    from ..qrnca.store import RunStore

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
    from ..qrnca.locate import reduce
    from ..qrnca.selection import SelectionConfig
    from ..qrnca.store import RunStore

    t0 = time.perf_counter()
    base = SelectionConfig.from_dict(RunStore.load(args.out).manifest["selection"])
    res = reduce(args.out, selection_config(args, base))
    print_summary(res, Path(args.out) / "neurons.json")
    print(f"reduce took {time.perf_counter() - t0:.1f} s")
    return 0


def load_located(out: str | Path) -> Any:
    """The result in a directory: a QRNCA run (``reduce(out, write=False)``) or a saved ``RankedResult``.

    Example:
        >>> load_located("runs/nowhere")   # doctest: +SKIP
        qrnca_lens.errors.StoreError: runs/nowhere/neurons.json does not exist: ...
    """
    from ..located import RankedResult
    from ..qrnca.locate import reduce

    if (Path(out) / "manifest.json").exists() or not (Path(out) / "neurons.json").exists():
        return reduce(out, write=False)  # a missing run is named by the run store, with the fix
    return RankedResult.load(out)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``qrnca-lens evaluate``: judge the locators' neurons on the result's stored prompts; evaluate writes
    evaluation.json into the directory (a QRNCA run, or a ``locate --method NAME`` result)."""
    from ..evaluation.judge import evaluate
    from ..model import access
    from ..model import loading as models

    cfg = eval_config(args)  # a bad option fails before the model loads
    run = load_located(args.out)
    # The result's stored prompts and queries, not its data file: editing or deleting that file after
    # locate changes nothing here.
    queries = run.stored_queries()
    kw = run_load_kwargs(args, args.out, run.dtype, note=False)  # evaluate itself says when the dtype is unknown
    model = models.load_model(run.model, verbose=not args.quiet, **kw)
    _say_device(args, run.device, str(access.model_device(model)))
    t0 = time.perf_counter()
    ex = executor(args, run.model, kw["dtype"])
    try:
        res = evaluate(model, run, queries, cfg=cfg, progress=not args.quiet, executor=ex,
                       allow_dtype_change=args.allow_dtype_change)
    finally:
        if ex is not None:
            ex.shutdown()
    path = Path(args.out) / "evaluation.json"
    print(f"\n{run.model} ({res.meta['dtype']}, {res.meta['device']}) on {getattr(run, 'data', None)} "
          f"({run.proxy_config().kind}), {len(queries)} queries; model accuracy on the "
          f"prompts {res.meta['model_accuracy']:.2f}, mean target p {res.meta['mean_target_prob']:.3f}")
    # Its notes say the neuron budget, the queries left out for having no neurons and, last, each stage's seconds.
    print(res.table())
    ff = res.free_form
    own = ff.get("drop_ratio_of", "qrnca") if ff else None
    if ff and own is not None and ff[own]["loglik_drop"] is not None and ff["random"]["loglik_drop"] is not None:
        print(f"free-form ({own}'s neurons ablated at every position): log-likelihood drop "
              f"{ff[own]['loglik_drop']:.3f} vs random {ff['random']['loglik_drop']:.3f} (ratio "
              f"{ff['drop_ratio'] or float('nan'):.1f}); greedy exact match {ff['exact_match_before']:.2f} -> "
              f"{ff[own]['exact_match_after']:.2f} (random: {ff['random']['exact_match_after']:.2f})")
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
    from ..model.loading import load_model
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
    from ..bench.ig import run_bench, run_long_prompt_bench
    from ..model import loading as models

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
    from ..evaluation.ground_truth import exhaustive_effects
    from ..model import access
    from ..model import loading as models
    from ..qrnca.locate import reduce
    from ..qrnca.store import write_json_atomic

    run = reduce(args.out, write=False)
    prompts = run.stored_prompts([args.query])[args.query]
    model = models.load_model(run.model, verbose=False, **run_load_kwargs(args, args.out, run.dtype))
    L = access.n_layers(model)
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
