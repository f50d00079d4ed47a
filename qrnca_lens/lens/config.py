"""How lens scores are computed: ``LensConfig`` and the names its string fields accept.

Example:
    >>> LensConfig(mode="topk").to_dict()["mode"]
    'topk'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from ..config import Config
from ..errors import QrncaError

__all__ = ["ENGINES", "MODES", "Engine", "Mode", "LensConfig", "LensRunConfig"]

Engine = Literal["series", "direct"]
Mode = Literal["exact", "topk"]
# The accepted values, read off the types so that the two cannot drift apart.
ENGINES: tuple[str, ...] = get_args(Engine)
MODES: tuple[str, ...] = get_args(Mode)


@dataclass(frozen=True)
class LensConfig(Config):
    """How scores are computed. The defaults are exact.

    ``mode``: ``"exact"`` scores every FFN neuron; ``"topk"`` finds the top neurons by the first-order bound
    and exact rescoring (certified, see ``qrnca_lens.lens``). ``engine``: ``"series"`` or ``"direct"`` for the
    per-neuron log-sum-exp. ``chunk``: neurons per product W_out[l, chunk] · U (memory: chunk x vocab floats,
    a few times). ``batch_size``: prompts per forward pass and per product (larger amortises the products).
    ``series_radius``/``series_tol``: where the series is used, and the bound on its truncation error.
    ``max_rescore``: top-K mode gives up the certificate after scoring this many neurons exactly per prompt.
    ``check_tol``: largest |Δ log p| allowed between the lens on the final residual and the model's own
    log-probabilities (larger means the model is not supported); a bfloat16 / float16 model is allowed
    max(check_tol, 4 eps |z|max), eps its dtype's and |z|max the largest |logit| at the targets.

    Example:
        >>> cfg = LensConfig(mode="topk", chunk=128)
        >>> LensConfig.from_dict(cfg.to_dict()) == cfg, cfg.engine
        (True, 'series')
        >>> LensConfig(mode="fast")
        Traceback (most recent call last):
        ...
        qrnca_lens.errors.QrncaError: mode must be one of ['exact', 'topk'], got 'fast'
    """

    # The tests' jaxtyping/beartype import hook checks dataclass ``__init__`` arguments and would refuse a bad
    # ``Literal`` with a generic TypeError before ``validate()`` runs; ``validate()`` stays the one check, with
    # the message users get. (Redundant once the ``Config`` base says the same.)
    __no_type_check__ = True

    mode: Mode = "exact"
    engine: Engine = "series"
    chunk: int = 256
    batch_size: int = 32
    series_radius: float = 0.5
    series_tol: float = 1e-8
    max_rescore: int = 4096
    check_tol: float = 1e-3

    def validate(self) -> None:
        if self.mode not in MODES:
            raise QrncaError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.engine not in ENGINES:
            raise QrncaError(f"engine must be one of {list(ENGINES)}, got {self.engine!r}")
        if self.chunk < 1:
            raise QrncaError(f"chunk (neurons per product) must be at least 1, got {self.chunk}")
        if self.batch_size < 1:
            raise QrncaError(f"batch_size must be at least 1, got {self.batch_size}")
        if not 0.0 < self.series_radius <= 4.0:
            raise QrncaError(f"series_radius must be in (0, 4] (larger needs many terms), got {self.series_radius}")
        if not 0.0 < self.series_tol < 1e-2:
            raise QrncaError(f"series_tol must be in (0, 0.01), got {self.series_tol}")
        if self.max_rescore < 1:
            raise QrncaError(f"max_rescore must be at least 1, got {self.max_rescore}")
        if not self.check_tol > 0:
            raise QrncaError(f"check_tol must be positive, got {self.check_tol}")


@dataclass(frozen=True)
class LensRunConfig(Config):
    """What ``qrnca-lens lens`` runs (its options are generated from these fields): ``lens_locate``'s neurons
    per query and mode, and the optional comparison with the paper's alternative scores.

    Example:
        >>> LensRunConfig().top_k, LensRunConfig().mode
        (20, 'topk')
    """

    __no_type_check__ = True  # see LensConfig

    top_k: int = field(default=20, metadata={"help": "neurons kept per query"})
    mode: Mode = field(default="topk", metadata={
        "help": "topk: first-order bound + exact rescoring (certified); exact: every neuron"})
    compare_prompts: int = field(default=30, metadata={"help": "--compare: score the first N prompts"})
    compare_k: int = field(default=10, metadata={"help": "--compare: neurons ablated per method"})

    def validate(self) -> None:
        if self.top_k < 1:
            raise QrncaError(f"top_k must be at least 1, got {self.top_k}")
        if self.mode not in MODES:
            raise QrncaError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.compare_prompts < 1 or self.compare_k < 1:
            raise QrncaError(f"compare_prompts and compare_k must be at least 1, got {self.compare_prompts}, "
                             f"{self.compare_k}")
