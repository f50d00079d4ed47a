"""The ``qrnca-lens`` command line. Thin: it parses, calls the Python API, prints.

    qrnca-lens accuracy --model smollm2 --data builtin:facts --proxy cloze [--limit N] [--pool SPEC] [--json]
    qrnca-lens locate --model smollm2 --data builtin:facts --proxy cloze --out DIR [--limit N] [--pool SPEC] [--shard I/N]
                      [--executor ray [--address HEAD:6379] [--workers N] [--gpus-per-worker G] [--threads T]]
    qrnca-lens evaluate DIR [--executor ray ...]
    qrnca-lens reduce DIR [--t T] [--u U] [--v V]
    qrnca-lens lens --model smollm2 --data builtin:facts --proxy cloze --out DIR [--top K] [--compare]
    qrnca-lens report DIR
    qrnca-lens bench --model smollm2
    qrnca-lens demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import QrncaError

__all__ = ["main", "build_parser"]


def _add_proxy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="an embedded model name (smollm2, gemma3-270m)")
    p.add_argument("--data", required=True, help="a path (.jsonl, .csv, .json) or builtin:domains / builtin:facts")
    p.add_argument("--proxy", default="mcqa-letter", choices=["mcqa-letter", "mcqa-text", "cloze"])
    p.add_argument("--limit", type=int, default=None, help="keep the first N queries of every group")
    p.add_argument("--pool", default=None,
                   help="take in-context examples and distractors from this set instead of --data (same syntax: "
                        "a path or builtin:NAME); for a small --data file")
    p.add_argument("--templates", type=int, default=3, help="|Q|: prompts (templates) per query")
    p.add_argument("--shots", type=int, default=None, help="in-context examples per prompt (default: per proxy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bos", choices=["auto", "yes", "no"], default="auto",
                   help="prepend BOS: auto follows the model's own tokenizer")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")


def _proxy_config(args: argparse.Namespace) -> Any:
    from .proxies import ProxyConfig

    bos = {"auto": None, "yes": True, "no": False}[args.bos]
    return ProxyConfig(args.proxy, n_prompts=args.templates, n_shots=args.shots, seed=args.seed,
                       prepend_bos=bos, chat_template=args.chat)


def _queries_and_pool(args: argparse.Namespace) -> tuple[list[Any], list[Any]]:
    """The queries (--data, --limit per group) and where their examples and distractors come from."""
    from .data import limit_per_group, load_data

    data = load_data(args.data)
    pool = load_data(args.pool) if args.pool else data
    return limit_per_group(data, args.limit), pool


def _add_selection_args(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    p.add_argument("--t", type=float, default=0.2 if defaults else None, help="cluster threshold, x max score")
    p.add_argument("--u", type=float, default=0.3 if defaults else None, help="common if in more than u*N clusters")
    p.add_argument("--v", type=int, default=20 if defaults else None, help="top-v neurons per query")
    p.add_argument("--cluster-mode", choices=["union", "sum"], default="union" if defaults else None,
                   help="union: authors' per-prompt thresholds; sum: the paper's threshold of the summed scores")
    p.add_argument("--no-ica", action="store_true", help="the QRNCA-without-ICA baseline")
    p.add_argument("--keep-common", action="store_true", help="keep common neurons (the authors' released code)")


def _selection_config(args: argparse.Namespace, base: Any = None) -> Any:
    from .selection import SelectionConfig

    base = base or SelectionConfig()
    d = base.to_dict()
    for key, arg in (("t", "t"), ("u", "u"), ("v", "v"), ("cluster_mode", "cluster_mode")):
        if getattr(args, arg) is not None:
            d[key] = getattr(args, arg)
    if args.no_ica:
        d["use_ica"] = False
    if args.keep_common:
        d["remove_common"] = False
    return SelectionConfig.from_dict(d)


def _add_executor_args(p: argparse.ArgumentParser) -> None:
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


def _executor(args: argparse.Namespace, model_name: str) -> Any:
    """None (serial, on the driver's model) or a RayExecutor; the caller shuts it down."""
    if args.executor != "ray":
        if args.address is not None or args.gpus_per_worker or args.threads is not None:
            raise QrncaError("--address, --gpus-per-worker and --threads only apply with --executor ray")
        return None
    from .executors import RayExecutor

    return RayExecutor(model_name, address=args.address, workers=args.workers,
                       gpus_per_worker=args.gpus_per_worker, threads=args.threads)


def _print_summary(res: Any, path: Any) -> None:
    s = res.neurons_json()["summary"]
    acc = f"{s['accuracy']:.2f}" if s["accuracy"] is not None else "-"
    p = f"{s['mean_target_prob']:.3f}" if s["mean_target_prob"] is not None else "-"
    print(f"{s['n_queries']} queries: {s['mean_qr_neurons']:.1f} QR neurons per query on average, "
          f"{s['n_common_neurons']} common neurons; the model answered {acc} of the prompts (mean target p {p})")
    print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qrnca-lens", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    acc = sub.add_parser("accuracy", help="is the model competent on a proxy? accuracy and mean target probability")
    _add_proxy_args(acc)
    acc.add_argument("--json", action="store_true", help="end with one JSON line: accuracy, mean_target_prob, n")

    loc = sub.add_parser("locate", help="QRNCA: attribute each query (resumable), then select QR neurons")
    _add_proxy_args(loc)
    loc.add_argument("--out", required=True, help="the run directory (created, or resumed if it holds this run)")
    loc.add_argument("--shard", default=None, help="I/N: do every N-th query starting at I (0-based)")
    loc.add_argument("--steps", type=int, default=16, help="m, integration steps")
    loc.add_argument("--alpha-schedule", choices=["riemann", "linspace"], default="riemann",
                     help="riemann: k/m, k=1..m (paper); linspace: linspace(0,1,m) (authors' code)")
    loc.add_argument("--method", choices=["fast", "reference"], default="fast")
    loc.add_argument("--max-batch-rows", type=int, default=240, help="at most this many rows per forward/backward")
    loc.add_argument("--memory-budget-mb", type=int, default=None,
                     help="estimated peak memory of one pass (default: IGConfig's); chunks shrink as prompts grow")
    _add_selection_args(loc)
    _add_executor_args(loc)
    loc.add_argument("--quiet", action="store_true")

    lens = sub.add_parser("lens", help="the log-probability-increase lens as a locator (neurons.json schema)")
    _add_proxy_args(lens)
    lens.add_argument("--out", required=True)
    lens.add_argument("--top", dest="top_k", type=int, default=20, help="neurons kept per query")
    lens.add_argument("--lens-mode", choices=["topk", "exact"], default="topk",
                      help="topk: first-order bound + exact rescoring (certified); exact: every neuron")
    lens.add_argument("--compare", action="store_true",
                      help="also write DIR/lens.json: the paper's 7 alternative scores, top-10 ablated vs random")
    lens.add_argument("--compare-prompts", type=int, default=30)
    lens.add_argument("--compare-k", type=int, default=10)
    lens.add_argument("--quiet", action="store_true")

    ev = sub.add_parser("evaluate", help="prove the neurons: PCR, editing, neuron prediction, free-form check")
    ev.add_argument("out", help="a run directory made by locate")
    ev.add_argument("--methods", default=",".join(("qrnca", "no-ica", "with-common", "kn", "activation", "random")),
                    help="comma-separated locators (also: logprob)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--every-position", action="store_true", help="intervene at every position, not the last")
    ev.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    ev.add_argument("--batch-size", type=int, default=8)
    _add_executor_args(ev)
    ev.add_argument("--quiet", action="store_true")

    rep = sub.add_parser("report", help="write DIR/report.html: maps, projections, evaluation, circuitsvis views (offline)")
    rep.add_argument("out", help="the run directory")
    rep.add_argument("--model", default=None, help="model name or checkpoint dir (default: the one in neurons.json)")
    rep.add_argument("--no-model", action="store_true", help="skip projections and views")
    rep.add_argument("--queries", type=int, default=None, help="queries shown with views (default: one per group, max 6)")

    red = sub.add_parser("reduce", help="rerun the collection-level selection from a run's stored scores; the "
                                        "flags change the run's recorded selection, which evaluate and report use")
    red.add_argument("out")
    _add_selection_args(red, defaults=False)

    bench = sub.add_parser("bench", help="fast vs reference IG on identical work; prints a JSON line last")
    bench.add_argument("--model", default="smollm2")
    bench.add_argument("--steps", type=int, default=16)
    bench.add_argument("--reference-layers", type=int, default=3, help="evenly spaced layers both paths compute")
    bench.add_argument("--repeats", type=int, default=3, help="runs of the fast path (median)")
    bench.add_argument("--max-batch-rows", type=int, default=240)
    bench.add_argument("--no-captum", action="store_true")
    bench.add_argument("--long-prompt-tokens", type=int, default=0,
                       help="instead: peak RSS of the fast path on 3 prompts of this many tokens")
    bench.add_argument("--memory-budget-mb", type=int, default=None, help="IGConfig.memory_budget_mb (long prompts)")

    demo = sub.add_parser("demo", help="the main job on the embedded default model and the built-in data")
    demo.add_argument("--model", default="smollm2")
    demo.add_argument("--limit", type=int, default=6, help="queries per relation for locate/evaluate")
    demo.add_argument("--out", default="runs/demo", help="where the demo writes its results and report")
    demo.add_argument("--methods", default="qrnca,no-ica,with-common,kn,activation,random,logprob")
    return parser


def cmd_accuracy(args: argparse.Namespace) -> int:
    from . import models
    from .scoring import accuracy

    cfg = _proxy_config(args)
    queries, pool = _queries_and_pool(args)
    model = models.load_model(args.model, verbose=not args.json)
    res = accuracy(model, queries, cfg, pool=pool, progress=not args.json)
    print(res)
    if args.json:
        print(json.dumps({"accuracy": res.accuracy, "mean_target_prob": res.mean_target_prob, "n": res.n,
                          "n_queries": res.n_queries, "chance": res.chance, "proxy": args.proxy,
                          "data": args.data, "model": args.model}))
    return 0


def cmd_locate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import models
    from .attribution import IGConfig
    from .locate import LocateConfig, locate, parse_shard

    shard = parse_shard(args.shard)
    cfg = LocateConfig(
        proxy=_proxy_config(args),
        ig=IGConfig(steps=args.steps, alpha_schedule=args.alpha_schedule, method=args.method,
                    max_batch_rows=args.max_batch_rows,
                    **({"memory_budget_mb": args.memory_budget_mb} if args.memory_budget_mb else {})),
        selection=_selection_config(args),
    )
    queries, pool = _queries_and_pool(args)
    model = models.load_model(args.model, verbose=not args.quiet)
    ex = _executor(args, args.model)
    try:
        res = locate(model, queries, cfg, pool=pool, out=args.out, shard=shard, progress=not args.quiet,
                     name=args.model, data=args.data, executor=ex, pool_spec=args.pool or args.data)
    finally:
        if ex is not None:
            ex.shutdown()
    if res is not None:
        _print_summary(res, Path(args.out) / "neurons.json")
    return 0


def cmd_reduce(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .locate import reduce
    from .store import RunStore
    from .selection import SelectionConfig

    t0 = time.perf_counter()
    base = SelectionConfig.from_dict(RunStore.load(args.out).manifest["selection"])
    res = reduce(args.out, _selection_config(args, base))
    _print_summary(res, Path(args.out) / "neurons.json")
    print(f"reduce took {time.perf_counter() - t0:.1f} s")
    return 0


def _evaluation_doc(res: Any, run: Any) -> dict[str, Any]:
    """evaluation.json, recording which selection's neurons it judged (a later reduce warns when it differs)."""
    doc = res.to_dict()
    doc["meta"] = {**doc.get("meta", {}), "selection": run.config.selection.to_dict()}
    return doc


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import models
    from .evaluation import EvalConfig, evaluate
    from .locate import reduce
    from .store import write_json_atomic

    run = reduce(args.out, write=False)
    # The run's stored prompts and queries, not its data file: editing or deleting that file after
    # locate changes nothing here.
    queries = run.stored_queries()
    model = models.load_model(run.model, verbose=not args.quiet)
    cfg = EvalConfig(methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()), seed=args.seed,
                     every_position=args.every_position, n_boot=args.bootstrap, batch_size=args.batch_size)
    t0 = time.perf_counter()
    ex = _executor(args, run.model)
    try:
        res = evaluate(model, run, queries, cfg=cfg, progress=not args.quiet, executor=ex)
    finally:
        if ex is not None:
            ex.shutdown()
    path = Path(args.out) / "evaluation.json"
    write_json_atomic(path, _evaluation_doc(res, run))
    print(f"\n{run.model} on {run.data} ({run.config.proxy.kind}), {len(queries)} queries; model accuracy on the "
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


DEMO_COMPETENCE = (
    ("builtin:facts", "cloze"),
    ("builtin:facts", "mcqa-letter"),
    ("builtin:domains", "mcqa-letter"),
    ("builtin:domains", "mcqa-text"),
)


def cmd_demo(args: argparse.Namespace) -> int:
    """Competence on every proxy, then QRNCA on the proxy the model is competent at, proved and reported."""
    from pathlib import Path

    from . import models
    from .attribution import IGConfig
    from .data import limit_per_group, load_data
    from .evaluation import EvalConfig, evaluate
    from .locate import LocateConfig, locate
    from .proxies import ProxyConfig
    from .scoring import accuracy
    from .store import write_json_atomic

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = models.load_model(args.model, verbose=True)

    print("\n== 1. Is the model competent on each proxy? (accuracy over prompts, first 10 queries per group)")
    rows = []
    for data, proxy in DEMO_COMPETENCE:
        pool = load_data(data)
        res = accuracy(model, limit_per_group(pool, 10), ProxyConfig(proxy), pool=pool, progress=True)
        row = res.to_dict()
        row["proxy_config"] = row.pop("proxy")  # keep the full config; "proxy" names the proxy
        rows.append({"data": data, "proxy": proxy, **row})
    write_json_atomic(out / "accuracy.json", {"model": args.model, "runs": rows})
    for r in rows:
        chance = f"{r['chance']:.2f}" if r["chance"] is not None else "-"
        print(f"  {r['data']:<16} {r['proxy']:<12} accuracy {r['accuracy']:.3f}  chance {chance:<5} "
              f"mean p(target) {r['mean_target_prob']:.3f}  n {r['n']}")

    print(f"\n== 2. QRNCA on builtin:facts with the cloze proxy ({args.limit} queries per relation)")
    pool = load_data("builtin:facts")
    queries = limit_per_group(pool, args.limit)
    run_dir = out / "facts-cloze"
    cfg = LocateConfig(proxy=ProxyConfig("cloze"), ig=IGConfig(steps=16))
    run = locate(model, queries, cfg, pool=pool, out=run_dir, name=args.model, data="builtin:facts")
    assert run is not None
    _print_summary(run, run_dir / "neurons.json")

    print("\n== 3. Prove them: boost/suppress against unrelated queries, editing, free-form, baselines")
    methods = tuple(m for m in args.methods.split(",") if m)
    res = evaluate(model, run, queries, pool, EvalConfig(methods=methods))
    write_json_atomic(run_dir / "evaluation.json", _evaluation_doc(res, run))
    print(res.table())

    print("\n== 4. The report: maps, vocabulary projections, the table, circuitsvis views (one offline file)")
    from .render.report import write_report

    report = write_report(run_dir, model, queries=queries, pool=pool)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    print(f"report: {report.resolve()}")
    return 0


def _check_writable_dir(path: str, what: str) -> None:
    """``path`` is, or can be created as, a directory we can write in; checked before any slow work."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise QrncaError(f"{what} {path} is a file, not a directory; give a directory (it is created if missing)")
    probe = p
    while not probe.exists():  # the nearest existing ancestor decides whether the directory can be made
        probe = probe.parent
    if not probe.is_dir():
        raise QrncaError(f"{what} {path}: {probe} is a file, so the directory cannot be created; give another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise QrncaError(f"{what} {path}: {probe} is not writable; give a directory you can write to")


def _check_args_early(args: argparse.Namespace) -> None:
    """Bad paths fail in a second, before the data or the model is loaded, not after a long run."""
    if getattr(args, "model", None):  # report's --model is optional
        from .models import check_model_name

        check_model_name(args.model)
    if args.command in ("locate", "lens", "demo"):
        _check_writable_dir(args.out, "--out")
    if args.command in ("evaluate", "report"):  # both write into the run directory at the end
        _check_writable_dir(args.out, "the run directory")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"accuracy": cmd_accuracy, "locate": cmd_locate, "reduce": cmd_reduce, "evaluate": cmd_evaluate,
               "demo": cmd_demo}
    if args.command == "bench":
        from .bench import cmd_bench

        handler["bench"] = cmd_bench
    if args.command == "lens":
        from .lens.command import cmd_lens

        handler["lens"] = cmd_lens
    if args.command == "report":
        from .render.report import cmd_report

        handler["report"] = cmd_report
    handler = handler[args.command]
    try:
        _check_args_early(args)
        return handler(args)
    except QrncaError as e:
        print(f"qrnca-lens {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
