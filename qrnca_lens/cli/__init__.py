"""The ``qrnca-lens`` command line. Thin: it parses, calls the Python API, prints.

    qrnca-lens accuracy --model smollm2 --data builtin:facts --proxy cloze [--limit N] [--pool SPEC] [--json]
    qrnca-lens locate --model smollm2 --data builtin:facts --proxy cloze --out DIR [--limit N] [--pool SPEC] [--shard I/N]
                      [--group-by language|relation|group] [--layers 0,1,2] [--ig-method fast|reference|auto]
                      [--executor ray [--address HEAD:6379] [--workers N] [--gpus-per-worker G] [--threads T]]
    qrnca-lens locate --method atp|dla|activation|logprob|random|kn|no-ica|with-common ... --out DIR [--top K]
                      [--run QRNCA_DIR]
    qrnca-lens evaluate DIR [--budget qrnca|own|K] [--group-by language|relation|group] [--executor ray ...]
    qrnca-lens reduce DIR [--t T] [--u U] [--v V]
    qrnca-lens lens ... --out DIR [--top K] [--compare]     (alias of locate --method logprob)
    qrnca-lens report DIR [--group-by language|relation|group]
    qrnca-lens bench --model smollm2
    qrnca-lens exhaustive DIR --query ID [--layers 26,27,28,29]
    qrnca-lens demo [--languages]

Every command that loads a model takes --dtype {float32,bfloat16,float16} and --device; the run records them,
and evaluate, report and exhaustive load the model in the run's dtype (another one only with
--allow-dtype-change, which locate and demo take too).

The parser and ``main`` live here; ``args`` generates the options that mirror config fields from the
dataclasses, ``groups`` holds the option groups commands share, ``commands`` and ``demo`` the handlers.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import QrncaError
from .args import add_options

__all__ = ["main", "build_parser"]


def _add_accuracy(sub: Any) -> None:
    from .groups import add_numerics_args, add_proxy_args

    acc = sub.add_parser("accuracy", help="is the model competent on a proxy? accuracy and mean target probability")
    add_proxy_args(acc)
    add_numerics_args(acc)
    acc.add_argument("--json", action="store_true", help="end with one JSON line: accuracy, mean_target_prob, n")


def _add_locate(sub: Any) -> None:
    from .groups import GROUPING, IG, add_executor_args, add_numerics_args, add_proxy_args, add_selection_args

    loc = sub.add_parser("locate", help="QRNCA: attribute each query (resumable), then select QR neurons; or any "
                                        "other registered locator (--method)")
    add_proxy_args(loc)
    loc.add_argument("--out", required=True, help="the run directory (created, or resumed if it holds this run)")
    loc.add_argument("--method", default="qrnca",
                     help="the locator: qrnca (default), no-ica, with-common, kn, activation, atp, dla, logprob, "
                          "random or a registered one; the IG path is --ig-method")
    loc.add_argument("--top", type=int, default=None,
                     help="neurons kept per query by a ranking --method (default: the method's; 200, logprob 20; "
                          "random: QRNCA's count from --run)")
    loc.add_argument("--layers", default=None, help="comma-separated layers searched (default: all)")
    loc.add_argument("--run", default=None,
                     help="a QRNCA run directory whose stored IG scores no-ica, with-common and kn reuse (and whose QR "
                          "neuron counts random draws); without it they locate QRNCA first")
    loc.add_argument("--shard", default=None, help="I/N: do every N-th query starting at I (0-based)")
    add_options(loc, IG)
    add_selection_args(loc)
    add_options(loc, GROUPING)
    add_numerics_args(loc, allow=True)
    add_executor_args(loc)
    loc.add_argument("--quiet", action="store_true")


def _add_lens(sub: Any) -> None:
    from .groups import LENS, add_numerics_args, add_proxy_args

    lens = sub.add_parser("lens", help="alias of `locate --method logprob` (plus --compare): the log-probability-"
                                       "increase lens as a locator")
    add_proxy_args(lens)
    lens.add_argument("--out", required=True)
    add_options(lens, LENS)
    add_numerics_args(lens)
    lens.add_argument("--compare", action="store_true",
                      help="also write DIR/lens.json: the paper's 7 alternative scores, top-k ablated vs random")
    lens.add_argument("--quiet", action="store_true")


def _add_evaluate(sub: Any) -> None:
    from ..evaluation.judge import EvalConfig
    from .groups import EVAL, add_executor_args, add_numerics_args

    ev = sub.add_parser("evaluate", help="prove the neurons: PCR, editing, neuron prediction, free-form check")
    ev.add_argument("out", help="a run directory made by locate")
    add_options(ev, EVAL)
    ev.add_argument("--budget", default=None, help=EvalConfig.field_help("budget"))
    add_numerics_args(ev, run=True)
    add_executor_args(ev)
    ev.add_argument("--quiet", action="store_true")


def _add_report(sub: Any) -> None:
    from .groups import GROUPING, add_numerics_args

    rep = sub.add_parser("report", help="write DIR/report.html: maps, projections, evaluation, circuitsvis views (offline)")
    rep.add_argument("out", help="the run directory")
    rep.add_argument("--model", default=None, help="model name or checkpoint dir (default: the one in neurons.json)")
    rep.add_argument("--no-model", action="store_true", help="skip projections and views")
    rep.add_argument("--queries", type=int, default=None, help="queries shown with views (default: one per group, max 6)")
    add_options(rep, GROUPING)
    add_numerics_args(rep, run=True)


def _add_reduce(sub: Any) -> None:
    from .groups import add_selection_args

    red = sub.add_parser("reduce", help="rerun the collection-level selection from a run's stored scores; the "
                                        "flags change the run's recorded selection, which evaluate and report use")
    red.add_argument("out")
    add_selection_args(red, defaults=False)


def _add_bench(sub: Any) -> None:
    from .groups import BENCH, add_numerics_args

    bench = sub.add_parser("bench", help="fast vs reference IG on identical work; prints a JSON line last")
    bench.add_argument("--model", default="smollm2")
    add_options(bench, BENCH[:1])  # --steps
    bench.add_argument("--reference-layers", type=int, default=3, help="evenly spaced layers both paths compute")
    bench.add_argument("--repeats", type=int, default=3, help="runs of the fast path (median)")
    add_options(bench, BENCH[1:2])  # --max-batch-rows
    bench.add_argument("--no-captum", action="store_true")
    bench.add_argument("--long-prompt-tokens", type=int, default=0,
                       help="instead: peak RSS of the fast path on 3 prompts of this many tokens")
    add_options(bench, BENCH[2:])  # --memory-budget-mb
    add_numerics_args(bench)


def _add_exhaustive(sub: Any) -> None:
    from .groups import add_numerics_args

    exh = sub.add_parser("exhaustive", help="ground truth for one prompt: every neuron of some layers zero-ablated")
    exh.add_argument("out", help="a run directory made by locate")
    exh.add_argument("--query", required=True, help="the query id (its stored prompts are used)")
    exh.add_argument("--prompt", type=int, default=0, help="which of the query's prompts")
    exh.add_argument("--layers", default=None, help="comma-separated layers (default: the top 4; all is slow)")
    exh.add_argument("--top", type=int, default=10, help="neurons printed, by |effect|")
    add_numerics_args(exh, run=True)


def _add_demo(sub: Any) -> None:
    from .demo import DEMO_METHODS, LANGUAGE_METHODS
    from .groups import add_numerics_args

    demo = sub.add_parser("demo", help="the main job on the embedded default model and the built-in data")
    # None: the English demo's defaults (smollm2, 6, runs/demo), or with --languages gemma3-270m, 1,
    # runs/demo-languages (see demo.demo_defaults).
    demo.add_argument("--model", default=None, help="default: smollm2 (--languages: gemma3-270m)")
    demo.add_argument("--limit", type=int, default=None,
                      help="queries per relation for locate/evaluate (default 6; --languages: 1 per relation and language)")
    demo.add_argument("--out", default=None, help="where the demo writes its results and report (default runs/demo, "
                                                  "--languages: runs/demo-languages)")
    demo.add_argument("--competence-per-group", type=int, default=3,
                      help="queries per group the competence check scores (10: the full check)")
    # The demo also runs the lens and the first-order lenses as locators, on top of evaluate's default methods.
    demo.add_argument("--methods", default=None,
                      help="comma-separated locators (default: " + ",".join(DEMO_METHODS) + "; --languages: "
                           + ",".join(LANGUAGE_METHODS) + ")")
    demo.add_argument("--ground-truth-queries", type=int, default=1,
                      help="queries per relation judged against exact single-neuron ablations (0: none)")
    demo.add_argument("--languages", action="store_true",
                      help="the language experiment instead: builtin:languages on gemma3-270m (unless --model), "
                           "grouped by language (--limit 1 per relation and language unless given)")
    demo.add_argument("--langs", default=None,
                      help="with --languages: comma-separated languages to run (default: all of builtin:languages; "
                           "each costs 5 queries of IG)")
    add_numerics_args(demo, allow=True)


# The sub-commands in the order ``--help`` lists them; each adds its subparser and options.
_SUBCOMMANDS: tuple[Callable[[Any], None], ...] = (
    _add_accuracy, _add_locate, _add_lens, _add_evaluate, _add_report, _add_reduce, _add_bench, _add_exhaustive,
    _add_demo,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``qrnca-lens`` parser; options that mirror a config field take their default from the dataclass.

    Example:
        >>> build_parser().parse_args(["reduce", "runs/facts", "--v", "5"]).v
        5
    """
    parser = argparse.ArgumentParser(prog="qrnca-lens", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


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
        from ..model.loading import check_model_name

        check_model_name(args.model)
    if args.command in ("locate", "lens", "demo"):
        _check_writable_dir(args.out, "--out")
    if args.command == "locate" and args.method != "qrnca":
        from .commands import check_method

        check_method(args.method)
        if (Path(args.out) / "manifest.json").exists():
            raise QrncaError(f"--out {args.out} holds a QRNCA run; write the {args.method} result to another directory "
                             f"(its IG scores are reused with --run {args.out})")
    if args.command == "demo" and args.langs is not None:
        if not args.languages:
            raise QrncaError("--langs picks languages of the languages demo; add --languages")
        from ..data.queries import load_data
        from .demo import demo_languages

        demo_languages(args, load_data("builtin:languages"))
    if args.command in ("evaluate", "report", "exhaustive"):  # both write into the run directory at the end
        _check_writable_dir(args.out, "the run directory")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the command.

    Returns:
        The exit code: 0, or 2 after a one-line "qrnca-lens CMD: error: ..." on stderr (no traceback).

    Example:
        >>> main(["reduce", "runs/nowhere"])   # doctest: +SKIP
        2
    """
    from .commands import cmd_accuracy, cmd_bench, cmd_evaluate, cmd_exhaustive, cmd_locate, cmd_reduce, cmd_report
    from .demo import cmd_demo, demo_defaults

    args = build_parser().parse_args(argv)
    if args.command == "demo":
        args = demo_defaults(args)  # the English or the languages demo's model, limit and --out, before the checks
    handlers = {"accuracy": cmd_accuracy, "locate": cmd_locate, "reduce": cmd_reduce, "evaluate": cmd_evaluate,
                "report": cmd_report, "bench": cmd_bench, "demo": cmd_demo, "exhaustive": cmd_exhaustive}
    if args.command == "lens":
        from .lens import cmd_lens

        handlers["lens"] = cmd_lens
    handler = handlers[args.command]
    try:
        _check_args_early(args)
        return handler(args)
    except QrncaError as e:
        print(f"qrnca-lens {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: say what survived instead of a traceback from deep inside the model
        kept = (f"; the queries it finished are stored in {args.out}: run the same command to resume"
                if args.command == "locate" else "")
        print(f"qrnca-lens {args.command}: interrupted{kept}", file=sys.stderr)
        return 130
