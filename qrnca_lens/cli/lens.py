"""The ``qrnca-lens lens`` command's handler: the log-probability lens's neurons (and ``--compare``)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..atomic import write_json_atomic
from ..lens import LensConfig, compare_methods, comparison_report, lens_locate
from ..models import tokenizer_of
from ..proxies import ProxyConfig, build_all_prompts

__all__ = ["cmd_lens"]


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    write_json_atomic(path, doc, indent=2)


def cmd_lens(args: argparse.Namespace) -> int:
    """``qrnca-lens lens``: write OUT/neurons.json (and OUT/lens.json with ``--compare``).

    Reads ``args.model, .data, .proxy, .out, .top_k, .limit, .shots, .templates, .seed, .bos ("auto"/"yes"/"no"),
    .chat``, and optionally ``.pool`` (examples and distractors from this data spec), ``.quiet``, ``.lens_mode``
    ("topk", default, or "exact"), ``.compare`` (also run the paper's comparison), ``.compare_prompts`` (its first
    N prompts; all by default) and ``.compare_k`` (10).
    """
    from .. import models
    from ..data import limit_per_group, load_data

    bos_arg = getattr(args, "bos", "auto")
    bos = {"auto": None, "yes": True, "no": False}.get(bos_arg, bos_arg) if isinstance(bos_arg, str) else bos_arg
    proxy = ProxyConfig(args.proxy, n_prompts=args.templates, n_shots=args.shots, seed=args.seed,
                        prepend_bos=bos if bos is None or isinstance(bos, bool) else None, chat_template=bool(getattr(args, "chat", False)))
    quiet = bool(getattr(args, "quiet", False))
    data = load_data(args.data)
    queries = limit_per_group(data, args.limit)
    pool = load_data(args.pool) if getattr(args, "pool", None) else data  # --pool: examples from elsewhere
    model = models.load_model(args.model, verbose=not quiet)
    cfg = LensConfig(mode=getattr(args, "lens_mode", "topk") or "topk")
    doc = lens_locate(model, queries, proxy, pool=pool, top_k=args.top_k, progress=not quiet, cfg=cfg)
    doc["model"], doc["data"] = args.model, args.data
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "neurons.json", doc)
    s = doc["summary"]
    print(f"{s['n_queries']} queries: top {args.top_k} neurons each by log-probability increase "
          f"({'all certified exact' if s['all_certified'] else 'some uncertified'}); wrote {out / 'neurons.json'}")
    if getattr(args, "compare", False):
        bos_resolved = doc["config"]["proxy"]["prepend_bos"]
        prompts = build_all_prompts(queries, replace(proxy, prepend_bos=bos_resolved), tokenizer_of(model),
                                    pool=pool, prepend_bos=bos_resolved)
        flat = [p for q in queries for p in prompts[q.id]]
        n = getattr(args, "compare_prompts", None)
        flat = flat[:n] if n else flat
        rows = compare_methods(model, flat, k=getattr(args, "compare_k", 10), seed=args.seed)
        _write_json(out / "lens.json", comparison_report(model, rows, seed=args.seed, name=args.model))
        print(f"{'method':<18} {'MRR drop':>9} {'p drop':>9} {'log p drop':>11}")
        for r in rows:
            print(f"{r['method']:<18} {r['mrr_drop']:>9.4f} {r['prob_drop']:>9.4f} {r['logprob_drop']:>11.4f}")
        print(f"wrote {out / 'lens.json'}")
    return 0
