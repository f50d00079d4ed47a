"""The one way qrnca-lens writes a file: whole or not at all, with the permissions any new file would get.

A reader (a browser, a resuming run, another shard) sees either the old file or the new one, never half of
it: the bytes go to a uniquely named temporary file in the same directory, are fsynced, and the temporary
file is renamed over the target (``os.replace``, atomic on POSIX and Windows). The temporary file is
created with mode 0o666 through ``os.open``, so the kernel applies the process umask (unlike ``mkstemp``,
which makes 0600 files, and without reading the umask, which is not thread-safe).

Example:
    >>> write_json_atomic(Path("runs/x/neurons.json"), {"queries": {}})   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

__all__ = ["write_bytes_atomic", "write_text_atomic", "write_json_atomic", "TMP_SUFFIX"]

TMP_SUFFIX = ".tmp"


def _temp_path(path: Path) -> Path:
    # Hidden, unique per process and call: concurrent writers of one target never share a temporary file.
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def write_bytes_atomic(path: str | Path, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` atomically (see the module docstring). Returns the path."""
    path = Path(path)
    tmp = _temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any, indent: int = 1) -> Path:
    return write_bytes_atomic(path, json.dumps(obj, indent=indent).encode("utf-8"))
