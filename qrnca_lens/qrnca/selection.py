"""From integrated-gradient scores to query-relevant (QR) neurons (METHOD section 3). Pure tensor code.

Per query, with ``scores[q, l, i]`` the IG score of neuron (l, i) on the query's prompt q:

1. Cluster. ``"union"`` (default, the authors' code): each prompt keeps the neurons with
   ``ig_q > t * max(ig_q)`` (max over all layers and neurons of that prompt); the cluster is the union over
   prompts and a neuron's raw score is the sum of its above-threshold scores. ``"sum"`` (the paper as
   written): ``s = sum_q ig_q``, cluster ``s > t * max(s)``, raw = s. A prompt (or, in ``"sum"`` mode, a
   summed score) whose max is <= 0 contributes nothing.
2. ``na = raw / Z``, Z = sum of raw over the cluster.
3. Over the N query clusters: ``count(n)`` = clusters holding n, ``ica(n) = ln(N / (count(n) + 1))``.
4. Common neurons: ``count(n) > u * N``.
5. ``naica = na * ica``; keep naica > 0; top v (ties: (layer, neuron) ascending); then drop common neurons,
   so a query can end with fewer than v neurons, or none. The authors' released code never drops them; we
   do (``remove_common=False`` gives their behaviour, ``use_ica=False`` the "QRNCA without ICA" baseline).

Steps 1-2 are per query (a ``Cluster``, small and storable); steps 3-5 are a reduce over the whole
collection (``select``), cheap enough to recompute whenever the collection or the settings change.

Example:
    >>> import torch
    >>> from qrnca_lens.qrnca.selection import SelectionConfig, query_cluster, select
    >>> scores = torch.tensor([[[4.0, 1.0, 0.0], [0.5, 2.0, -1.0]]])  # 1 prompt, 2 layers, 3 neurons
    >>> c = query_cluster(scores, t=0.2)                               # keeps scores > 0.8
    >>> c.indices.tolist(), c.raw.tolist()
    ([[0, 0], [0, 1], [1, 1]], [4.0, 1.0, 2.0])
    >>> other = query_cluster(torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, 3.0]]]))
    >>> sel = select({"a": c, "b": other, "c": other}, SelectionConfig(u=0.5, v=2))
    >>> sel.qr_lists()["a"]  # na * ln(3/2), top 2  # doctest: +ELLIPSIS
    [[0, 0, 0.2316...], [1, 1, 0.1158...]]
    >>> sel.common.tolist(), sel.qr_lists()["b"]  # (1, 2) is in 2 of 3 clusters: common, and ica = 0
    ([[1, 2]], [])
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal, get_args

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..config import Config
from ..errors import QrncaError

__all__ = [
    "degenerate_selection",
    "warn_if_degenerate",
    "CLUSTER_MODES",
    "SelectionConfig",
    "Cluster",
    "Selection",
    "prompt_clusters",
    "query_cluster",
    "cluster_counts",
    "inverse_cluster_attribution",
    "common_neurons",
    "naica_scores",
    "top_v",
    "drop_neurons",
    "select",
]

ClusterMode = Literal["union", "sum"]
CLUSTER_MODES: tuple[str, ...] = get_args(ClusterMode)


# ---------------------------------------------------------------- settings


def _check_t(t: float) -> None:
    if not 0.0 <= t < 1.0:  # also rejects NaN
        raise QrncaError(f"t (cluster threshold, a fraction of the max score) must be in [0, 1), got {t!r}")


def _check_u(u: float) -> None:
    if not 0.0 < u <= 1.0:
        raise QrncaError(f"u (common-neuron share of the clusters) must be in (0, 1], got {u!r}")


def _check_mode(mode: str) -> None:
    if mode not in CLUSTER_MODES:
        raise QrncaError(f"cluster_mode must be 'union' (authors' code) or 'sum' (paper), got {mode!r}")


@dataclass(frozen=True)
class SelectionConfig(Config):
    """Selection settings; the defaults are the paper's (t = 0.2, u = 0.3, v = 20) and the authors' union mode.

    Example:
        >>> cfg = SelectionConfig(v=10, use_ica=False)
        >>> cfg.to_dict()["v"], SelectionConfig.from_dict(cfg.to_dict()) == cfg
        (10, True)
    """

    t: float = field(default=0.2, metadata={"help": "cluster threshold, x max score"})
    u: float = field(default=0.3, metadata={"help": "common if in more than u*N clusters"})
    v: int = field(default=20, metadata={"help": "top-v neurons per query"})
    cluster_mode: ClusterMode = field(
        default="union",
        metadata={"help": "union: authors' per-prompt thresholds; sum: the paper's threshold of the summed scores"})
    use_ica: bool = field(default=True, metadata={
        "help": "weigh by inverse cluster attribution; False: the QRNCA-without-ICA baseline"})
    remove_common: bool = field(default=True, metadata={
        "help": "drop common neurons; False: keep them, as the authors' released code does"})

    def validate(self) -> None:
        _check_t(self.t)
        _check_u(self.u)
        # bool is an int subclass: v=True would silently mean v=1.
        if isinstance(self.v, bool) or not isinstance(self.v, int) or self.v < 1:
            raise QrncaError(f"v (QR neurons per query) must be an integer >= 1, got {self.v!r}")
        _check_mode(self.cluster_mode)
        for name in ("use_ica", "remove_common"):
            if not isinstance(getattr(self, name), bool):
                raise QrncaError(f"{name} must be True or False, got {getattr(self, name)!r}")


# ---------------------------------------------------------------- a query's cluster


@dataclass(frozen=True, eq=False)  # eq on tensors is ambiguous; __eq__ below compares values
class Cluster(Config):
    """A query's sparse cluster: (layer, neuron) rows, sorted ascending and unique, with their raw scores.

    ``shape`` is the (n_layers, d_mlp) of the model, so a cluster can be densified and checked against others.
    Indices are stored int64 and raw scores float32 whatever dtype is passed in.

    Example:
        >>> c = Cluster(torch.tensor([[0, 2], [1, 0]]), torch.tensor([3.0, 1.0]), shape=(2, 3))
        >>> c.na().tolist(), c.dense().tolist()
        ([0.75, 0.25], [[0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    """

    indices: Int[Tensor, "n 2"]
    raw: Float[Tensor, " n"]
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        # Frozen: normalise through object.__setattr__ so stored clusters compare and serialise alike.
        object.__setattr__(self, "indices", self.indices.detach().to("cpu", torch.int64).reshape(-1, 2))
        object.__setattr__(self, "raw", self.raw.detach().to("cpu", torch.float32).reshape(-1))
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        super().__post_init__()

    def validate(self) -> None:
        n_layers, d = self.shape
        if n_layers < 1 or d < 1:
            raise QrncaError(f"cluster shape must be (n_layers >= 1, d_mlp >= 1), got {self.shape}")
        if len(self.indices) != len(self.raw):
            raise QrncaError(f"cluster has {len(self.indices)} indices but {len(self.raw)} raw scores")
        if len(self.indices):
            lay, neu = self.indices[:, 0], self.indices[:, 1]
            if bool((lay < 0).any() | (lay >= n_layers).any() | (neu < 0).any() | (neu >= d).any()):
                raise QrncaError(f"cluster indices fall outside the model shape {self.shape}")
            flat = lay * d + neu
            # Everything downstream (tie-breaking, counts, round trips) relies on one canonical order.
            if len(flat) > 1 and not bool((flat[1:] > flat[:-1]).all()):
                raise QrncaError("cluster indices must be unique and sorted by (layer, neuron) ascending")
            if not bool(torch.isfinite(self.raw).all()):
                raise QrncaError("cluster raw scores contain NaN or inf; rerun attribution in float32")

    @classmethod
    def empty(cls, shape: tuple[int, int]) -> "Cluster":
        return cls(torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0), shape)

    def __len__(self) -> int:
        return len(self.indices)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Cluster):
            return NotImplemented
        return (self.shape == other.shape and torch.equal(self.indices, other.indices)
                and torch.equal(self.raw, other.raw))

    __hash__ = None  # type: ignore[assignment]  # mutable-looking tensors: not hashable

    def na(self) -> Float[Tensor, " n"]:
        """Raw scores normalised to sum to 1 (an empty cluster gives an empty tensor)."""
        if len(self) == 0:
            return torch.zeros(0)
        z = self.raw.double().sum()
        if z <= 0:
            raise QrncaError(f"cluster raw scores sum to {float(z)} <= 0, so they cannot be normalised; "
                             "a cluster built by query_cluster always has positive raw scores")
        return (self.raw.double() / z).float()

    def dense(self) -> Float[Tensor, "layer d_mlp"]:
        """Raw scores as a (n_layers, d_mlp) tensor, 0 outside the cluster."""
        out = torch.zeros(self.shape, dtype=torch.float32)
        out[self.indices[:, 0], self.indices[:, 1]] = self.raw
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, JSON-serialisable; float32 raw scores survive the round trip exactly."""
        return {"indices": self.indices.tolist(), "raw": self.raw.tolist(), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Cluster":
        """The inverse of ``to_dict``: tensors from the lists; unknown or missing keys raise ``QrncaError``."""
        d = cls.checked_keys(d)
        missing = {"indices", "raw", "shape"} - set(d)
        if missing:
            raise QrncaError(f"stored cluster lacks keys {sorted(missing)}")
        shape = tuple(d["shape"])
        if len(shape) != 2:
            raise QrncaError(f"stored cluster shape must be [n_layers, d_mlp], got {d['shape']!r}")
        return cls(torch.tensor(d["indices"], dtype=torch.int64).reshape(-1, 2),
                   torch.tensor(d["raw"], dtype=torch.float32).reshape(-1), (int(shape[0]), int(shape[1])))


def _checked_scores(scores: Tensor) -> Tensor:
    """Float64 copy of the scores after the checks every entry point shares."""
    if scores.shape[0] == 0:
        raise QrncaError("no prompts: a query needs the scores of at least one prompt")
    if not bool(torch.isfinite(scores).all()):
        raise QrncaError("scores contain NaN or inf (the model's probabilities overflowed); "
                         "rerun attribution in float32")
    # float64: thresholds and sums over prompts then match a plain-Python computation bit for bit.
    return scores.detach().to("cpu", torch.float64)


def prompt_clusters(scores: Float[Tensor, "prompt layer d_mlp"], t: float) -> Bool[Tensor, "prompt layer d_mlp"]:
    """Per prompt, the neurons with score > t * (that prompt's max). A prompt whose max is <= 0 keeps nothing."""
    _check_t(t)
    s = _checked_scores(scores)
    peak = s.flatten(1).max(dim=1).values[:, None, None]
    # Already empty when peak <= 0 (every score <= peak <= t * peak); said explicitly so t = 0 cannot differ.
    return (s > t * peak) & (peak > 0)


def _to_cluster(mask: Tensor, raw_dense: Tensor) -> Cluster:
    idx = torch.nonzero(mask)  # row-major, hence already sorted by (layer, neuron)
    return Cluster(idx, raw_dense[mask].float(), (mask.shape[0], mask.shape[1]))


def query_cluster(scores: Float[Tensor, "prompt layer d_mlp"], t: float = 0.2, mode: str = "union") -> Cluster:
    """A query's cluster and raw scores from its prompts' IG scores (see the module docstring for the modes).

    Args:
        scores: ``[prompt, layer, d_mlp]`` IG scores of the query's prompts.
        t: threshold, as a fraction of the maximum score (per prompt in ``"union"`` mode).
        mode: ``"union"`` (the authors' code) or ``"sum"`` (the paper as written).

    Returns:
        The ``Cluster``: the kept (layer, neuron) rows and their raw scores; empty if no score is positive.

    Example:
        >>> scores = torch.tensor([[[4.0, 1.0, 0.0], [0.5, 2.0, -1.0]],    # prompt 0 keeps > 0.8
        ...                        [[0.0, 0.0, 1.0], [0.0, 0.0, 0.1]]])    # prompt 1 keeps > 0.2
        >>> c = query_cluster(scores, t=0.2)
        >>> c.indices.tolist(), c.raw.tolist()
        ([[0, 0], [0, 1], [0, 2], [1, 1]], [4.0, 1.0, 1.0, 2.0])
        >>> query_cluster(scores, t=0.2, mode="sum").indices.tolist()
        [[0, 0], [0, 1], [0, 2], [1, 1]]
    """
    _check_t(t)
    _check_mode(mode)
    s = _checked_scores(scores)
    if mode == "union":
        keep = prompt_clusters(s, t)
        return _to_cluster(keep.any(0), torch.where(keep, s, 0.0).sum(0))
    total = s.sum(0)
    peak = total.max()
    if peak <= 0:
        return Cluster.empty((s.shape[1], s.shape[2]))
    return _to_cluster(total > t * peak, total)


# ---------------------------------------------------------------- collection-level reduce


def cluster_counts(clusters: Sequence[Cluster]) -> Int[Tensor, "layer d_mlp"]:
    """How many clusters hold each neuron."""
    if len(clusters) == 0:
        raise QrncaError("no clusters: counts need at least one query's cluster")
    shape = clusters[0].shape
    counts = torch.zeros(shape, dtype=torch.int64)
    for c in clusters:
        if c.shape != shape:
            raise QrncaError(f"clusters come from different models: shape {c.shape} vs {shape}")
        counts[c.indices[:, 0], c.indices[:, 1]] += 1  # indices are unique within a cluster
    return counts


def _check_counts(counts: Tensor, n_clusters: int) -> None:
    if n_clusters < 1:
        raise QrncaError(f"n_clusters must be at least 1, got {n_clusters}")
    if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > n_clusters):
        raise QrncaError(f"counts must lie in [0, n_clusters={n_clusters}], got [{int(counts.min())}, "
                         f"{int(counts.max())}]; were they computed over a different collection?")


def inverse_cluster_attribution(counts: Int[Tensor, "layer d_mlp"], n_clusters: int) -> Float[Tensor, "layer d_mlp"]:
    """ica(n) = ln(N / (count(n) + 1)): positive for neurons in fewer than N - 1 clusters."""
    _check_counts(counts, n_clusters)
    return torch.log(n_clusters / (counts.double() + 1.0)).float()


def common_neurons(counts: Int[Tensor, "layer d_mlp"], n_clusters: int, u: float) -> Int[Tensor, "n 2"]:
    """Neurons with count > u * N, as sorted (layer, neuron) rows.

    The comparison is exact on the decimal value of u (``Fraction(repr(u))``): with floats, 0.57 * 100 is
    56.99999999999999 and a count of exactly u * N = 57 would wrongly count as common.
    """
    _check_u(u)
    _check_counts(counts, n_clusters)
    q = Fraction(repr(float(u)))
    return torch.nonzero(counts * q.denominator > q.numerator * n_clusters)


def naica_scores(cluster: Cluster, ica: Float[Tensor, "layer d_mlp"] | None) -> Float[Tensor, " n"]:
    """na * ica for each neuron of the cluster; ``ica=None`` (no ICA) gives na itself."""
    na = cluster.na()
    if ica is None:
        return na
    if tuple(ica.shape) != cluster.shape:
        raise QrncaError(f"ica has shape {tuple(ica.shape)} but the cluster's model shape is {cluster.shape}")
    return (na.double() * ica[cluster.indices[:, 0], cluster.indices[:, 1]].double()).float()


def top_v(cluster: Cluster, scores: Float[Tensor, " n"], v: int) -> tuple[Int[Tensor, "k 2"], Float[Tensor, " k"]]:
    """The (at most) v neurons of the cluster with the highest scores > 0.

    Sorted by descending score, ties by (layer, neuron) ascending: a stable sort over the cluster's own
    (layer, neuron) order gives that tie-break for free, independent of the sort backend.
    """
    if v < 1:
        raise QrncaError(f"v (QR neurons per query) must be at least 1, got {v}")
    if len(scores) != len(cluster):
        raise QrncaError(f"{len(scores)} scores for a cluster of {len(cluster)} neurons")
    keep = scores > 0
    idx, val = cluster.indices[keep], scores[keep].float()
    order = torch.sort(val, descending=True, stable=True).indices[:v]
    return idx[order], val[order]


def drop_neurons(
    indices: Int[Tensor, "k 2"], values: Float[Tensor, " k"], remove: Int[Tensor, "c 2"]
) -> tuple[Int[Tensor, "m 2"], Float[Tensor, " m"]]:
    """The rows of (indices, values) whose (layer, neuron) is not in ``remove``; order is kept."""
    gone = {(int(a), int(b)) for a, b in remove.tolist()}
    keep = torch.tensor([(int(a), int(b)) not in gone for a, b in indices.tolist()], dtype=torch.bool)
    return indices[keep], values[keep]


@dataclass(eq=False)
class Selection:
    """The result of ``select``: common neurons of the collection and each query's QR neurons with their naica.

    ``qr[query_id] = (rows of (layer, neuron), naica)``, best first. ``common`` is filled whatever
    ``config.remove_common`` says: it is a property of the collection, useful for maps and the baseline.

    Example:
        >>> a = Cluster(torch.tensor([[0, 0], [1, 1]]), torch.tensor([3.0, 1.0]), shape=(2, 2))
        >>> b = Cluster(torch.tensor([[1, 1]]), torch.tensor([1.0]), shape=(2, 2))
        >>> sel = select({"a": a, "b": b, "c": b}, SelectionConfig(u=0.5))
        >>> sel.common.tolist(), sel.qr_lists()["a"], sel.mean_qr_count()   # doctest: +ELLIPSIS
        ([[1, 1]], [[0, 0, 0.3040...]], 0.333...)
    """

    config: SelectionConfig
    common: Int[Tensor, "c 2"]
    # "_k": each query has its own k, so the dimension must not bind across entries of the dict.
    qr: dict[str, tuple[Int[Tensor, "_k 2"], Float[Tensor, " _k"]]]
    counts: Int[Tensor, "layer d_mlp"]
    n_clusters: int

    def _repr_html_(self) -> str:
        counts = [len(v[0]) for v in self.qr.values()]
        mean = sum(counts) / len(counts) if counts else 0.0
        return (f"<b>Selection</b>: {len(self.qr)} queries, {mean:.1f} QR neurons each on average, "
                f"{len(self.common)} common neurons, {self.n_clusters} clusters")

    def qr_lists(self) -> dict[str, list[list[Any]]]:
        """``{query_id: [[layer, neuron, naica], ...]}`` with Python ints and floats (JSON-ready)."""
        return {q: [[int(a), int(b), float(x)] for (a, b), x in zip(idx.tolist(), val.tolist())]
                for q, (idx, val) in self.qr.items()}

    def mean_qr_count(self) -> float:
        """Mean number of QR neurons per query (the paper reports 12-17 with v = 20)."""
        if not self.qr:
            return 0.0
        return sum(len(idx) for idx, _ in self.qr.values()) / len(self.qr)


def select(clusters: Mapping[str, Cluster], cfg: SelectionConfig = SelectionConfig()) -> Selection:
    """QR neurons of every query of a collection: counts -> ica -> common -> naica -> top v -> drop common.

    Every query counts towards N, including one whose cluster is empty. ``cfg.t`` and ``cfg.cluster_mode``
    are not used here (they were applied when the clusters were built); they are kept in ``Selection.config``
    for the record. The result keeps the mapping's query order and does not depend on it otherwise.

    Args:
        clusters: query id -> its ``Cluster`` (from ``query_cluster``); every one from the same model shape.
        cfg: u (common-neuron fraction), v (neurons kept per query), ICA and common removal switches.

    Returns:
        The ``Selection``: common neurons, and per query its QR neurons with their naica, best first.

    Example:
        >>> a = Cluster(torch.tensor([[0, 0], [0, 1]]), torch.tensor([3.0, 1.0]), shape=(1, 2))
        >>> b = Cluster(torch.tensor([[0, 1]]), torch.tensor([2.0]), shape=(1, 2))
        >>> sel = select({"a": a, "b": b, "c": b}, SelectionConfig(u=0.5, v=1))
        >>> sel.qr_lists()   # (0, 0): na 0.75 * ln(3/2); (0, 1) is common (3 of 3 clusters)   # doctest: +ELLIPSIS
        {'a': [[0, 0, 0.3040...]], 'b': [], 'c': []}
    """
    if len(clusters) == 0:
        raise QrncaError("no clusters to select from: the collection is empty")
    n = len(clusters)
    counts = cluster_counts(list(clusters.values()))
    ica = inverse_cluster_attribution(counts, n) if cfg.use_ica else None
    common = common_neurons(counts, n, cfg.u)
    qr: dict[str, tuple[Tensor, Tensor]] = {}
    for qid, cluster in clusters.items():
        idx, val = top_v(cluster, naica_scores(cluster, ica), cfg.v)
        # After top v, as in the paper: commons use up slots, so a query can end with fewer than v.
        qr[str(qid)] = drop_neurons(idx, val, common) if cfg.remove_common else (idx, val)
    return Selection(config=cfg, common=common, qr=qr, counts=counts, n_clusters=n)


def degenerate_selection(n: int, selection: SelectionConfig) -> str | None:
    """Why a collection of ``n`` queries gives every query 0 QR neurons under ``selection``, or None if it need not.

    Exact, from the definitions in ``selection``: a neuron in a query's own cluster has count >= 1, so
    (ICA) ica = ln(N / (count + 1)) > 0 needs N >= 3, and (commons) count > u * N makes every clustered
    neuron common, hence removed, while u * N < 1.
    """
    reasons, need = [], 1
    if selection.use_ica and n < 3:
        reasons.append("ica = ln(N / (count + 1)) is > 0 only when count < N - 1, and every neuron of a query's "
                       "cluster has count >= 1, so ICA needs N >= 3 (here every naica <= 0)")
        need = 3
    u = Fraction(repr(float(selection.u)))
    if selection.remove_common and n * u < 1:
        min_n = math.ceil(1 / u)
        reasons.append(f"a neuron is common (and removed) when count > u * N = {selection.u} * {n}, which every "
                       f"neuron of a cluster is while N < 1/u = {min_n}")
        need = max(need, min_n)
    if not reasons:
        return None
    return (f"QRNCA needs a larger collection: with N = {n} quer{'y' if n == 1 else 'ies'} every query gets 0 QR "
            f"neurons: {'; and '.join(reasons)}. Locate at least {need} queries together, or select without ICA / without "
            f"removing common neurons (--no-ica --keep-common; SelectionConfig(use_ica=False, remove_common=False))")


def warn_if_degenerate(n: int, selection: SelectionConfig) -> None:
    why = degenerate_selection(n, selection)
    if why:
        warnings.warn(why, stacklevel=3)
