"""The ``qrnca-lens lens`` handler: an alias of ``locate --method logprob`` (which replaced it), plus ``--compare``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..atomic import write_json_atomic
from ..lens import LensConfig, compare_methods, comparison_report
from ..lens.config import LensRunConfig
from .args import build
from .groups import LENS, load_kwargs, proxy_config, queries_and_pool

__all__ = ["cmd_lens", "REPLACED_BY"]

REPLACED_BY = ("qrnca-lens lens is now `qrnca-lens locate --method logprob` (same options; --top K); "
               "this alias runs it, and --compare here")


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    write_json_atomic(path, doc, indent=2)


def cmd_lens(args: argparse.Namespace) -> int:
    """``qrnca-lens lens``: ``locate --method logprob`` into OUT (and OUT/lens.json with ``--compare``).

    ``args`` come from the ``lens`` subparser: the proxy options, ``--out``, ``--quiet``, ``--compare`` and the
    options generated from ``LensRunConfig`` (``--top``, ``--lens-mode``, ``--compare-prompts``, ``--compare-k``).
    OUT then holds the ``RankedResult`` that ``qrnca-lens evaluate OUT`` judges.
    """
    from ..locators.registry import LogprobConfig, locate
    from ..model import loading as models

    print(f"[qrnca-lens] {REPLACED_BY}", file=sys.stderr)
    quiet = bool(args.quiet)
    queries, pool = queries_and_pool(args)
    model = models.load_model(args.model, verbose=not quiet, **load_kwargs(args))
    run = build(LensRunConfig, args, LENS)
    cfg = LogprobConfig(proxy=proxy_config(args), top_k=run.top_k, lens=LensConfig(mode=run.mode))
    res: Any = locate(model, queries, cfg, method="logprob", pool=pool, out=args.out, progress=not quiet,
                      name=args.model, data=args.data)
    out = Path(args.out)
    path = out / "neurons.json"
    s = res.neurons_json()["summary"]
    share = res.costs.get("certified_share")
    print(f"{s['n_queries']} queries: top {run.top_k} neurons each by log-probability increase "
          f"({'all certified exact' if share == 1 else 'some uncertified'}); wrote {path}")
    if getattr(args, "compare", False):
        # The very prompts the lens ranked on (stored in the result), not a rebuild.
        flat = [p for q in queries for p in res.prompts[q.id]][: run.compare_prompts]
        rows = compare_methods(model, flat, k=run.compare_k, seed=args.seed)
        _write_json(out / "lens.json", comparison_report(model, rows, seed=args.seed, name=args.model))
        print(f"{'method':<18} {'MRR drop':>9} {'p drop':>9} {'log p drop':>11}")
        for r in rows:
            print(f"{r['method']:<18} {r['mrr_drop']:>9.4f} {r['prob_drop']:>9.4f} {r['logprob_drop']:>11.4f}")
        print(f"wrote {out / 'lens.json'}")
    return 0

