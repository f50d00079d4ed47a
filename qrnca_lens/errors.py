"""Exceptions raised by qrnca-lens: each names the problem and the fix."""

from __future__ import annotations

__all__ = ["QrncaError", "DataError", "ModelError", "ProxyError", "StoreError", "FastPathError"]


class QrncaError(ValueError):
    """Base class: a problem the caller can fix (bad input, unsupported model)."""


class DataError(QrncaError):
    """A query file or record is malformed; the message names the file and line."""


class ModelError(QrncaError):
    """The model lacks something a method needs (a gated MLP, a hook, a tokenizer)."""


class ProxyError(QrncaError):
    """A query cannot be turned into prompts (multi-token letter, too few distractors...)."""


class StoreError(QrncaError):
    """A run directory is corrupt, foreign, or was made with a different setup."""


class FastPathError(QrncaError):
    """A fast path failed its self-check against a plain forward (a library changed a contract)."""
