"""qrnca-lens: find the neurons a TransformerLens model uses to answer a query, test them, map them.

The public API is listed in ``__all__``; heavy submodules load on first use.

Example:
    >>> import qrnca_lens as ql
    >>> model = ql.load_model("smollm2")                          # doctest: +SKIP
    >>> queries = ql.load_data("builtin:facts", limit=2)
    >>> ql.accuracy(model, queries, ql.ProxyConfig("cloze"))      # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import types
from typing import Any

from . import _legacy
from .versions import PACKAGE_VERSION as __version__

# name -> submodule that defines it
_EXPORTS = {
    # errors
    "QrncaError": "errors", "DataError": "errors", "ModelError": "errors", "ProxyError": "errors",
    "StoreError": "errors", "FastPathError": "errors",
    # models
    "load_model": "model.loading", "EMBEDDED_MODELS": "model.loading", "HookedModel": "protocols",
    # data
    "Query": "data.queries", "load_data": "data.queries", "load_jsonl": "data.queries", "load_mlama": "data.queries",
    "load_mmlu_csv": "data.queries", "load_authors_json": "data.queries", "as_queries": "data.queries",
    # proxies
    "ProxyConfig": "data.prompts", "Prompt": "data.prompts", "build_prompts": "data.prompts", "PROXIES": "data.prompts",
    # hooks
    "hooked": "model.hooks", "capture": "model.hooks", "set_neurons": "model.hooks",
    # scoring
    "accuracy": "engine.scoring", "AccuracyResult": "engine.scoring", "score_prompts": "engine.scoring", "PromptScore": "engine.scoring",
    # attribution
    "IGConfig": "qrnca.ig", "attribute_prompt": "qrnca.ig", "attribute_prompts": "qrnca.ig",
    "reference_ig": "qrnca.ig", "resolve_layers": "qrnca.ig",
    # selection
    "SelectionConfig": "qrnca.selection", "Cluster": "qrnca.selection", "Selection": "qrnca.selection", "select": "qrnca.selection",
    "query_cluster": "qrnca.selection",
    # locate and the run store
    "LocateConfig": "qrnca.locate", "LocateResult": "qrnca.locate", "locate": "locators.registry", "reduce": "qrnca.locate",
    "Located": "located", "RankedResult": "located",
    "RunStore": "qrnca.store",
    # neuron sets, interventions, locators, evaluation
    "NeuronSet": "neurons",
    "boost": "model.interventions", "suppress": "model.interventions", "intervene": "model.interventions",
    "register_locator": "locators.registry", "LOCATORS": "locators.registry", "Locator": "locators.registry", "LocatorContext": "locators.registry",
    "RankConfig": "locators.registry", "RandomConfig": "locators.registry", "LogprobConfig": "locators.registry",
    # first-order neuron scores (the atp / dla locators)
    "atp_scores": "locators.first_order", "dla_scores": "locators.first_order",
    "EvalConfig": "evaluation.judge", "EvaluationResult": "evaluation.judge", "evaluate": "evaluation.judge",
    "SerialExecutor": "qrnca.executors", "RayExecutor": "qrnca.executors",
    # the log-probability-increase lens
    "LensConfig": "lens", "LensResult": "lens", "lens_locate": "lens",
    # grouping by language/relation, maps and the report
    "regroup": "data.grouping", "group_specificity": "render.analysis",
    "write_report": "render.report",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


# Old module paths (``qrnca_lens.locate``, ``qrnca_lens.models``, ...) resolve for one release, with a
# DeprecationWarning (``_legacy``). Importing one binds the *module* as the package attribute of that name, after
# which ``ql.locate(...)`` would fail with "'module' object is not callable": for public names that are also
# (old) module names the package's class keeps the function there instead.
_legacy.install()
_SHADOWED = frozenset(_EXPORTS) & ({m.name for m in pkgutil.iter_modules(__path__)} | set(_legacy.MOVED))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            value = __getattr__(name)  # the public object (``ql.locate`` is the dispatcher, not a module's)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qrnca_lens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
