"""The run directory: a manifest, one file per finished query, and the reduce's ``neurons.json``. No model code.

    DIR/manifest.json              what the run is (model, data, proxy, IG settings): reruns must match it
    DIR/queries/<id>.safetensors   one query's IG scores [prompt, layer, d_mlp] + metadata, written atomically
    DIR/neurons.json               the collection-level selection (rewritten by every reduce)

A query file appears in one ``os.replace``, so a run killed at any instant leaves finished queries whole and
no partial file under a final name: a rerun skips what is done and redoes the rest. Shards of one run write
disjoint query files into the same directory, so they never clash.

Example:
    >>> store = RunStore.open("runs/x", manifest)        # doctest: +SKIP
    >>> store.done()                                      # doctest: +SKIP
    {'capital-01', ...}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from jaxtyping import Float
from torch import Tensor

from .errors import StoreError

__all__ = ["RunStore", "FORMAT", "write_json_atomic", "query_filename"]

FORMAT = "qrnca-lens-run"
VERSION = 1
# Manifest keys that define the computation: a rerun with other values would mix incomparable scores.
IDENTITY_KEYS = ("format", "version", "model", "data", "proxy", "ig", "layers", "model_shape")


def write_json_atomic(path: Path, obj: Any) -> None:
    _write_atomic(path, json.dumps(obj, indent=1, sort_keys=False).encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_atomic(path: Path, payload: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes 0600 files; give run files the permissions any other file would get.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def query_filename(query_id: str) -> str:
    """A safe, collision-free file name for a query id (readable prefix + hash of the exact id)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", query_id)[:80]
    return f"{safe}-{hashlib.sha1(query_id.encode()).hexdigest()[:8]}.safetensors"


class RunStore:
    """A run directory. ``open`` creates it, or checks that an existing one is the same run."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest

    @property
    def queries_dir(self) -> Path:
        return self.root / "queries"

    @classmethod
    def open(cls, root: str | Path, manifest: dict[str, Any]) -> "RunStore":
        root = Path(root)
        manifest = {"format": FORMAT, "version": VERSION, **manifest}
        path = root / "manifest.json"
        if path.exists():
            existing = cls._read_manifest(path)
            diff = {k: (existing.get(k), manifest.get(k)) for k in IDENTITY_KEYS if existing.get(k) != manifest.get(k)}
            if diff:
                lines = "; ".join(f"{k}: stored {a!r}, asked {b!r}" for k, (a, b) in diff.items())
                raise StoreError(
                    f"{root} holds a different run ({lines}); use another --out directory, or delete {root} to start over"
                )
            return cls(root, existing)
        if root.exists() and any(p.name != "manifest.json" for p in root.iterdir()):
            raise StoreError(
                f"{root} exists and is not a qrnca-lens run (no manifest.json); choose an empty or new --out directory"
            )
        root.mkdir(parents=True, exist_ok=True)
        (root / "queries").mkdir(exist_ok=True)
        write_json_atomic(path, manifest)
        return cls(root, manifest)

    @classmethod
    def load(cls, root: str | Path) -> "RunStore":
        root = Path(root)
        path = root / "manifest.json"
        if not path.exists():
            raise StoreError(f"{root} is not a qrnca-lens run: no manifest.json (run `qrnca-lens locate --out {root}` first)")
        return cls(root, cls._read_manifest(path))

    @staticmethod
    def _read_manifest(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise StoreError(f"{path} is corrupt ({e}); delete the run directory to start over") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise StoreError(f"{path} is not a qrnca-lens manifest (format {data.get('format') if isinstance(data, dict) else None!r})")
        if data.get("version") != VERSION:
            raise StoreError(f"{path} has store version {data.get('version')}, this qrnca-lens reads version {VERSION}")
        return data

    # ------------------------------------------------------------ per-query files

    def path_of(self, query_id: str) -> Path:
        return self.queries_dir / query_filename(query_id)

    def done(self) -> set[str]:
        """Ids of the queries whose file is present (temporary files of interrupted writes are ignored)."""
        out = set()
        for p in self.queries_dir.glob("*.safetensors"):
            meta = self._header(p)
            out.add(meta["query_id"])
        return out

    def _header(self, path: Path) -> dict[str, Any]:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            info = json.loads(meta["qrnca"])
        except Exception as e:  # noqa: BLE001 - any failure to read means the same thing to the user
            raise StoreError(f"{path} is corrupt ({type(e).__name__}: {e}); delete it and rerun to recompute that query") from None
        if path.name != query_filename(info.get("query_id", "")):
            raise StoreError(f"{path} does not belong to this run (it holds query {info.get('query_id')!r}); delete it")
        return info

    def write_query(self, query_id: str, scores: Float[Tensor, "prompt layer d_mlp"], info: dict[str, Any]) -> None:
        from safetensors.torch import save

        meta = {"qrnca": json.dumps({"query_id": query_id, **info})}
        payload = save({"scores": scores.detach().float().cpu().contiguous()}, metadata=meta)
        _write_atomic(self.path_of(query_id), payload)

    def read_query(self, query_id: str) -> tuple[Float[Tensor, "prompt layer d_mlp"], dict[str, Any]]:
        from safetensors.torch import load_file

        path = self.path_of(query_id)
        if not path.exists():
            raise StoreError(f"{self.root}: query {query_id!r} has not been attributed yet; rerun locate")
        info = self._header(path)
        try:
            scores = load_file(str(path))["scores"]
        except Exception as e:  # noqa: BLE001
            raise StoreError(f"{path} is corrupt ({e}); delete it and rerun to recompute that query") from None
        shape = self.manifest.get("model_shape")
        if shape and tuple(scores.shape[1:]) != (len(self.manifest["layers"]), shape[1]):
            raise StoreError(f"{path}: scores of shape {tuple(scores.shape)} do not fit this run's model")
        return scores, info

    def read_info(self, query_id: str) -> dict[str, Any]:
        """A query's metadata (its stored prompts among it) without loading its scores."""
        path = self.path_of(query_id)
        if not path.exists():
            raise StoreError(f"{self.root}: query {query_id!r} has not been attributed yet; rerun locate")
        return self._header(path)

    def iter_queries(self) -> Iterator[tuple[str, Tensor, dict[str, Any]]]:
        for qid in sorted(self.done()):
            scores, info = self.read_query(qid)
            yield qid, scores, info

    def write_neurons(self, obj: dict[str, Any]) -> Path:
        path = self.root / "neurons.json"
        write_json_atomic(path, obj)
        return path
