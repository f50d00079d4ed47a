"""The verdict of ``evaluate``: ``EvaluationResult``, its typed parts, and its one comparison table of locators.

Rows are locators; columns are what a reviewer asks first: PCR after boosting (x2) and suppressing (x0) with
95% bootstrap intervals, editing flip rates, the free-form log-likelihood drop, agreement with exact
single-neuron ablations (ground truth), how much of a boost follows the option letter rather than the
content (the symbol-binding control, letter MCQA only), and cost. ``comparison_rows`` builds the rows once;
``table()`` (text), ``to_dataframe()``, ``_repr_html_`` and the report's HTML table all read them, so they
cannot disagree.

The parts that other modules fill are typed: ``ground_truth`` (``GroundTruthPart``), ``symbol_binding``
(``SymbolBindingPart``), ``free_form`` (``FreeFormPart``), ``costs`` (``{method: LocatorCost}``) and
``timings`` (``StageTimings``: the seconds of each stage of ``evaluate``, the last note of ``table()``). Each
is built from the plain dict evaluation.json holds, in the constructor and on assignment
(``res.costs = {...}`` converts), and each still reads as that dict (``res.free_form["qrnca"]["loglik_drop"]``),
so evaluation.json keeps its format and files written before the parts were typed (or timed) load as they are.

Example:
    >>> res = EvaluationResult(pcr={"qrnca": {"boost": 3.0, "suppress": 2.0, "mean_neurons": 12.0}},
    ...                        editing={"qrnca": {"boost": 0.5, "suppress": 0.25}}, per_group={},
    ...                        costs={"qrnca": {"passes": 0, "seconds_per_query": 0.01}})
    >>> comparison_rows(res)[0]["pcr_boost"], comparison_rows(res)[0]["edit_suppress"]
    (3.0, 0.25)
    >>> res.costs["qrnca"].passes, res.costs["qrnca"]["seconds_per_query"]
    (0, 0.01)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar, overload

from ..config import VERSION_KEY, Config, _plain, type_hints
from ..errors import QrncaError, StoreError
from ..html import esc, html_fmt, html_table

__all__ = [
    "EvaluationResult", "comparison_rows", "COLUMNS", "EVALUATION_FILE",
    "GroundTruthPart", "GroundTruthScores", "SymbolBindingPart", "BindingScores", "FreeFormPart", "FreeFormScores",
    "LocatorCost", "StageTimings", "interval", "comparison_table", "with_ci",
]

EVALUATION_FILE = "evaluation.json"

# (key, header, format): the comparison table's columns, in order.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("pcr_boost", "PCR boost", "{:.2f}"),
    ("pcr_suppress", "PCR suppress", "{:.2f}"),
    ("edit_boost", "edit boost", "{:.1%}"),
    ("edit_suppress", "edit suppr.", "{:.1%}"),
    ("free_form_drop", "free-form drop", "{:+.3f}"),
    ("gt_precision", "GT P@k", "{:.2f}"),
    ("gt_recall", "GT R@k", "{:.2f}"),
    ("gt_spearman", "GT rho", "{:+.2f}"),
    ("gt_false_negative_rate", "GT FN", "{:.2f}"),
    ("content_share", "content share", "{:.2f}"),
    ("seconds_per_query", "s/query", "{:.2f}"),
    ("passes_per_prompt", "passes/prompt", "{:.0f}"),
    ("mean_neurons", "neurons", "{:.1f}"),
)
# Columns shown with their 95% interval; the interval sits in the PCR entry as "<boost|suppress>_ci".
INTERVALS = ("pcr_boost", "pcr_suppress")


# ---------------------------------------------------------------- typed parts


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return type_hints(cls)  # once per class: parts are built by the hundred (one per method and query)


def _is_number_hint(hint: Any) -> bool:
    args = set(typing.get_args(hint)) - {type(None)}
    return bool(args) and args <= {int, float} and type(None) in typing.get_args(hint)


@dataclass(frozen=True, eq=False, repr=False)
class _Part(Config, Mapping[str, Any]):
    """A typed part of an evaluation that also reads as the dict evaluation.json holds for it.

    ``part["key"]``, ``part.get``, ``in``, iteration and ``==`` against a dict work as on that dict (code
    written against the dicts keeps working); keys this version does not name ride along in ``extra`` and
    are written back, so a file from a newer qrnca-lens loads and saves without losing them. A top-level part
    that measured nothing is empty: it reads and writes as ``{}`` and is falsy.
    """

    # Part fields holding {key: part} (depth 1) or {key: {key: part}} (depth 2), converted on construction.
    _nested: ClassVar[dict[str, tuple[type[_Part], int]]] = {}
    _empty_is_absent: ClassVar[bool] = False

    # Keyword-only, so that it comes after every part's own fields in the constructor.
    extra: dict[str, Any] = field(default_factory=dict, kw_only=True)

    def __post_init__(self) -> None:
        for name, (cls, depth) in self._nested.items():
            object.__setattr__(self, name, _typed_map(getattr(self, name), cls, depth, f"{type(self).__name__}.{name}"))
        for f in dataclasses.fields(self):
            if isinstance(getattr(self, f.name), list) and f.name in self._tuples():
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        super().__post_init__()

    @classmethod
    def _tuples(cls) -> set[str]:
        return {n for n, h in _hints(cls).items() if typing.get_origin(h) is tuple}

    def validate(self) -> None:
        for name, hint in _hints(type(self)).items():
            value = getattr(self, name, None)
            if _is_number_hint(hint) and value is not None and (
                    isinstance(value, bool) or not isinstance(value, (int, float))):
                raise QrncaError(f"{type(self).__name__}.{name} must be a number or None, got {value!r}")
        if not isinstance(self.extra, Mapping):
            raise QrncaError(f"{type(self).__name__}.extra must be a mapping")

    @classmethod
    def _names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    def _is_empty(self) -> bool:
        for f in dataclasses.fields(self):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if getattr(self, f.name) != default:
                return False
        return True

    def _view(self) -> dict[str, Any]:
        """The evaluation.json dict of this part, its values as held (typed parts stay typed)."""
        if self._empty_is_absent and self._is_empty():
            return {}
        return {**{n: getattr(self, n) for n in self._names()}, **self.extra}

    # ------------------------------------------------------------ read as the dict

    def __getitem__(self, key: str) -> Any:
        return self._view()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._view())

    def __len__(self) -> int:
        return len(self._view())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):  # a field not measured (None) equals one left out of the dict
            def measured(d: Mapping[str, Any]) -> dict[str, Any]:
                return {k: v for k, v in d.items() if v is not None}

            return measured(self.to_dict()) == measured(_plain(dict(other)))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = [f"{n}={getattr(self, n)!r}" for n in self._names()] + ([f"extra={self.extra!r}"] if self.extra else [])
        return f"{type(self).__name__}({', '.join(shown)})"

    # ------------------------------------------------------------ the evaluation.json form

    def to_dict(self) -> dict[str, Any]:
        """The dict evaluation.json holds for this part (``{}`` for an empty top-level part)."""
        return {k: _plain(v) for k, v in self._view().items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Any:
        """From evaluation.json's dict (or a part, taken as it is); keys this version does not name go to ``extra``."""
        if isinstance(d, cls):
            return d
        if not isinstance(d, Mapping):
            raise QrncaError(f"{cls.__name__}.from_dict needs a mapping, got {type(d).__name__}")
        names = cls._names()
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k != VERSION_KEY}
        return cls(**known, extra=extra)


def _typed_map(value: Any, cls: type[_Part], depth: int, where: str) -> dict[str, Any]:
    """``{key: cls}`` (depth 1) or ``{key: {key: cls}}`` (depth 2) from plain dicts."""
    if not isinstance(value, Mapping):
        raise QrncaError(f"{where} must be a mapping, got {type(value).__name__}")
    out = {}
    for k, v in value.items():
        if depth > 1:
            out[k] = _typed_map(v, cls, depth - 1, f"{where}[{k!r}]")
        elif isinstance(v, Mapping):
            out[k] = cls.from_dict(v)
        else:
            raise QrncaError(f"{where}[{k!r}] must be a mapping, got {type(v).__name__}")
    return out


@dataclass(frozen=True, eq=False, repr=False)
class GroundTruthScores(_Part):
    """One locator against exact single-neuron ablations: each metric's mean over the queries where it is
    defined (None where it never is), and per metric how many queries those were (``n_queries``).

    Example:
        >>> GroundTruthScores.from_dict({"precision": 0.4, "recall": 0.3}).precision
        0.4
    """

    precision: float | None = None
    recall: float | None = None
    spearman: float | None = None
    false_negative_rate: float | None = None
    n_ranked: float | None = None
    n_queries: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, eq=False, repr=False)
class GroundTruthPart(_Part):
    """``evaluate``'s ground truth: a ``GroundTruthResult.to_dict()`` with ``methods`` typed.

    ``queries[qid]`` is kept as ``GroundTruthResult`` describes it (candidates, effects, true top-k, each
    locator's metrics on that query). Empty (``{}``) when ground truth was not asked for.

    Example:
        >>> gt = GroundTruthPart.from_dict({"k": 50, "methods": {"qrnca": {"precision": 0.4}}})
        >>> gt.k, gt.methods["qrnca"].precision, gt["methods"]["qrnca"]["precision"]
        (50, 0.4, 0.4)
    """

    _nested: ClassVar[dict[str, tuple[type[_Part], int]]] = {"methods": (GroundTruthScores, 1)}
    _empty_is_absent: ClassVar[bool] = True

    k: int | None = None
    seed: int | None = None
    factors: tuple[float, ...] = ()
    layers: tuple[int, ...] = ()
    exhaustive: bool | None = None
    queries: dict[str, dict[str, Any]] = field(default_factory=dict)
    methods: dict[str, GroundTruthScores] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False, repr=False)
class BindingScores(_Part):
    """The symbol-binding control's numbers for one method (or one method and query): ``binding_summary``'s
    plus ``mean_delta_original``; ``flag`` says why ``content_share`` is None where it is.

    Example:
        >>> BindingScores.from_dict({"content_share": 0.8}).content_share
        0.8
    """

    content_share: float | None = None
    content_wins: float | None = None
    mean_delta_new: float | None = None
    mean_delta_old: float | None = None
    mean_preference_shift: float | None = None
    n_prompts: int | None = None
    n_moved: int | None = None
    flag: str | None = None
    mean_delta_original: float | None = None


@dataclass(frozen=True, eq=False, repr=False)
class SymbolBindingPart(_Part):
    """``evaluate``'s symbol-binding control: a ``SymbolBindingResult.to_dict()`` with the summaries typed.
    Empty (``{}``) where the control does not apply (not letter MCQA) or was switched off.

    Example:
        >>> sb = SymbolBindingPart.from_dict({"per_method": {"qrnca": {"content_share": 0.8}}})
        >>> sb.per_method["qrnca"].content_share, bool(SymbolBindingPart())
        (0.8, False)
    """

    _nested: ClassVar[dict[str, tuple[type[_Part], int]]] = {"per_method": (BindingScores, 1),
                                                             "per_query": (BindingScores, 2)}
    _empty_is_absent: ClassVar[bool] = True

    per_method: dict[str, BindingScores] = field(default_factory=dict)
    per_query: dict[str, dict[str, BindingScores]] = field(default_factory=dict)
    per_prompt: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False, repr=False)
class FreeFormScores(_Part):
    """One method's neurons zeroed at every position: the answer's mean log-likelihood drop and the greedy
    exact match after.

    Example:
        >>> FreeFormScores.from_dict({"loglik_drop": 0.7}).loglik_drop
        0.7
    """

    loglik_drop: float | None = None
    exact_match_after: float | None = None


@dataclass(frozen=True, eq=False, repr=False)
class FreeFormPart(_Part):
    """``evaluate``'s free-form check. In evaluation.json the methods sit next to the totals
    (``{"intervention", "n_prompts", "exact_match_before", "<method>": {...}, ..., "drop_ratio"}``); here they
    are ``methods``, and the part still reads as that flat dict (``part["qrnca"]``).

    Example:
        >>> ff = FreeFormPart.from_dict({"qrnca": {"loglik_drop": 0.7}, "random": {"loglik_drop": 0.1},
        ...                              "drop_ratio": 7.0})
        >>> ff.methods["qrnca"].loglik_drop, ff["random"]["loglik_drop"], ff.drop_ratio
        (0.7, 0.1, 7.0)
    """

    _nested: ClassVar[dict[str, tuple[type[_Part], int]]] = {"methods": (FreeFormScores, 1)}
    _empty_is_absent: ClassVar[bool] = True
    _totals: ClassVar[tuple[str, ...]] = ("intervention", "n_prompts", "exact_match_before")

    intervention: str | None = None
    n_prompts: int | None = None
    exact_match_before: float | None = None
    drop_ratio: float | None = None
    methods: dict[str, FreeFormScores] = field(default_factory=dict)

    def _view(self) -> dict[str, Any]:
        if self._is_empty():
            return {}
        return {**{n: getattr(self, n) for n in self._totals}, **self.methods, "drop_ratio": self.drop_ratio,
                **self.extra}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Any:
        if isinstance(d, cls):
            return d
        if not isinstance(d, Mapping):
            raise QrncaError(f"{cls.__name__}.from_dict needs a mapping, got {type(d).__name__}")
        scalars = (*cls._totals, "drop_ratio")
        # A key that is not a total and holds a dict is a method (the flat evaluation.json form).
        methods = {k: FreeFormScores.from_dict(v) for k, v in d.items() if k not in scalars and isinstance(v, Mapping)}
        extra = {k: v for k, v in d.items() if k not in scalars and k not in methods and k != VERSION_KEY}
        return cls(**{k: d[k] for k in scalars if k in d}, methods=methods, extra=extra)


@dataclass(frozen=True, eq=False, repr=False)
class LocatorCost(_Part):
    """What one locator cost (``locators.neuron_sets`` measures it): wall-clock ``seconds`` of the call and
    per query, model ``passes`` (None when the locator does not say) and, for the IG-based ones, the IG
    seconds per query ``locate`` stored (``stored_attribution_seconds``; None for older runs).

    Example:
        >>> LocatorCost.from_dict({"passes": 12, "seconds_per_query": 2.0}).passes
        12
    """

    seconds: float | None = None
    seconds_per_query: float | None = None
    passes: int | float | None = None
    stored_attribution_seconds: float | None = None


@dataclass(frozen=True, eq=False, repr=False)
class StageTimings(_Part):
    """Wall-clock seconds (``time.perf_counter``) of each stage of one ``evaluate`` call; None where the stage
    did not run. ``locate`` is every locator together (each one's own seconds are in ``costs``);
    ``free_form_greedy`` is the greedy decoding inside ``free_form``, not a stage of its own; ``total`` is
    the whole call before evaluation.json is written. Empty (``{}``) in files written before it was measured.

    Example:
        >>> t = StageTimings(locate=2.0, scored_rows=1.0, free_form=0.5, free_form_greedy=0.25, total=3.6)
        >>> t.stages()
        {'locate': 2.0, 'scored_rows': 1.0, 'free_form': 0.5}
        >>> t.line()
        'seconds: total 3.60; locate 2.00, scored rows 1.00, free form 0.50 (greedy 0.25)'
    """

    _empty_is_absent: ClassVar[bool] = True
    # (field, label) of the stages, in the order evaluate runs them; they do not overlap.
    _stages: ClassVar[tuple[tuple[str, str], ...]] = (
        ("prepare", "prepare"), ("locate", "locate"), ("scored_rows", "scored rows"), ("pcr_editing", "PCR/editing"),
        ("free_form", "free form"), ("neuron_prediction", "neuron prediction"), ("symbol_binding", "symbol binding"),
        ("ground_truth", "ground truth"))

    prepare: float | None = None
    locate: float | None = None
    scored_rows: float | None = None
    pcr_editing: float | None = None
    free_form: float | None = None
    free_form_greedy: float | None = None
    neuron_prediction: float | None = None
    symbol_binding: float | None = None
    ground_truth: float | None = None
    total: float | None = None

    def validate(self) -> None:
        super().validate()
        for name in self._names():
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise QrncaError(f"StageTimings.{name} must be seconds >= 0 or None, got {value!r}")

    def stages(self) -> dict[str, float]:
        """The stages that ran, ``{name: seconds}`` in order: disjoint, so their sum is at most ``total``."""
        return {k: float(getattr(self, k)) for k, _ in self._stages if getattr(self, k) is not None}

    def line(self) -> str:
        """One line: the total, then each stage that ran ("" when nothing was measured)."""
        if self._is_empty():
            return ""
        parts = []
        for k, label in self._stages:
            v = getattr(self, k)
            if v is not None:
                greedy = self.free_form_greedy if k == "free_form" else None
                parts.append(f"{label} {v:.2f}" + (f" (greedy {greedy:.2f})" if greedy is not None else ""))
        head = f"seconds: total {self.total:.2f}" if self.total is not None else "seconds:"
        return f"{head}; {', '.join(parts)}" if parts else head


# ---------------------------------------------------------------- fields that convert what is assigned

P = TypeVar("P")


class _Converted(Generic[P]):
    """A dataclass field that converts any value set on it (a plain dict from evaluation.json, a part, a
    result object with ``to_dict``) with ``convert``; its default (the descriptor itself) means "empty"."""

    def __init__(self, convert: Callable[[Any], P]) -> None:
        self._convert = convert
        self._slot = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._slot = f"_{name}_value"

    @overload
    def __get__(self, obj: None, owner: Any = None) -> _Converted[P]: ...

    @overload
    def __get__(self, obj: object, owner: Any = None) -> P: ...

    def __get__(self, obj: object | None, owner: Any = None) -> Any:
        if obj is None:
            return self  # the dataclass reads this as the default; __set__ makes a fresh empty value of it
        return obj.__dict__[self._slot]

    def __set__(self, obj: object, value: Any) -> None:
        obj.__dict__[self._slot] = self._convert(None if value is self else value)


def _mapping_of(value: Any, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return value
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):  # e.g. a GroundTruthResult or SymbolBindingResult object
        return dict(to_dict())
    raise QrncaError(f"EvaluationResult.{what} must be a dict (as evaluation.json holds it), got {type(value).__name__}")


def _part(cls: type[_Part], what: str) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        return value if isinstance(value, cls) else cls.from_dict(_mapping_of(value, what))

    return convert


def _costs(value: Any) -> dict[str, LocatorCost]:
    return _typed_map(_mapping_of(value, "costs"), LocatorCost, 1, "EvaluationResult.costs")


# ---------------------------------------------------------------- the comparison rows


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _entry(d: Any, key: str) -> Mapping[str, Any]:
    v = d.get(key) if isinstance(d, Mapping) else None
    return v if isinstance(v, Mapping) else {}


def comparison_rows(res: EvaluationResult) -> list[dict[str, Any]]:
    """One dict per locator: every ``COLUMNS`` key (None where not measured) plus the PCR intervals.

    Args:
        res: an evaluation (``evaluate``'s result, or ``EvaluationResult.load`` of evaluation.json).

    Returns:
        Rows in the order the methods were evaluated; ``boost_ci`` / ``suppress_ci`` are ``[low, high]``.

    Example: see the module docstring.
    """
    n_prompts = _num(res.meta.get("n_prompts")) if isinstance(res.meta, Mapping) else None
    rows = []
    for m in dict.fromkeys([*res.pcr, *res.editing]):
        p, cost = _entry(res.pcr, m), res.costs.get(m, LocatorCost())
        passes, seconds = _num(cost.passes), _num(cost.seconds_per_query)
        stored = _num(cost.stored_attribution_seconds)
        if stored is not None:  # an IG-based locator: its cost is the attribution locate ran, not the re-read
            seconds, passes = stored, None
        gt = res.ground_truth.methods.get(m, GroundTruthScores())
        ff = res.free_form.methods.get(m, FreeFormScores())
        sb = res.symbol_binding.per_method.get(m, BindingScores())
        edit = _entry(res.editing, m)
        rows.append({
            "method": m,
            "pcr_boost": _num(p.get("boost")), "boost_ci": p.get("boost_ci"),
            "pcr_suppress": _num(p.get("suppress")), "suppress_ci": p.get("suppress_ci"),
            "edit_boost": _num(edit.get("boost")), "edit_suppress": _num(edit.get("suppress")),
            "free_form_drop": _num(ff.loglik_drop),
            "gt_precision": _num(gt.precision), "gt_recall": _num(gt.recall), "gt_spearman": _num(gt.spearman),
            "gt_false_negative_rate": _num(gt.false_negative_rate),
            "content_share": _num(sb.content_share),
            "seconds_per_query": seconds,
            "passes_per_prompt": passes / n_prompts if passes is not None and n_prompts else None,
            "mean_neurons": _num(p.get("mean_neurons")),
        })
    return rows


def _fmt(x: Any, fmt: str) -> str:
    return "-" if x is None else fmt.format(x)


def interval(ci: Any) -> tuple[float | None, float | None]:
    """``(low, high)`` of a stored ``[low, high]`` interval; None for a bound that is missing or not finite.

    Example:
        >>> interval([1.0, 2.5]), interval(None), interval([float("nan"), 3])
        ((1.0, 2.5), (None, None), (None, 3.0))
    """
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return _num(ci[0]), _num(ci[1])
    return None, None


def _with_ci(x: Any, ci: Any) -> str:
    if x is None:
        return "-"
    lo, hi = interval(ci)
    return f"{x:.2f} [{_fmt(lo, '{:.2f}')}, {_fmt(hi, '{:.2f}')}]"


def _require(module: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise QrncaError(f"{what} needs {package}, which is not installed: pip install {package}") from None


# ---------------------------------------------------------------- the result


@dataclass
class EvaluationResult(Config):
    """evaluation.json as an object: ``table()``, ``to_dataframe()``, ``plot()``, ``save`` / ``load``, notebook display.

    ``pcr`` / ``editing`` / ``neuron_prediction`` are the dicts ``evaluate`` fills (``pcr[m]``: boost, suppress,
    their ``_ci`` intervals and related/unrelated means; ``per_group[g]``: ``{"pcr": {m: ...}, "editing":
    {m: ...}}``). ``ground_truth`` / ``symbol_binding`` / ``free_form`` / ``timings`` are typed parts and
    ``costs`` is ``{method: LocatorCost}``: give them, or assign them, as plain dicts and they convert (see the module
    docstring). ``to_dict`` / ``from_dict`` keep evaluation.json's format (unknown top-level keys refused,
    the version key accepted).

    Example:
        >>> res = EvaluationResult(pcr={"random": {"boost": 1.0, "boost_ci": [0.5, 1.5]}}, editing={}, per_group={})
        >>> res.to_dataframe()[["method", "pcr_boost", "pcr_boost_lo", "pcr_boost_hi"]].values.tolist()
        [['random', 1.0, 0.5, 1.5]]
        >>> res.free_form = {"random": {"loglik_drop": 0.1}}
        >>> res.free_form.methods["random"].loglik_drop
        0.1
    """

    pcr: dict[str, dict[str, Any]]
    editing: dict[str, dict[str, Any]]
    per_group: dict[str, dict[str, Any]]
    free_form: _Converted[FreeFormPart] = _Converted(_part(FreeFormPart, "free_form"))
    neuron_prediction: dict[str, Any] = field(default_factory=dict)
    ground_truth: _Converted[GroundTruthPart] = _Converted(_part(GroundTruthPart, "ground_truth"))
    symbol_binding: _Converted[SymbolBindingPart] = _Converted(_part(SymbolBindingPart, "symbol_binding"))
    costs: _Converted[dict[str, LocatorCost]] = _Converted(_costs)
    meta: dict[str, Any] = field(default_factory=dict)
    timings: _Converted[StageTimings] = _Converted(_part(StageTimings, "timings"))

    # ------------------------------------------------------------ text

    def table(self) -> str:
        """The comparison table as text: one row per locator (``COLUMNS``; "-" where not measured)."""
        rows = comparison_rows(self)
        shown = [c for c in COLUMNS if any(r[c[0]] is not None for r in rows)]
        width = {"pcr_boost": 20, "pcr_suppress": 20}
        head = f"{'method':<12} " + " ".join(f"{h:>{max(width.get(k, 0), len(h))}}" for k, h, _ in shown)
        lines = [head, "-" * len(head)]
        for r in rows:
            cells = []
            for k, h, fmt in shown:
                text = _with_ci(r[k], r[k.replace("pcr_", "") + "_ci"]) if k in width else _fmt(r[k], fmt)
                cells.append(f"{text:>{max(width.get(k, 0), len(h))}}")
            lines.append(f"{r['method']:<12} " + " ".join(cells))
        return "\n".join(lines + self.notes())

    def notes(self) -> list[str]:
        """What the table's less obvious columns mean, for the parts this evaluation holds."""
        notes = []
        budget = self.meta.get("budget_note")
        if budget:
            notes.append(f"neurons per query: {budget}")
        empty = {m: n for m, n in (self.meta.get("n_empty") or {}).items() if n}
        if empty:
            notes.append("left out (no neurons for the query): "
                         + ", ".join(f"{m} {n} of {self.meta.get('n_queries', '?')}" for m, n in empty.items()))
        if self.ground_truth:
            notes.append(f"GT: agreement with exact single-neuron zero-ablation on each query's candidates "
                         f"(union of the locators' top-{self.ground_truth.k} + as many random)")
        if self.costs:
            notes.append("s/query: the locator's seconds per query on this machine (IG-based ones: the attribution "
                         "locate stored); passes/prompt: forward or backward passes over one prompt")
        if self.symbol_binding:
            notes.append("content share: share of a boost's rise that follows the content, not the letter "
                         "(re-lettered options; 1 = content, 0 = letter)")
        if self.timings:
            notes.append(self.timings.line())
        return notes

    def __str__(self) -> str:
        return self.table()

    # ------------------------------------------------------------ tidy frames and a figure

    def to_dataframe(self) -> Any:
        """One row per locator: ``method`` first, then the ``COLUMNS`` (each PCR with ``_lo`` / ``_hi`` columns
        for its 95% interval), then every other scalar PCR number (``pcr_boost_related_mean``, ...). No cell
        holds a list."""
        pd = _require("pandas", "EvaluationResult.to_dataframe")
        base = ["method"]
        for k, _, _ in COLUMNS:
            base += [k, f"{k}_lo", f"{k}_hi"] if k in INTERVALS else [k]
        out, extra_cols = [], dict[str, None]()
        for r in comparison_rows(self):
            row = {"method": r["method"], **{k: r[k] for k, _, _ in COLUMNS}}
            for k in INTERVALS:
                row[f"{k}_lo"], row[f"{k}_hi"] = interval(r[k.replace("pcr_", "") + "_ci"])
            for k, v in _entry(self.pcr, r["method"]).items():
                if k not in ("boost", "suppress", "mean_neurons") and not isinstance(v, (list, tuple, Mapping)):
                    row[f"pcr_{k}"] = v
                    extra_cols[f"pcr_{k}"] = None
            out.append(row)
        return pd.DataFrame(out, columns=base + [c for c in extra_cols if c not in base])

    def per_group_dataframe(self) -> Any:
        """One row per (group, method): the group's PCR boost / suppress, editing rates, then its other PCR
        (``pcr_*``) and editing (``edit_*``) numbers, from ``per_group``.

        Example:
            >>> res = EvaluationResult(pcr={}, editing={}, per_group={"capital": {
            ...     "pcr": {"qrnca": {"boost": 2.0, "suppress": 3.0}}, "editing": {"qrnca": {"boost": 0.5}}}})
            >>> res.per_group_dataframe()[["group", "method", "pcr_boost", "edit_boost"]].values.tolist()
            [['capital', 'qrnca', 2.0, 0.5]]
        """
        pd = _require("pandas", "EvaluationResult.per_group_dataframe")
        base = ["group", "method", "pcr_boost", "pcr_suppress", "edit_boost", "edit_suppress"]
        out, cols = [], dict.fromkeys(base)
        for g, d in self.per_group.items():
            pcr, edit = _entry(d, "pcr"), _entry(d, "editing")
            for m in dict.fromkeys([*pcr, *edit]):
                row: dict[str, Any] = {"group": g, "method": m}
                for prefix, part in (("pcr", _entry(pcr, m)), ("edit", _entry(edit, m))):
                    for k, v in part.items():
                        if not isinstance(v, (list, tuple, Mapping)):
                            row[f"{prefix}_{k}"] = v
                            cols.setdefault(f"{prefix}_{k}")
                out.append(row)
        return pd.DataFrame(out, columns=list(cols))

    def plot(self, ax: Any = None) -> Any:
        """PCR after boosting and after suppressing, one pair of bars per method, with their 95% intervals.

        Args:
            ax: a matplotlib ``Axes`` to draw on (default: a new pyplot figure).

        Returns:
            The ``Axes``: ``ax.containers`` holds the boost bars, then the suppress bars (one bar per method).

        Example:
            >>> ax = res.plot()                          # doctest: +SKIP
            >>> ax.figure.savefig("pcr.png")             # doctest: +SKIP
        """
        _require("matplotlib", "EvaluationResult.plot")
        rows = comparison_rows(self)
        if ax is None:
            plt = _require("matplotlib.pyplot", "EvaluationResult.plot")
            _, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 1.5), 3.2), layout="constrained")
        width = 0.38
        for i, (key, label, color) in enumerate((("pcr_boost", "boost ×2", "#3b7dd8"),
                                                 ("pcr_suppress", "suppress ×0", "#d8663b"))):
            xs = [j + (i - 0.5) * width for j in range(len(rows))]
            vals = [r[key] if r[key] is not None else math.nan for r in rows]
            ax.bar(xs, vals, width, label=label, color=color)
            # The interval as drawn bounds, not as +- offsets: a percentile interval need not contain the estimate.
            cis = [interval(r[key.replace("pcr_", "") + "_ci"]) for r in rows]
            shown = [(x, lo, hi) for x, (lo, hi) in zip(xs, cis) if lo is not None and hi is not None]
            if shown:
                x_ci, lo_ci, hi_ci = zip(*shown)
                ax.vlines(x_ci, lo_ci, hi_ci, color="#222", lw=1.1)
                for y in (lo_ci, hi_ci):
                    ax.hlines(y, [x - width / 6 for x in x_ci], [x + width / 6 for x in x_ci], color="#222", lw=1.1)
        ax.axhline(1.0, color="#888", ls=":", lw=1)  # PCR 1: the neurons move unrelated queries as much as their own
        ax.set_xticks(range(len(rows)), [str(r["method"]) for r in rows])
        ax.set_ylabel("PCR (related / unrelated)")
        ax.set_title("PCR with 95% bootstrap intervals", loc="left")
        ax.legend(frameon=False)
        return ax

    # ------------------------------------------------------------ notebook

    def _repr_html_(self) -> str:
        notes = "<br>".join(_html_escape(n) for n in self.notes())
        n = self.meta.get("n_queries") if isinstance(self.meta, Mapping) else None
        head = f"<b>EvaluationResult</b>{f': {n} queries' if n is not None else ''}"
        return f"<div>{head}{comparison_table(self)}<small>{notes}</small></div>"

    # ------------------------------------------------------------ on disk

    def save(self, out: str | Path) -> Path:
        """Write ``out/evaluation.json`` atomically (with the library version); returns its path.

        Example:
            >>> res.save("runs/facts")                   # doctest: +SKIP
            PosixPath('runs/facts/evaluation.json')
        """
        from ..atomic import write_json_atomic

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        return write_json_atomic(out / EVALUATION_FILE, self.to_record())

    @classmethod
    def load(cls, path: str | Path) -> EvaluationResult:
        """Read an evaluation: a run directory (its ``evaluation.json``) or the file itself.

        Raises:
            StoreError: one line naming the file and what is wrong (missing, not JSON, not an evaluation).

        Example:
            >>> print(EvaluationResult.load("runs/facts").table())   # doctest: +SKIP
        """
        path = Path(path)
        file = path / EVALUATION_FILE if path.is_dir() else path
        if not file.exists():
            raise StoreError(f"{file} does not exist: run `qrnca-lens evaluate` on the run, or save one with "
                             "EvaluationResult.save(DIR)")
        try:
            doc = json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreError(f"{file} is not valid JSON ({e}); rerun `qrnca-lens evaluate` to rewrite it") from None
        try:
            if not isinstance(doc, Mapping):
                raise QrncaError(f"EvaluationResult.from_dict needs a mapping, got {type(doc).__name__}")
            return cls.from_dict(doc)
        except (QrncaError, TypeError) as e:
            why = (str(e).splitlines() or [type(e).__name__])[0]  # one line, whatever raised it
            raise StoreError(f"{file} is not an evaluation.json qrnca-lens can read ({why}); rerun "
                             "`qrnca-lens evaluate` to rewrite it") from None


def _html_escape(s: str) -> str:
    import html

    return html.escape(s)


# ---------------------------------------------------------------- the table as HTML


def with_ci(x: Any, ci: Any) -> str:
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return f"{html_fmt(x, '{:.2f}')} <span class=muted>[{html_fmt(ci[0], '{:.2f}')}, {html_fmt(ci[1], '{:.2f}')}]</span>"
    return html_fmt(x, "{:.2f}")


def comparison_table(res: Any) -> str:
    """The comparison table of an ``EvaluationResult`` as HTML (the report's and the notebook's): one row per
    locator, the ``COLUMNS`` someone measured, PCR with its interval. "" when no locator was judged.

    Example:
        >>> "<b>qrnca</b>" in comparison_table(EvaluationResult(pcr={"qrnca": {"boost": 2.0}}, editing={}, per_group={}))
        True
    """
    comp = comparison_rows(res)
    if not comp:
        return ""
    shown = [c for c in COLUMNS if any(r[c[0]] is not None for r in comp)]
    cells = []
    for r in comp:
        line = [f"<b>{esc(str(r['method']))}</b>"]
        for k, _, fmt in shown:
            ci = r.get(k.replace("pcr_", "") + "_ci") if k in INTERVALS else None
            line.append(with_ci(r[k], ci) if k in INTERVALS else html_fmt(r[k], fmt))
        cells.append(line)
    return html_table(["method"] + [h for _, h, _ in shown], cells, [False] + [True] * len(shown))
