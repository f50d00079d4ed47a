"""GPU readiness without a GPU: every tensor constructor in the package names its device, or is allowed here.

On a CPU machine a tensor created without ``device=`` lands on the model's device by luck; on CUDA the same
line raises "Expected all tensors to be on the same device" (or silently copies every chunk). The check is
static (the package's AST), so it sees code paths the tests do not run: a ``torch.tensor/zeros/ones/arange/
full/empty/rand*/linspace/eye/...`` call with no ``device=`` keyword and not immediately ``.to(...)``-ed must
be listed in ``ALLOWED`` with the reason it is on the CPU on purpose. A new constructor without a device
fails the test; so does an entry that no longer matches code (the list stays honest).
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import qrnca_lens

FACTORIES = frozenset({
    "tensor", "as_tensor", "zeros", "ones", "arange", "full", "empty", "randn", "rand", "randint", "randperm",
    "linspace", "logspace", "eye", "normal", "from_numpy", "asarray", "empty_strided", "tril_indices",
    "triu_indices",
})

# (file, enclosing function, factory) -> why it is on the CPU by design. Each entry may cover several calls.
ALLOWED: dict[tuple[str, str, str], str] = {
    # results and bookkeeping that live on the host
    ("qrnca/ig.py", "alphas", "linspace"): "returns the CPU schedule; every caller moves it with .to(device)",
    ("qrnca/ig.py", "alphas", "arange"): "returns the CPU schedule; every caller moves it with .to(device)",
    ("locators/first_order.py", "atp_scores", "zeros"): "the result table, float32 on the CPU (documented)",
    ("evaluation/ground_truth.py", "neuron_effects", "tensor"): "host floats from the engine's reductions, CPU results",
    ("evaluation/ground_truth.py", "candidate_neurons", "randperm"): "CPU generator for a seeded draw of neuron ids",
    ("locators/registry.py", "_random", "randperm"): "CPU generator for a seeded draw of neuron ids",
    ("bench/ig.py", "_neuron_sets", "randperm"): "CPU generator; indexes the CPU score table",
    ("lens/baselines.py", "compare_methods", "randperm"): "CPU generator for a seeded draw of neuron ids",
    ("lens/baselines.py", "baseline_scores", "empty"): "result tables on the CPU; filled from .cpu() blocks",
    ("lens/exact.py", "neuron_scores", "empty"): "result table on the CPU; filled from .cpu() blocks",
    ("lens/exact.py", "score_neurons", "empty"): "result table on the CPU; filled from .cpu() blocks",
    ("lens/exact.py", "score_neurons", "as_tensor"): "the caller's neuron ids; moved with .to(W_out.device) before use",
    ("lens/heads.py", "attention_source_scores", "empty"): "result table on the CPU; filled from .cpu() rows",
    ("qrnca/selection.py", "cluster_counts", "zeros"): "counts over stored CPU scores",
    ("qrnca/selection.py", "drop_neurons", "tensor"): "mask over a CPU cluster",
    ("qrnca/selection.py", "dense", "zeros"): "a CPU cluster's dense table",
    ("qrnca/selection.py", "empty", "zeros"): "an empty CPU cluster",
    ("qrnca/selection.py", "na", "zeros"): "an empty CPU cluster",
    ("qrnca/selection.py", "from_dict", "tensor"): "a cluster read from JSON (CPU)",
    ("neurons.py", "to_tensor", "tensor"): "the neuron set as data (CPU); model code moves what it indexes with",
    ("render/views.py", "_forward", "zeros"): "an empty host array for numpy",
    ("render/views.py", "target_view", "tensor"): "host tokens for circuitsvis; the forward gets .to(model_device)",
    ("model/interventions.py", "resolve_positions", "as_tensor"): "the caller's own mask/tokens, on the caller's device "
                                                            "(as_tensor keeps a tensor where it is)",
    # index tensors: a CUDA tensor may be indexed by CPU long tensors (PyTorch moves them; no device error)
    ("render/analysis.py", "project_neurons", "tensor"): "CPU index into W_out rows (allowed on CUDA tensors)",
    ("lens/baselines.py", "baseline_scores", "arange"): "CPU row index next to a device target index",
    ("lens/baselines.py", "_ablation_hooks", "as_tensor"): "read back with .tolist() at once",
    ("lens/exact.py", "_first_order", "arange"): "CPU row index into a device tensor",
    # built on the host, then moved to the device in the next statement
    ("model/access.py", "pad_batch", "full"): "filled on the host, returned .to(device)",
    ("model/access.py", "pad_batch", "tensor"): "filled on the host, returned .to(device)",
    ("engine/prefix.py", "_batch", "full"): "layout maps filled on the host, then .to(self.device)",
    ("engine/prefix.py", "_batch", "arange"): "fills a host layout map",
    ("engine/prefix.py", "_full", "tensor"): "layout maps built on the host, then .to(device)",
    ("engine/prefix.py", "_intervention_hooks", "ones"): "host factor rows, moved in the hook per chunk (see the "
                                                         "per-chunk host reads in the README's Limits)",
}


def _package_root() -> Path:
    return Path(qrnca_lens.__file__).parent


def _offenders(root: Path) -> Counter[tuple[str, str, str]]:
    """(file, enclosing function, factory) of every device-less ``torch.<factory>(...)`` not chained ``.to(...)``."""
    found: Counter[tuple[str, str, str]] = Counter()
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and node.func.attr in FACTORIES):
                continue
            if any(k.arg == "device" or k.arg is None for k in node.keywords):  # device= or **kwargs
                continue
            up = parent.get(node)
            if isinstance(up, ast.Attribute) and up.attr in ("to", "cuda"):
                continue
            fn: ast.AST = node
            while fn in parent and not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                fn = parent[fn]
            name = fn.name if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) else "<module>"
            found[(path.relative_to(root).as_posix(), name, node.func.attr)] += 1
    return found


def test_every_tensor_constructor_names_its_device_or_is_allowed():
    found = _offenders(_package_root())
    new = sorted(set(found) - set(ALLOWED))
    assert not new, (
        "tensor constructors without device= (on CUDA they land on the CPU next to the model's tensors): "
        + "; ".join(f"{f}:{fn} torch.{fac}" for f, fn, fac in new)
        + ". Pass device=model_device(model) (or the tensor's .device), or add the call to ALLOWED with the reason"
    )
    stale = sorted(set(ALLOWED) - set(found))
    assert not stale, f"ALLOWED entries with no matching call any more (remove them): {stale}"


def test_the_scan_catches_a_deviceless_constructor(tmp_path):
    (tmp_path / "m.py").write_text(
        "import torch\n"
        "def f(model, device):\n"
        "    a = torch.tensor([1, 2])\n"                   # caught
        "    b = torch.zeros(3, device=device)\n"          # fine
        "    c = torch.arange(4).to(device)\n"             # fine: moved at once
        "    return torch.full((2,), 0, dtype=torch.long)\n"  # caught
    )
    assert _offenders(tmp_path) == Counter({("m.py", "f", "tensor"): 1, ("m.py", "f", "full"): 1})
