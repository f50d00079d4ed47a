"""``qrnca-lens demo``: the main job on the embedded default model and the built-in data, start to finish."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.queries import Query
from ..errors import QrncaError
from ..evaluation.judge import DEFAULT_METHODS
from .commands import print_summary

__all__ = ["cmd_demo", "cmd_demo_languages", "demo_defaults", "demo_languages", "DEMO_COMPETENCE", "DEMO_METHODS", "LANGUAGE_METHODS"]

# evaluate's default methods, plus the lens and the first-order lenses as locators.
DEMO_METHODS = (*DEFAULT_METHODS, "logprob", "atp", "dla")

# The languages demo compares QRNCA with the cheapest informative others (the full set is the English demo's).
LANGUAGE_METHODS = ("qrnca", "atp", "logprob", "random")

# (data, proxy) pairs whose competence the demo measures first.
DEMO_COMPETENCE = (
    ("builtin:facts", "cloze"),
    ("builtin:facts", "mcqa-letter"),
    ("builtin:domains", "mcqa-letter"),
    ("builtin:domains", "mcqa-text"),
)


def _lap(stages: dict[str, float]) -> Any:
    """``lap(name, since)``: record and print a stage's seconds since ``since``; returns now."""

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        stages[name] = round(now - since, 1)
        print(f"[{name}: {stages[name]:.0f} s]")
        return now

    return lap


def _start(args: argparse.Namespace) -> tuple[Path, Any]:
    """The demo's output directory (created) and its model."""
    from ..model import loading as models

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from .groups import load_kwargs

    return out, models.load_model(args.model, verbose=True, **load_kwargs(args))


def demo_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the unset ``model``, ``limit``, ``out``, ``methods`` filled for the demo it asks for.

    Args:
        args: the ``demo`` subparser's namespace (``languages`` picks the language experiment).

    Returns:
        The same namespace, filled in.

    Example:
        >>> demo_defaults(argparse.Namespace(languages=True, model=None, limit=None, out=None, methods=None)).model
        'gemma3-270m'
    """
    lang = bool(getattr(args, "languages", False))
    for key, english, languages in (("model", "smollm2", "gemma3-270m"), ("limit", 6, 1),
                                    ("out", "runs/demo", "runs/demo-languages"),
                                    ("methods", ",".join(DEMO_METHODS), ",".join(LANGUAGE_METHODS))):
        if getattr(args, key, None) is None:
            setattr(args, key, languages if lang else english)
    return args


def demo_languages(args: argparse.Namespace, pool: Sequence[Query]) -> list[str]:
    """The languages the languages demo runs: ``args.langs`` (comma-separated), checked, or all of ``pool``'s.

    Args:
        args: the ``demo`` namespace; ``langs`` is None (all) or e.g. ``"en,fr,zh"``.
        pool: the built-in language queries.

    Returns:
        The languages, in ``pool``'s order.

    Example:
        >>> from qrnca_lens.data.queries import load_data
        >>> demo_languages(argparse.Namespace(langs="zh,en"), load_data("builtin:languages"))
        ['en', 'zh']
    """
    have = list(dict.fromkeys(q.language for q in pool if q.language))
    if getattr(args, "langs", None) is None:
        return have
    asked = [x.strip() for x in args.langs.split(",") if x.strip()]
    unknown = [x for x in asked if x not in have]
    if not asked or unknown:
        raise QrncaError(f"--langs {args.langs!r}: {'no language given' if not asked else f'unknown {unknown}'}; "
                         f"builtin:languages has {','.join(have)}")
    return [x for x in have if x in asked]


def _demo_competence(model: Any, out: Path, name: str, per: int) -> None:
    """Stage 1 of the English demo: accuracy on every ``DEMO_COMPETENCE`` pair, written to ``out/accuracy.json``."""
    from ..data.prompts import ProxyConfig
    from ..data.queries import limit_per_group, load_data
    from ..engine.scoring import accuracy
    from ..qrnca.store import write_json_atomic

    print(f"\n== 1. Is the model competent on each proxy? (accuracy over prompts, first {per} queries per group; "
          "--competence-per-group 10 for the full check)")
    rows = []
    for data, proxy in DEMO_COMPETENCE:
        pool = load_data(data)
        res = accuracy(model, limit_per_group(pool, per), ProxyConfig.from_dict({"kind": proxy}), pool=pool,
                       progress=True)
        row = res.to_dict()
        row["proxy_config"] = row.pop("proxy")  # keep the full config; "proxy" names the proxy
        rows.append({"data": data, "proxy": proxy, **row})
    write_json_atomic(out / "accuracy.json", {"model": name, "runs": rows})
    for r in rows:
        chance = f"{r['chance']:.2f}" if r["chance"] is not None else "-"
        print(f"  {r['data']:<16} {r['proxy']:<12} accuracy {r['accuracy']:.3f}  chance {chance:<5} "
              f"mean p(target) {r['mean_target_prob']:.3f}  n {r['n']}")


def cmd_demo(args: argparse.Namespace) -> int:
    """Competence on every proxy, then QRNCA on the proxy the model is competent at, proved and reported.

    With ``args.languages`` it runs ``cmd_demo_languages`` instead.

    Args:
        args: ``model``, ``limit`` (queries per relation), ``out`` (results and report), ``methods``
            (comma-separated locators), ``competence_per_group`` (queries per group scored by the
            competence check: 3 by default, 10 for the full check), ``ground_truth_queries`` (queries per
            relation judged against exact single-neuron ablations; 0 skips it).

    Returns:
        0; everything is written under ``args.out``.
    """
    args = demo_defaults(args)
    if getattr(args, "languages", False):
        return cmd_demo_languages(args)
    from ..data.prompts import ProxyConfig
    from ..data.queries import limit_per_group, load_data
    from ..evaluation.judge import EvalConfig, evaluate
    from ..qrnca.ig import IGConfig
    from ..qrnca.locate import LocateConfig, locate
    from ..qrnca.store import write_json_atomic
    from ..render.report import write_report

    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    lap = _lap(stages)
    out, model = _start(args)
    t = lap("load model", t0)

    per = args.competence_per_group
    _demo_competence(model, out, args.model, per)
    t = lap("competence", t)

    print(f"\n== 2. QRNCA on builtin:facts with the cloze proxy ({args.limit} queries per relation)")
    pool = load_data("builtin:facts")
    queries = limit_per_group(pool, args.limit)
    run_dir = out / "facts-cloze"
    cfg = LocateConfig(proxy=ProxyConfig("cloze"), ig=IGConfig(steps=16))
    allow = bool(getattr(args, "allow_dtype_change", False))
    run = locate(model, queries, cfg, pool=pool, out=run_dir, name=args.model, data="builtin:facts",
                 allow_dtype_change=allow)
    assert run is not None
    print_summary(run, run_dir / "neurons.json")
    t = lap("locate", t)

    gtq = args.ground_truth_queries
    print("\n== 3. Prove them: boost/suppress against unrelated queries, editing, free-form, the other locators"
          + (f", and ground truth (exact single-neuron ablations, {gtq} quer{'y' if gtq == 1 else 'ies'} per relation)"
             if gtq else ""))
    methods = tuple(m for m in args.methods.split(",") if m)
    verdict = evaluate(model, run, queries, pool, EvalConfig(methods=methods, ground_truth=gtq > 0,
                                                             ground_truth_queries=gtq or None),
                       allow_dtype_change=allow)
    # evaluate wrote run_dir/evaluation.json (the run has a directory)
    print(verdict.table())
    t = lap("evaluate", t)

    print("\n== 4. The report: maps, vocabulary projections, the table, circuitsvis views (one offline file)")
    report = write_report(run_dir, model, queries=queries, pool=pool)
    lap("report", t)
    stages["total"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(out / "timings.json", {"seconds": stages, "competence_per_group": per})
    print(f"\ndemo finished in {stages['total']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in stages.items() if k != 'total')})")
    print(f"report: {report.resolve()}")
    return 0


def cmd_demo_languages(args: argparse.Namespace) -> int:
    """The paper's language half on the embedded multilingual model: competence per language, QRNCA, maps.

    ``builtin:languages`` (7 languages x 5 relations, parallel facts) with the cloze proxy, grouped by language:
    each language's competence first (the report marks languages at chance), then ``locate`` on ``limit``
    queries per (relation, language), ``evaluate`` by language, and the report's language maps.

    Args:
        args: ``model`` (default ``gemma3-270m`` for this demo), ``limit`` (queries per relation and language),
            ``out`` (results and report), ``methods`` (comma-separated locators; default ``LANGUAGE_METHODS``).

    Returns:
        0; everything is written under ``args.out``.
    """
    from ..data.prompts import ProxyConfig
    from ..data.queries import limit_per_group, load_data
    from ..engine.scoring import accuracy
    from ..evaluation.judge import EvalConfig, evaluate
    from ..qrnca.ig import IGConfig
    from ..qrnca.locate import LocateConfig, locate
    from ..qrnca.store import write_json_atomic
    from ..render.report import write_report

    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    lap = _lap(stages)
    out, model = _start(args)
    t = lap("load model", t0)
    pool = load_data("builtin:languages")
    langs = demo_languages(args, pool)
    queries = [q for q in limit_per_group(pool, args.limit) if q.language in langs]
    proxy = ProxyConfig("cloze")

    print(f"\n== 1. Which languages does {args.model} know? (cloze top-1 over prompts, {len(queries)} queries)")
    res = accuracy(model, queries, proxy, pool=pool, progress=True)
    row = {"data": "builtin:languages", **res.to_dict()}
    row["proxy_config"] = row.pop("proxy")
    row["proxy"] = "cloze"
    write_json_atomic(out / "accuracy.json", {"model": args.model, "runs": [row]})
    by_lang: dict[str, list[float]] = {}
    for g, r in res.per_group.items():
        by_lang.setdefault(g.rsplit("-", 1)[-1], []).append(float(r["accuracy"]))
    print("  " + "  ".join(f"{lang} {sum(v) / len(v):.2f}" for lang, v in by_lang.items()))
    t = lap("competence", t)

    print(f"\n== 2. QRNCA on builtin:languages, cloze, {args.limit} queries per relation and language, "
          "mapped by language")
    run_dir = out / "languages-cloze"
    allow = bool(getattr(args, "allow_dtype_change", False))
    run = locate(model, queries, LocateConfig(proxy=proxy, ig=IGConfig(steps=16)), pool=pool, out=run_dir,
                 name=args.model, data="builtin:languages", group_by="language", allow_dtype_change=allow)
    assert run is not None
    print_summary(run, run_dir / "neurons.json")
    t = lap("locate", t)

    print("\n== 3. Prove them by language: controls from other languages")
    methods = tuple(m for m in args.methods.split(",") if m)
    verdict = evaluate(model, run, queries, pool, EvalConfig(methods=methods, group_by="language"),
                       allow_dtype_change=allow)
    # evaluate wrote run_dir/evaluation.json (the run has a directory)
    print(verdict.table())
    t = lap("evaluate", t)

    print("\n== 4. The report: language maps (QR neurons per language, layers, heatmaps, overlaps, competence)")
    report = write_report(run_dir, model, queries=queries, pool=pool, group_by="language")
    lap("report", t)
    stages["total"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(out / "timings.json", {"seconds": stages})
    print(f"\nlanguages demo finished in {stages['total']:.0f} s")
    print(f"report: {report.resolve()}")
    return 0
