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

from .versions import PACKAGE_VERSION as __version__

# name -> submodule that defines it
_EXPORTS = {
    # errors
    "QrncaError": "errors", "DataError": "errors", "ModelError": "errors", "ProxyError": "errors",
    "StoreError": "errors", "FastPathError": "errors",
    # models
    "load_model": "models", "EMBEDDED_MODELS": "models", "HookedModel": "protocols",
    # data
    "Query": "data", "load_data": "data", "load_jsonl": "data", "load_mlama": "data",
    "load_mmlu_csv": "data", "load_authors_json": "data", "as_queries": "data",
    # proxies
    "ProxyConfig": "proxies", "Prompt": "proxies", "build_prompts": "proxies", "PROXIES": "proxies",
    # hooks
    "hooked": "hooks", "capture": "hooks", "set_neurons": "hooks",
    # scoring
    "accuracy": "scoring", "AccuracyResult": "scoring", "score_prompts": "scoring", "PromptScore": "scoring",
    # attribution
    "IGConfig": "attribution", "attribute_prompt": "attribution", "attribute_prompts": "attribution",
    "reference_ig": "attribution", "resolve_layers": "attribution",
    # selection
    "SelectionConfig": "selection", "Cluster": "selection", "Selection": "selection", "select": "selection",
    "query_cluster": "selection",
    # locate and the run store
    "LocateConfig": "locate", "LocateResult": "locate", "locate": "locate", "reduce": "locate",
    "Located": "located", "RankedResult": "located",
    "RunStore": "store",
    # neuron sets, interventions, locators, evaluation
    "NeuronSet": "neurons",
    "boost": "interventions", "suppress": "interventions", "intervene": "interventions",
    "register_locator": "locators", "LOCATORS": "locators", "Locator": "locators", "LocatorContext": "locators",
    "RankConfig": "locators", "RandomConfig": "locators", "LogprobConfig": "locators",
    # first-order neuron scores (the atp / dla locators)
    "atp_scores": "first_order", "dla_scores": "first_order",
    "EvalConfig": "evaluation", "EvaluationResult": "evaluation", "evaluate": "evaluation",
    "SerialExecutor": "executors", "RayExecutor": "executors",
    # the log-probability-increase lens
    "LensConfig": "lens", "LensResult": "lens", "lens_locate": "lens",
    # grouping by language/relation, maps and the report
    "regroup": "grouping", "group_specificity": "analysis",
    "write_report": "render.report",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


# Public names that are also submodule names (``locate``). Importing ``qrnca_lens.locate`` (directly, or
# through any other export it defines) makes the import system bind the *module* as the package attribute,
# after which ``ql.locate(...)`` fails with "'module' object is not callable". The package's class keeps
# the function there instead; ``from qrnca_lens.locate import ...`` still reaches the module.
_SHADOWED = frozenset(_EXPORTS) & {m.name for m in pkgutil.iter_modules(__path__)}


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            value = getattr(value, name)
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
