"""What a result was measured with: library versions and the model's identity, recorded in every output.

Example:
    >>> sorted(library_versions())
    ['python', 'qrnca-lens', 'torch', 'transformer-lens', 'transformers']
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from .protocols import HookedModel

__all__ = ["library_versions", "versions_line", "model_identity", "file_sha256"]

_PACKAGES = ("torch", "transformers", "transformer-lens")

# The one place the package version is written (pyproject.toml repeats it for the build).
PACKAGE_VERSION = "0.1.0"


def library_versions() -> dict[str, str]:
    """Installed versions of qrnca-lens, torch, transformers, transformer-lens and Python."""

    out = {"qrnca-lens": PACKAGE_VERSION, "python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def versions_line() -> str:
    """One line for error messages: ``torch 2.13.0+cpu, transformers 5.24.0, transformer-lens 4.3.0``."""
    v = library_versions()
    return ", ".join(f"{k} {v[k]}" for k in _PACKAGES)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read ``chunk`` bytes at a time (a GGUF file can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def model_identity(model: HookedModel) -> dict[str, Any]:
    """Which model a result comes from.

    For an embedded model (``load_model``): its name and the SHA-256 of the GGUF file it was built from.
    For any other model: its class, TL's model name and a SHA-256 of its config, which tells two
    architectures apart but not two checkpoints of one architecture (the weights are not hashed); for a
    checkpoint directory loaded by ``load_model``, also its absolute path (``checkpoint``), which reloads it.
    """
    embedded = getattr(model, "_qrnca_embedded", None)
    if embedded:
        return dict(embedded)
    cfg = getattr(model, "cfg", None)
    cfg_dict = {} if cfg is None else cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    text = json.dumps(cfg_dict, sort_keys=True, default=str)
    checkpoint = getattr(model, "_qrnca_checkpoint", None)
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "model_name": str(getattr(cfg, "model_name", "") or ""),
        "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
        **({"checkpoint": str(checkpoint)} if checkpoint else {}),
    }
