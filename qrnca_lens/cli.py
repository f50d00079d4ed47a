"""The ``qrnca-lens`` command line. Thin: it parses, calls the Python API, prints.

    qrnca-lens accuracy --model smollm2 --data builtin:facts --proxy cloze [--limit N] [--json]
    qrnca-lens demo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Sequence

from .errors import QrncaError

__all__ = ["main", "build_parser"]


def _add_proxy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="an embedded model name (smollm2, gemma3-270m)")
    p.add_argument("--data", required=True, help="a path (.jsonl, .csv, .json) or builtin:domains / builtin:facts")
    p.add_argument("--proxy", default="mcqa-letter", choices=["mcqa-letter", "mcqa-text", "cloze"])
    p.add_argument("--limit", type=int, default=None, help="keep the first N queries of every group")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qrnca-lens", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    acc = sub.add_parser("accuracy", help="is the model competent on a proxy? accuracy and mean target probability")
    _add_proxy_args(acc)
    acc.add_argument("--json", action="store_true", help="end with one JSON line: accuracy, mean_target_prob, n")

    demo = sub.add_parser("demo", help="the main job on the embedded default model and the built-in data")
    demo.add_argument("--model", default="smollm2")
    demo.add_argument("--limit", type=int, default=None, help="queries per group (default: all)")
    demo.add_argument("--out", default="runs/demo", help="where the demo writes its report")
    return parser


def cmd_accuracy(args: argparse.Namespace) -> int:
    from . import models
    from .data import limit_per_group, load_data
    from .scoring import accuracy

    cfg = _proxy_config(args)
    pool = load_data(args.data)
    model = models.load_model(args.model, verbose=not args.json)
    res = accuracy(model, limit_per_group(pool, args.limit), cfg, pool=pool, progress=not args.json)
    print(res)
    if args.json:
        print(json.dumps({"accuracy": res.accuracy, "mean_target_prob": res.mean_target_prob, "n": res.n,
                          "n_queries": res.n_queries, "chance": res.chance, "proxy": args.proxy,
                          "data": args.data, "model": args.model}))
    return 0


DEMO_RUNS = (
    ("builtin:facts", "cloze"),
    ("builtin:facts", "mcqa-letter"),
    ("builtin:domains", "mcqa-letter"),
    ("builtin:domains", "mcqa-text"),
)


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import models
    from .data import limit_per_group, load_data
    from .proxies import ProxyConfig
    from .scoring import accuracy

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = models.load_model(args.model, verbose=True)
    rows = []
    for data, proxy in DEMO_RUNS:
        pool = load_data(data)
        res = accuracy(model, limit_per_group(pool, args.limit), ProxyConfig(proxy), pool=pool, progress=True)
        print(res)
        rows.append({"data": data, "proxy": proxy, **res.to_dict()})
    report = out / "accuracy.json"
    report.write_text(json.dumps({"model": args.model, "runs": rows}, indent=2))
    print("\nCompetence of", args.model, "on the built-in sets (accuracy over prompts):")
    for r in rows:
        chance = f"{r['chance']:.2f}" if r["chance"] is not None else "-"
        print(f"  {r['data']:<16} {r['proxy']:<12} accuracy {r['accuracy']:.3f}  chance {chance:<5} "
              f"mean p(target) {r['mean_target_prob']:.3f}  n {r['n']}")
    print(f"report written to {report} ({time.perf_counter() - t0:.0f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"accuracy": cmd_accuracy, "demo": cmd_demo}[args.command]
    try:
        return handler(args)
    except QrncaError as e:
        print(f"qrnca-lens {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
