"""Exceptions raised by qrnca-lens: each names the problem and the fix."""

from __future__ import annotations

__all__ = ["QrncaError", "DataError", "ModelError", "ProxyError", "StoreError", "FastPathError"]


class QrncaError(ValueError):
    """Base class: a problem the caller can fix (bad input, unsupported model).

    A ``ValueError`` too, so callers that already catch bad input keep working.

    Example:
        >>> from qrnca_lens import load_data
        >>> try:
        ...     load_data("builtin:nope")
        ... except QrncaError as e:
        ...     print(type(e).__name__, "-", e)
        DataError - unknown built-in data set 'nope'; choose one of ['builtin:domains', 'builtin:facts', 'builtin:languages']
    """


class DataError(QrncaError):
    """A query file or record is malformed; the message names the file and line.

    Example:
        >>> from qrnca_lens import load_jsonl
        >>> load_jsonl("mine.jsonl", text='{"id": "q1", "group": "g", "question": "2 + 2 ="}')
        Traceback (most recent call last):
        ...
        qrnca_lens.errors.DataError: mine.jsonl:1: missing field(s) ['answer']; the record has [...]
    """


class ModelError(QrncaError):
    """The model lacks something a method needs (a gated MLP, a hook, a tokenizer), or is unknown.

    Example:
        >>> from qrnca_lens import load_model
        >>> load_model("no-such-model")
        Traceback (most recent call last):
        ...
        qrnca_lens.errors.ModelError: unknown model 'no-such-model'; embedded models are ...
    """


class ProxyError(QrncaError):
    """A query cannot be turned into prompts (multi-token letter, too few distractors...) or a proxy is invalid.

    Example:
        >>> from qrnca_lens import ProxyConfig
        >>> ProxyConfig("cloze", n_prompts=0)
        Traceback (most recent call last):
        ...
        qrnca_lens.errors.ProxyError: n_prompts (|Q|) must be at least 1, got 0
    """


class StoreError(QrncaError):
    """A run directory is corrupt, foreign, or was made with a different setup.

    Example:
        >>> import tempfile
        >>> from qrnca_lens import RunStore
        >>> with tempfile.TemporaryDirectory() as d:
        ...     RunStore.load(d)
        Traceback (most recent call last):
        ...
        qrnca_lens.errors.StoreError: ... is not a qrnca-lens run: no manifest.json (run `qrnca-lens locate ...` first)
    """


class FastPathError(QrncaError):
    """A fast path cannot give exact numbers: the model carries hooks of yours on its hook points (refused
    before any work), or its self-check against a plain forward failed (a hook of yours inside a module, or a
    library changed its cache contract). The message names which, and the exact way around it.

    Example:
        >>> with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", steer)]):          # doctest: +SKIP
        ...     attribute_prompt(model, prompt)
        Traceback (most recent call last):
        ...
        qrnca_lens.errors.FastPathError: the model carries hooks of yours on blocks.1.hook_in = ...
    """
