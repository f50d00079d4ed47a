"""Shared fixtures: a seeded RNG around every test, the tiny tokenizer and models, the real SmolLM2 and Gemma 3."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# builders.py, and the test modules whose helpers other test files import (``from test_lens import _prompts``),
# are importable whatever order pytest collects the folders in.
sys.path[:0] = [str(Path(__file__).parent)] + sorted(
    str(d) for d in Path(__file__).parent.rglob("*") if d.is_dir() and any(d.glob("test_*.py")))
from builders import TINY_KINDS_BRIDGE, TINY_KINDS_HT, build_tiny, build_tiny_tokenizer, has_hooked_transformer  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Under pytest-xdist each worker is a process: torch's default threads in every one of them would oversubscribe
# the cores (measured 10x slower), so the workers share them out.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

TINY_KINDS = TINY_KINDS_BRIDGE + (TINY_KINDS_HT if has_hooked_transformer() else ())


def pytest_addoption(parser):
    parser.addoption("--scale", action="store_true",
                     help="run the scale simulations (marker `scale`: a 1B-shaped model on the CPU, ~10-30 min)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--scale"):
        return
    skip = pytest.mark.skip(reason="scale simulation: run with `make scale-check` (pytest --scale -m scale)")
    for item in items:
        if "scale" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same RNG state, and leaves the global state as it found it."""
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def _tiny_cache():
    return {}


@pytest.fixture(params=TINY_KINDS)
def tiny_model(request, tiny_tokenizer, _tiny_cache):
    """Each tiny model kind in turn (built once per session; tests must not change weights)."""
    kind = request.param
    if kind not in _tiny_cache:
        _tiny_cache[kind] = build_tiny(kind, tiny_tokenizer)
    return _tiny_cache[kind]


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer, _tiny_cache):
    """The tiny Llama bridge, session-wide (shared with ``tiny_model``'s llama-bridge case)."""
    if "llama-bridge" not in _tiny_cache:
        _tiny_cache["llama-bridge"] = build_tiny("llama-bridge", tiny_tokenizer)
    return _tiny_cache["llama-bridge"]


@pytest.fixture
def tiny_gated(tiny_llama):
    return tiny_llama


@pytest.fixture(scope="session")
def smollm2():
    from qrnca_lens.model.loading import load_model

    return load_model("smollm2")


@pytest.fixture(scope="session")
def gemma3():
    """The real Gemma 3 270M (embedded GGUF): sliding-window and global layers, post-norms, (1 + w) RMSNorm."""
    from qrnca_lens.model.loading import load_model

    return load_model("gemma3-270m")


@pytest.fixture(scope="session")
def tiny_gemma3(tiny_tokenizer):
    """The tiny Gemma-3 bridge (random (1 + w) norm weights, 16-token sliding window), session-wide; never modified."""
    from builders import tiny_gemma3_bridge

    return tiny_gemma3_bridge(tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer):
    """The tiny Llama saved as a local transformers checkpoint, so the CLI can load it by path in a subprocess."""
    from builders import tiny_llama_hf

    path = tmp_path_factory.mktemp("tiny_ckpt")
    tiny_llama_hf(tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path
