"""The ``qrnca-lens lens`` command's handler: the log-probability lens's neurons (and ``--compare``)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..atomic import write_json_atomic
from ..lens import LensConfig, compare_methods, comparison_report, lens_locate
from ..lens.config import LensRunConfig
from ..models import tokenizer_of
from ..proxies import build_all_prompts
from .args import build
from .groups import LENS, load_kwargs, proxy_config, queries_and_pool

__all__ = ["cmd_lens"]


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    write_json_atomic(path, doc, indent=2)


def cmd_lens(args: argparse.Namespace) -> int:
    """``qrnca-lens lens``: write OUT/neurons.json (and OUT/lens.json with ``--compare``).

    ``args`` come from the ``lens`` subparser: the proxy options, ``--out``, ``--quiet``, ``--compare`` and the
    options generated from ``LensRunConfig`` (``--top``, ``--lens-mode``, ``--compare-prompts``, ``--compare-k``).
    """
    from .. import models
    proxy = proxy_config(args)
    quiet = bool(args.quiet)
    queries, pool = queries_and_pool(args)
    model = models.load_model(args.model, verbose=not quiet, **load_kwargs(args))
    run = build(LensRunConfig, args, LENS)
    res = lens_locate(model, queries, proxy, pool=pool, top_k=run.top_k, progress=not quiet,
                      cfg=LensConfig(mode=run.mode))
    res.model, res.data = args.model, args.data
    doc = res.neurons_json()
    out = Path(args.out)
    path = res.write_neurons(out)
    # The lens's neurons.json records the weights' dtype and device too: the report loads the model the same way.
    from ..locate import model_numerics

    _write_json(path, {**json.loads(path.read_text()), **model_numerics(model)})
    s = doc["summary"]
    print(f"{s['n_queries']} queries: top {run.top_k} neurons each by log-probability increase "
          f"({'all certified exact' if s['all_certified'] else 'some uncertified'}); wrote {path}")
    if getattr(args, "compare", False):
        bos_resolved = doc["config"]["proxy"]["prepend_bos"]
        prompts = build_all_prompts(queries, replace(proxy, prepend_bos=bos_resolved), tokenizer_of(model),
                                    pool=pool, prepend_bos=bos_resolved)
        flat = [p for q in queries for p in prompts[q.id]]
        flat = flat[: run.compare_prompts]
        rows = compare_methods(model, flat, k=run.compare_k, seed=args.seed)
        _write_json(out / "lens.json", comparison_report(model, rows, seed=args.seed, name=args.model))
        print(f"{'method':<18} {'MRR drop':>9} {'p drop':>9} {'log p drop':>11}")
        for r in rows:
            print(f"{r['method']:<18} {r['mrr_drop']:>9.4f} {r['prob_drop']:>9.4f} {r['logprob_drop']:>11.4f}")
        print(f"wrote {out / 'lens.json'}")
    return 0
