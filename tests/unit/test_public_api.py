"""The public API: everything in __all__ resolves, importing stays light, and a failed call leaves no trace."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch


def test_every_export_resolves():
    import qrnca_lens as ql

    missing = [n for n in ql.__all__ if n != "__version__" and getattr(ql, n, None) is None]
    assert missing == []


def test_import_is_lazy():
    code = "import sys, qrnca_lens; print(any(m in sys.modules for m in ('torch', 'pandas', 'matplotlib', 'circuitsvis')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_functions_named_like_their_module_stay_functions():
    """ql.locate is the dispatcher even after a module of that name was imported (its old path, or an export)."""
    code = """
import importlib, pkgutil, types
import qrnca_lens as ql
import warnings
ql.LocateConfig                                    # loads qrnca_lens.qrnca.locate first, through another name
for m in pkgutil.walk_packages(ql.__path__, "qrnca_lens."):
    importlib.import_module(m.name)
with warnings.catch_warnings():                    # the old module path, bound as the package attribute
    warnings.simplefilter("ignore", DeprecationWarning)
    import qrnca_lens.locate
modules = sorted(n for n in ql.__all__ if isinstance(getattr(ql, n), types.ModuleType))
print(modules, callable(ql.locate), ql.locate is importlib.import_module("qrnca_lens.locators.registry").locate)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[-2] == "[] True True"


# ---------------------------------------------------------------- a failed call leaves the model as it was


class Boom(RuntimeError):
    pass


@pytest.fixture(scope="module")
def sweep_setup(tiny_llama):
    import qrnca_lens as ql

    pool = ql.load_data("builtin:facts")
    queries = pool[:1] + [q for q in pool if q.group != pool[0].group][:1]
    proxy = ql.ProxyConfig("cloze", n_prompts=2, n_shots=1)
    # Two queries: ICA (ln 2/2 = 0) and common-neuron removal would leave no neuron, and nothing to hook.
    cfg = ql.LocateConfig(proxy, ql.IGConfig(steps=2), ql.SelectionConfig(use_ica=False, remove_common=False))
    run = ql.locate(tiny_llama, queries, cfg, pool=pool, progress=False)
    assert all(run.qr_neurons(q.id) for q in queries)
    prompts = ql.build_prompts(queries[0], proxy, tiny_llama.tokenizer, pool=pool)
    return pool, queries, proxy, run, prompts


def _public_calls(model, pool, queries, proxy, run, prompts):
    """Every public call that runs the model: name -> (thunk, attaches hooks of its own, freezes parameters)."""
    import qrnca_lens as ql

    tokens = torch.tensor([list(prompts[0].tokens)])

    def in_context(cm):
        def call():
            with cm(model, [(1, 2), (2, 5)]), torch.no_grad():
                model(tokens)
        return call

    return {
        "attribute_prompt": (lambda: ql.attribute_prompt(model, prompts[0], ql.IGConfig(steps=2)), True, True),
        "attribute_prompt-reference": (
            lambda: ql.attribute_prompt(model, prompts[0], ql.IGConfig(steps=2, method="reference")), True, True),
        "attribute_prompts": (lambda: ql.attribute_prompts(model, prompts, ql.IGConfig(steps=2)), True, True),
        "boost": (in_context(ql.boost), True, False),
        "suppress": (in_context(ql.suppress), True, False),
        "intervene": (in_context(lambda m, n: ql.intervene(m, n, 3.0, every_position=True)), True, False),
        "accuracy": (lambda: ql.accuracy(model, queries, proxy, pool=pool), False, False),
        "score_prompts": (lambda: ql.score_prompts(model, prompts), False, False),
        "locate": (lambda: ql.locate(model, queries, ql.LocateConfig(proxy, ql.IGConfig(steps=2)), pool=pool,
                                     progress=False), True, True),
        "evaluate": (lambda: ql.evaluate(model, run, queries, pool, ql.EvalConfig(methods=("qrnca", "random"),
                                                                                  n_boot=10), progress=False),
                     True, False),
        "lens_locate": (lambda: ql.lens_locate(model, queries, proxy, pool=pool, top_k=3, progress=False),
                        True, False),
        "atp_scores": (lambda: ql.atp_scores(model, prompts), True, True),
        "dla_scores": (lambda: ql.dla_scores(model, prompts), True, False),
    }


CALLS = ("attribute_prompt", "attribute_prompt-reference", "attribute_prompts", "boost", "suppress", "intervene",
         "accuracy", "score_prompts", "locate", "evaluate", "lens_locate", "atp_scores", "dla_scores")


@pytest.mark.parametrize("name", CALLS)
@pytest.mark.parametrize("when", ["first forward", "while hooked", "while parameters are frozen"])
def test_a_call_that_fails_mid_forward_leaves_no_hook_and_no_grad_flag(tiny_llama, sweep_setup, name, when):
    """An exception inside any public call: no hook is left and every requires_grad is what it was."""
    from qrnca_lens.model.hooks import active_hook_count

    model = tiny_llama
    call, attaches_hooks, freezes = _public_calls(model, *sweep_setup)[name]
    if when == "while hooked" and not attaches_hooks:
        pytest.skip(f"{name} attaches no hook of its own")
    if when == "while parameters are frozen" and not freezes:
        pytest.skip(f"{name} leaves requires_grad alone")
    params = list(model.parameters())
    flags = [i % 3 == 0 for i in range(len(params))]  # a pattern the call must give back, not just all-False
    for p, f in zip(params, flags):
        p.requires_grad_(f)
    # The saboteur sits on the transformers module under layer 1's MLP, not on a TL hook point: the fast
    # paths refuse a caller's hook points (the test below for that is in test_half_precision.py).
    point = model.original_model.model.layers[1].mlp
    base = active_hook_count(model)

    def saboteur(module, args, output):
        # Raise inside the forward pass: at once, once the call has hooks of its own attached, or once it
        # has switched parameter gradients off (IG takes gradients of activations only).
        if (when == "first forward" or (when == "while hooked" and active_hook_count(model) > base)
                or (when == "while parameters are frozen" and [p.requires_grad for p in params] != flags)):
            raise Boom("mid-forward")

    handle = point.register_forward_hook(saboteur)
    try:
        with pytest.raises(Boom):
            call()
        assert active_hook_count(model) == base
        assert [p.requires_grad for p in params] == flags
    finally:
        handle.remove()
        for p in params:
            p.requires_grad_(False)


# ---------------------------------------------------------------- docstrings of the public API


def _missing_sections(obj) -> list[str]:
    """What the docstring rule finds missing: Args:/Returns:/Example for a function, Example for a class."""
    import inspect

    doc = inspect.getdoc(obj) or ""
    wanted = ("Example",) if inspect.isclass(obj) else ("Args:", "Returns:", "Example")
    return [key for key in wanted if key not in doc]


def test_every_export_documents_args_returns_and_an_example():
    """Every exported function has Args:, Returns: and an Example; every exported class an Example."""
    import inspect

    import qrnca_lens as ql

    missing = {}
    for name in ql.__all__:
        obj = getattr(ql, name)
        if not name.startswith("__") and (inspect.isfunction(obj) or inspect.isclass(obj)):
            if _missing_sections(obj):
                missing[name] = _missing_sections(obj)
    assert missing == {}


def test_the_docstring_rule_reports_missing_sections():
    def bare() -> None:
        """Only a summary."""

    class Bare:
        """Args: and Returns: are not asked of a class."""

    def documented() -> None:
        """Summary.

        Args:
            none.

        Returns:
            None.

        Example:
            >>> documented()
        """

    assert _missing_sections(bare) == ["Args:", "Returns:", "Example"]
    assert _missing_sections(Bare) == ["Example"]
    assert _missing_sections(documented) == []


# Modules whose examples run (the others' need a model or a run, and are marked +SKIP). selection's doctests
# run in tests/test_selection.py; pytest is not configured with --doctest-modules, so nothing else runs these.
DOCTEST_MODULES = (
    "_legacy", "cli", "cli.args", "cli.commands", "config", "data.prompts", "data.queries", "engine.plan",
    "errors", "evaluation.judge", "evaluation.metrics", "engine.scoring", "lens", "lens.config",
    "locators.registry", "model.hooks", "model.loading", "neurons", "qrnca.ig", "qrnca.locate", "qrnca.store",
    "render", "render.analysis", "render.figures", "render.views", "versions",
)


@pytest.mark.parametrize("module", DOCTEST_MODULES)
def test_docstring_examples_run(module):
    import doctest
    import importlib

    mod = importlib.import_module(f"qrnca_lens.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"qrnca_lens.{module} has no running example: drop it from DOCTEST_MODULES"
    assert result.failed == 0
