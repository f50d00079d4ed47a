"""The run directory: a manifest, one file per finished query, and the reduce's ``neurons.json``. No model code.

    DIR/manifest.json              what the run is (model, data, proxy, IG settings, query set, the weights'
                                   dtype and device) and the selection of the latest reduce, which every
                                   later stage uses
    DIR/queries/<id>.safetensors   one query's IG scores [prompt, layer, d_mlp] + metadata, written atomically
    DIR/neurons.json               the collection-level selection (rewritten by every reduce)

Every file appears in one ``os.replace`` (``atomic``), so a run killed at any instant leaves finished queries
whole and no partial file under a final name: a rerun skips what is done and redoes the rest, including a
query file that was damaged afterwards (it is reported and recomputed). A rerun must match the stored
identity; it may add queries (the run is extended), never drop or regroup them. Shards of one run write
disjoint query files into the same directory, so they never clash; a second process on the same shard is
refused (one lock file per shard).

A run records how to load its model again (``model_source``: the embedded name, or the checkpoint directory's
absolute path), so ``load_model(run.model)`` works on the run alone.

A run records the dtype and the device of the model that made it (``dtype``, ``device``). A rerun with a
model of another dtype is refused in one line (``check_run_dtype``) unless asked (``allow_dtype_change``):
scores of a float32 and a bfloat16 model are not the same numbers. An allowed change is recorded
(``dtype_changes``). The device is recorded only: a run made on cuda resumes on cpu. A manifest written
before runs recorded their dtype has none: its dtype is unknown, said so, and not checked.

Example:
    >>> store = RunStore.open("runs/x", manifest)        # doctest: +SKIP
    >>> store.done()                                      # doctest: +SKIP
    {'capital-01', ...}
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from jaxtyping import Float
from torch import Tensor

from ..atomic import write_bytes_atomic, write_json_atomic
from ..errors import StoreError

__all__ = ["RunStore", "CorruptQueryFile", "FORMAT", "write_json_atomic", "query_filename", "check_run_dtype",
           "dtype_refusal"]

FORMAT = "qrnca-lens-run"
VERSION = 1
# Manifest keys that define the computation: a rerun with other values would mix incomparable scores.
IDENTITY_KEYS = ("format", "version", "model", "data", "proxy", "ig", "layers", "model_shape")
# Recorded, but not identity: they change memory and speed, never a score, so a run that ran out of memory
# resumes with a smaller max_batch_rows or memory_budget_mb. (Threads and the executor are not in the
# manifest at all.)
NOT_IDENTITY = {"ig": ("max_batch_rows", "memory_budget_mb")}
MANIFEST_LOCK = ".manifest.lock"


class CorruptQueryFile(StoreError):
    """A query file that cannot be read (truncated, overwritten): locate recomputes it."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"{path} is corrupt ({reason}); rerun locate to recompute that query (or delete it)")


def _is_ours(p: Path) -> bool:
    # Lock files, and the empty queries/ of a run killed before its manifest landed.
    return p.name.startswith(".") or (p.name == "queries" and p.is_dir() and not any(p.iterdir()))


@contextmanager
def _flock(path: Path, blocking: bool = True) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if needed), released on exit or when the process dies.

    Without fcntl (Windows) this does not lock: concurrent processes on one run directory are then the user's care.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _identity(manifest: dict[str, Any], key: str) -> Any:
    value = manifest.get(key)
    drop = NOT_IDENTITY.get(key, ())
    return {k: v for k, v in value.items() if k not in drop} if isinstance(value, dict) and drop else value


def _check_identity(root: Path, existing: dict[str, Any], asked: dict[str, Any]) -> None:
    diff = {k: (_identity(existing, k), _identity(asked, k)) for k in IDENTITY_KEYS
            if _identity(existing, k) != _identity(asked, k)}
    if diff:
        lines = "; ".join(f"{k}: stored {a!r}, asked {b!r}" for k, (a, b) in diff.items())
        raise StoreError(f"{root} holds a different run ({lines}); use another --out directory, or delete {root} "
                         "to start over")


def _check_query_set(root: Path, stored: dict[str, str], asked: dict[str, str]) -> None:
    """A rerun may add queries, never drop or regroup them: the run's N (and so every ICA) is its whole set.

    A strict subset is refused too: reducing over the stored set would ignore the asked one, reducing over the
    subset would silently rewrite this run's neurons with another N. A subset is a new run (another --out).
    """
    regrouped = [q for q in asked if q in stored and stored[q] != asked[q]]
    missing = [q for q in stored if q not in asked]
    problems = []
    if regrouped:
        q = regrouped[0]
        problems.append(f"{len(regrouped)} quer{'y changes' if len(regrouped) == 1 else 'ies change'} group "
                        f"(e.g. {q!r}: stored {stored[q]!r}, asked {asked[q]!r})")
    if missing:
        problems.append(f"{len(missing)} of its {len(stored)} queries are not in the asked set of {len(asked)} "
                        f"(e.g. {missing[:3]})")
    if problems:
        raise StoreError(f"{root} holds a run over another query set: {'; '.join(problems)}. A rerun may only add "
                         f"queries: ask for all {len(stored)} stored ones (the same data, a --limit at least as "
                         f"large), or use another --out directory for this set")


def dtype_refusal(where: str | Path, recorded: str, asked: str) -> str:
    """The one line that refuses to mix dtypes in a run, naming both and the two ways out.

    Example:
        >>> dtype_refusal("runs/x", "float32", "bfloat16")  # doctest: +NORMALIZE_WHITESPACE
        'run runs/x was made in float32; this model is bfloat16: load it with --dtype float32 (load_model(...,
        dtype="float32")), or pass --allow-dtype-change (allow_dtype_change=True) to mix them'
    """
    return (f"run {where} was made in {recorded}; this model is {asked}: load it with --dtype {recorded} "
            f"(load_model(..., dtype=\"{recorded}\")), or pass --allow-dtype-change (allow_dtype_change=True) "
            "to mix them")


def check_run_dtype(where: str | Path, recorded: str | None, asked: str, allow: bool = False) -> bool:
    """Refuse (``StoreError``) a model of dtype ``asked`` on a run recorded in ``recorded``, unless ``allow``.

    Args:
        where: the run (its directory), for the message.
        recorded: the run's dtype name (``"float32"``...), or None for a run made before runs recorded it.
        asked: the dtype name of the model now used.
        allow: accept another dtype (the caller records the change).

    Returns:
        True when the dtypes differ and the change was allowed, else False. An unknown ``recorded`` warns
        (once per call) and is not checked.

    Example:
        >>> check_run_dtype("runs/x", "float32", "float32")
        False
        >>> check_run_dtype("runs/x", "float32", "bfloat16", allow=True)
        True
    """
    if recorded is None:
        warnings.warn(f"run {where} does not record its dtype (made before qrnca-lens recorded it): treated as "
                      f"unknown, not checked against this model's {asked}", stacklevel=3)
        return False
    if recorded == asked:
        return False
    if not allow:
        raise StoreError(dtype_refusal(where, recorded, asked))
    return True


def query_filename(query_id: str) -> str:
    """A safe, collision-free file name for a query id (readable prefix + hash of the exact id)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", query_id)[:80]
    return f"{safe}-{hashlib.sha1(query_id.encode()).hexdigest()[:8]}.safetensors"


class RunStore:
    """A run directory. ``open`` creates it, or checks that an existing one is the same run.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     store = RunStore.open(d, {"model": "smollm2", "queries": {"q1": "capital"}})
        ...     RunStore.open(d, {"model": "smollm2", "queries": {"q1": "capital"}}).manifest["model"]
        'smollm2'
    """

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest

    @property
    def queries_dir(self) -> Path:
        return self.root / "queries"

    @classmethod
    def open(cls, root: str | Path, manifest: dict[str, Any], *, allow_dtype_change: bool = False) -> "RunStore":
        """Create the run, or resume it: same identity, and a query set that equals or extends the stored one.

        ``manifest["dtype"]`` (if given) must equal the stored run's dtype unless ``allow_dtype_change``; an
        allowed change is appended to the manifest's ``dtype_changes``. The device is not checked.
        """
        root = Path(root)
        manifest = {"format": FORMAT, "version": VERSION, **manifest}
        path = root / "manifest.json"
        if not path.exists() and root.exists() and any(not _is_ours(p) for p in root.iterdir()):
            raise StoreError(
                f"{root} exists and is not a qrnca-lens run (no manifest.json); choose an empty or new --out directory"
            )
        (root / "queries").mkdir(parents=True, exist_ok=True)
        with _flock(root / MANIFEST_LOCK):  # read-check-extend in one step: two extending processes cannot interleave
            if not path.exists():
                write_json_atomic(path, manifest)
                return cls(root, manifest)
            existing = cls._read_manifest(path)
            _check_identity(root, existing, manifest)
            changed = False
            if manifest.get("dtype") is not None:
                asked_dtype = str(manifest["dtype"])
                if check_run_dtype(root, existing.get("dtype"), asked_dtype, allow_dtype_change):
                    seen = list(existing.get("dtype_changes") or [])
                    if asked_dtype not in seen:
                        existing = {**existing, "dtype_changes": [*seen, asked_dtype]}
                        changed = True
            if not existing.get("model_source") and manifest.get("model_source"):
                existing = {**existing, "model_source": manifest["model_source"]}  # an older run learns it
                changed = True
            stored, asked = existing.get("queries") or {}, manifest.get("queries") or {}
            _check_query_set(root, stored, asked)
            if set(asked) != set(stored):
                # A larger set extends the run: the new ids are attributed, the reduce runs over all of them.
                existing = {**existing, "queries": dict(asked)}
                changed = True
            if changed:
                write_json_atomic(path, existing)
            return cls(root, existing)

    def record_selection(self, selection: dict[str, Any]) -> None:
        """Make ``selection`` the run's selection: every later stage (evaluate, report, ``reduce(DIR)``) uses it."""
        path = self.root / "manifest.json"
        with _flock(self.root / MANIFEST_LOCK):
            current = self._read_manifest(path)
            if current.get("selection") != selection:
                current = {**current, "selection": selection}
                write_json_atomic(path, current)
        self.manifest = current

    @contextmanager
    def shard_lock(self, i: int, n: int) -> Iterator[None]:
        """Hold shard i/n of this run for one process; a second process asking for it gets a clear refusal.

        Per shard, not per directory: the shards of one run write disjoint files and run side by side.
        """
        lock = self.root / f".locate-shard-{i}-of-{n}.lock"
        with ExitStack() as stack:
            try:
                stack.enter_context(_flock(lock, blocking=False))
            except BlockingIOError:
                raise StoreError(
                f"another qrnca-lens locate is already attributing {'this run' if n == 1 else f'shard {i}/{n}'} into "
                    f"{self.root} (it holds {lock.name}); wait for it to finish, or give each process its own "
                    "--shard I/N") from None
            yield

    @classmethod
    def load(cls, root: str | Path) -> "RunStore":
        root = Path(root)
        path = root / "manifest.json"
        if not path.exists():
            raise StoreError(f"{root} is not a qrnca-lens run: no manifest.json (run `qrnca-lens locate --out {root}` first)")
        return cls(root, cls._read_manifest(path))

    @property
    def dtype(self) -> str | None:
        """The dtype the run was made in (``"float32"``, ``"bfloat16"``...), None for a run that predates it."""
        value = self.manifest.get("dtype")
        return str(value) if value is not None else None

    @property
    def model_source(self) -> dict[str, str] | None:
        """How to load the run's model again: ``{"embedded": NAME}`` or ``{"path": DIR}``; for a run made before
        runs recorded it, the embedded name its model identity holds, else None (its ``model`` name is all)."""
        value = self.manifest.get("model_source")
        if value:
            return {str(k): str(v) for k, v in value.items()}
        embedded = (self.manifest.get("model_identity") or {}).get("embedded")
        return {"embedded": str(embedded)} if embedded else None

    @property
    def device(self) -> str | None:
        """The device the run was made on (recorded only: a run made on cuda resumes and evaluates on cpu)."""
        value = self.manifest.get("device")
        return str(value) if value is not None else None

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
        """Ids of the queries whose file is present and readable (temporary and corrupt files are left out)."""
        return self.scan()[0]

    def scan(self) -> tuple[set[str], list[CorruptQueryFile]]:
        """``(ids of readable query files, one error per unreadable file)``; a file of another query raises."""
        out: set[str] = set()
        corrupt: list[CorruptQueryFile] = []
        for p in sorted(self.queries_dir.glob("*.safetensors")):
            try:
                out.add(self._header(p)["query_id"])
            except CorruptQueryFile as e:
                corrupt.append(e)
        return out, corrupt

    def _header(self, path: Path) -> dict[str, Any]:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            info = json.loads(meta["qrnca"])
        except Exception as e:  # noqa: BLE001 - any failure to read means the same thing to the user
            raise CorruptQueryFile(path, f"{type(e).__name__}: {e}") from None
        if path.name != query_filename(info.get("query_id", "")):
            raise StoreError(f"{path} does not belong to this run (it holds query {info.get('query_id')!r}); delete it")
        return info

    def write_query(self, query_id: str, scores: Float[Tensor, "prompt layer d_mlp"], info: dict[str, Any]) -> None:
        from safetensors.torch import save

        meta = {"qrnca": json.dumps({"query_id": query_id, **info})}
        payload = save({"scores": scores.detach().float().cpu().contiguous()}, metadata=meta)
        write_bytes_atomic(self.path_of(query_id), payload)

    def read_query(self, query_id: str) -> tuple[Float[Tensor, "prompt layer d_mlp"], dict[str, Any]]:
        from safetensors.torch import load_file

        path = self.path_of(query_id)
        if not path.exists():
            raise StoreError(f"{self.root}: query {query_id!r} has not been attributed yet; rerun locate")
        info = self._header(path)
        try:
            scores = load_file(str(path))["scores"]
        except Exception as e:  # noqa: BLE001
            raise CorruptQueryFile(path, f"{type(e).__name__}: {e}") from None
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

    def write_neurons(self, obj: dict[str, Any]) -> Path:
        path = self.root / "neurons.json"
        write_json_atomic(path, obj)
        return path
