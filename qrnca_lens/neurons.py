"""``NeuronSet``: the one shape a set of MLP neurons has between modules.

A neuron set is ranked, best first: each entry is ``(layer, neuron, score)`` with the model's own layer
number, the neuron's index in that layer's MLP and the score that ranked it (naica for QRNCA, summed IG for
KN, ...; 1.0 where none was given). It is immutable and pure (no model): locators return one per query,
the evaluation and the interventions read them, ``neurons.json`` stores them as ``[[layer, neuron, score],
...]``. Entries may repeat (a hand-written list may); nothing here dedups, so a ranking is kept as given.

Public functions still take what they took before (lists of pairs or triples, a ``[n, 2]`` tensor) and
convert at their boundary with ``NeuronSet(x)``, which also takes a ``NeuronSet`` as it is.

Example:
    >>> ns = NeuronSet([(14, 103, 0.5), (20, 7, 0.25), (14, 9, 0.125)])
    >>> ns[:2]
    NeuronSet([(14, 103, 0.5), (20, 7, 0.25)])
    >>> ns.by_layer()
    {14: [103, 9], 20: [7]}
    >>> (20, 7) in ns, ns.pairs()[0]
    (True, (14, 103))
    >>> NeuronSet.from_list(ns.to_list()) == ns
    True
    >>> ns._repr_html_().startswith("<div><b>NeuronSet</b>: 3 neurons in 2 layers<table>")   # a notebook's view
    True
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Union, overload

import torch
from torch import Tensor

from .errors import QrncaError

__all__ = ["NeuronSet", "NeuronsLike", "Neuron", "DEFAULT_SCORE", "top_pooled"]

DEFAULT_SCORE = 1.0  # an entry given as (layer, neuron) weighs 1, as a pair row of neurons.json always has
HTML_ROWS = 10  # entries a notebook shows of a set (its size is always shown)

Entry = tuple[int, int, float]


def _index(value: Any, what: str, row: Any, i: int) -> int:
    """``value`` as a non-negative int, or an error naming the entry and what is wrong with it."""
    try:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # a JSON writer may have written 3.0 for 3
        out = operator.index(value)
    except TypeError:
        raise QrncaError(f"neuron entry {i} {row!r}: the {what} {value!r} is not an integer index") from None
    if out < 0:
        raise QrncaError(f"neuron entry {i} {row!r}: the {what} {out} is negative; layers and neurons count from 0")
    return out


def _score(value: Any, row: Any, i: int) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise QrncaError(f"neuron entry {i} {row!r}: the score {value!r} is not a number") from None


class NeuronSet(Sequence):
    """Ranked ``(layer, neuron, score)`` entries, best first; immutable (see the module docstring).

    Args:
        neurons: another ``NeuronSet`` (taken as it is), a ``[n, 2]`` integer tensor of (layer, neuron)
            rows, or an iterable of ``(layer, neuron)`` pairs and/or ``(layer, neuron, score)`` triples.
            Indices must be non-negative integers.

    Example:
        >>> NeuronSet([(0, 3), (2, 1, 0.5)]).to_list()
        [[0, 3, 1.0], [2, 1, 0.5]]
    """

    __slots__ = ("_layers", "_neurons", "_scores")
    _layers: tuple[int, ...]
    _neurons: tuple[int, ...]
    _scores: tuple[float, ...]

    def __init__(self, neurons: NeuronsLike = ()) -> None:
        if isinstance(neurons, NeuronSet):
            cols: tuple[tuple[int, ...], tuple[int, ...], tuple[float, ...]] = (
                neurons._layers, neurons._neurons, neurons._scores)
        elif isinstance(neurons, Tensor):
            cols = NeuronSet.from_tensor(neurons)._columns()
        else:
            cols = self._parse(neurons)
        self._set(*cols)

    def _set(self, layers: Sequence[int], neurons: Sequence[int], scores: Sequence[float]) -> None:
        # The one place the columns are written: the public surface cannot change a set once made.
        for name, col in (("_layers", layers), ("_neurons", neurons), ("_scores", scores)):
            object.__setattr__(self, name, tuple(col))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a NeuronSet is immutable (cannot set {name!r}); build a new one")

    def __reduce__(self) -> tuple[Any, ...]:
        return NeuronSet, (list(self),)  # rebuilt through the constructor (pickling to other processes)

    @staticmethod
    def _parse(rows: Iterable[Any]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[float, ...]]:
        if isinstance(rows, (str, bytes, dict)):
            raise QrncaError(f"neurons must be (layer, neuron[, score]) entries, got a {type(rows).__name__}")
        layers, neurons, scores = [], [], []
        for i, row in enumerate(rows):
            try:
                parts = tuple(row)
            except TypeError:
                raise QrncaError(f"neuron entry {i} {row!r}: expected (layer, neuron) or (layer, neuron, score)") from None
            if len(parts) not in (2, 3):
                raise QrncaError(f"neuron entry {i} {row!r}: expected (layer, neuron) or (layer, neuron, score), "
                                 f"got {len(parts)} values")
            layers.append(_index(parts[0], "layer", row, i))
            neurons.append(_index(parts[1], "neuron index", row, i))
            scores.append(_score(parts[2], row, i) if len(parts) == 3 else DEFAULT_SCORE)
        return tuple(layers), tuple(neurons), tuple(scores)

    @classmethod
    def _of(cls, layers: Sequence[int], neurons: Sequence[int], scores: Sequence[float]) -> NeuronSet:
        """From columns already checked (a cut of a set): no second validation."""
        out = cls.__new__(cls)
        out._set(layers, neurons, scores)
        return out

    def _columns(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[float, ...]]:
        return self._layers, self._neurons, self._scores

    # ------------------------------------------------------------ other shapes in

    @classmethod
    def from_tensor(cls, pairs: Tensor, scores: Sequence[float | int] | Tensor | None = None) -> NeuronSet:
        """From a ``[n, 2]`` integer tensor of (layer, neuron) rows, ranked as given.

        Args:
            pairs: ``[n, 2]`` integer tensor.
            scores: one score per row (default 1.0 each).

        Returns:
            The set.

        Example:
            >>> NeuronSet.from_tensor(torch.tensor([[1, 4], [0, 2]]), [0.5, 0.25]).to_list()
            [[1, 4, 0.5], [0, 2, 0.25]]
        """
        if pairs.ndim != 2 or pairs.shape[1] != 2:
            raise QrncaError(f"a neuron tensor must have shape [n, 2] (layer, neuron rows), got {list(pairs.shape)}")
        if pairs.is_floating_point() or pairs.is_complex() or pairs.dtype == torch.bool:
            raise QrncaError(f"a neuron tensor must hold integer indices, got dtype {pairs.dtype}")
        rows = pairs.tolist()
        if scores is None:
            return cls(rows)
        vals = scores.flatten().tolist() if isinstance(scores, Tensor) else list(scores)
        if len(vals) != len(rows):
            raise QrncaError(f"{len(vals)} scores for {len(rows)} neurons: give one score per row")
        return cls([(a, b, s) for (a, b), s in zip(rows, vals)])

    @classmethod
    def from_list(cls, rows: Iterable[Sequence[Any]]) -> NeuronSet:
        """From the JSON form (``[[layer, neuron, score], ...]``; ``[layer, neuron]`` rows score 1.0)."""
        return cls(rows)

    # ------------------------------------------------------------ other shapes out

    def pairs(self) -> list[tuple[int, int]]:
        """``[(layer, neuron), ...]`` in rank order."""
        return list(zip(self._layers, self._neurons))

    def by_layer(self) -> dict[int, list[int]]:
        """Neuron indices per layer (layers in order of first appearance, neurons in rank order): what an
        intervention hooks, one hook per layer."""
        out: dict[int, list[int]] = {}
        for layer, n in zip(self._layers, self._neurons):
            out.setdefault(layer, []).append(n)
        return out

    def to_tensor(self) -> Tensor:
        """``[n, 2]`` long tensor of (layer, neuron) rows, in rank order (``[0, 2]`` when empty)."""
        return torch.tensor(self.pairs(), dtype=torch.long).reshape(len(self), 2)

    def to_list(self) -> list[list[Any]]:
        """The JSON form: ``[[layer, neuron, score], ...]`` (the ``qr_neurons`` rows of neurons.json)."""
        return [[a, b, s] for a, b, s in self]

    def to_dataframe(self) -> Any:
        """A pandas DataFrame, one row per entry: rank, layer, neuron, score."""
        import pandas as pd

        return pd.DataFrame({"rank": range(len(self)), "layer": self._layers, "neuron": self._neurons,
                             "score": self._scores}, columns=["rank", "layer", "neuron", "score"])

    @property
    def layers(self) -> tuple[int, ...]:
        return self._layers

    @property
    def neurons(self) -> tuple[int, ...]:
        return self._neurons

    @property
    def scores(self) -> tuple[float, ...]:
        return self._scores

    # ------------------------------------------------------------ sequence protocol

    def __len__(self) -> int:
        return len(self._layers)

    def __iter__(self) -> Iterator[Entry]:
        return iter(zip(self._layers, self._neurons, self._scores))

    @overload
    def __getitem__(self, i: int) -> Entry: ...

    @overload
    def __getitem__(self, i: slice) -> NeuronSet: ...

    def __getitem__(self, i: int | slice) -> Entry | NeuronSet:
        """An entry ``(layer, neuron, score)``, or for a slice a ``NeuronSet`` that keeps the ranking."""
        if isinstance(i, slice):
            return NeuronSet._of(self._layers[i], self._neurons[i], self._scores[i])
        return self._layers[i], self._neurons[i], self._scores[i]

    def __contains__(self, item: object) -> bool:
        """``(layer, neuron) in s``; a triple must match an entry's score as well."""
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            return False
        if len(item) == 2:
            return tuple(item) in set(self.pairs())
        return tuple(item) in set(self)

    def __eq__(self, other: object) -> bool:
        """Same entries in the same order; a list or tuple of ``(layer, neuron, score)`` triples compares too."""
        if isinstance(other, NeuronSet):
            return self._columns() == other._columns()
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and all(
                isinstance(o, (list, tuple)) and tuple(o) == e for o, e in zip(other, self))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))  # equal to the tuple of its triples, so hashes alike

    def __repr__(self) -> str:
        shown = ", ".join(f"({a}, {b}, {_short(s)})" for a, b, s in self[:3])
        more = f", ... {len(self) - 3} more" if len(self) > 3 else ""
        return f"NeuronSet([{shown}{more}])"

    def _repr_html_(self, rows: int = HTML_ROWS) -> str:
        """Notebook display: how many neurons in how many layers, and the first ``rows`` as a table."""
        n, layers = len(self), len(set(self._layers))
        head = f"<b>NeuronSet</b>: {n} neuron{'s' * (n != 1)} in {layers} layer{'s' * (layers != 1)}"
        if not n:
            return f"<div>{head}</div>"
        body = "".join(f"<tr><td>{r}</td><td>{a}</td><td>{b}</td><td>{_short(s)}</td></tr>"
                       for r, (a, b, s) in enumerate(self[:rows]))
        more = f"<tr><td colspan=4>… {n - rows} more</td></tr>" if n > rows else ""
        return (f"<div>{head}<table><thead><tr><th>rank</th><th>layer</th><th>neuron</th><th>score</th></tr>"
                f"</thead><tbody>{body}{more}</tbody></table></div>")


# What a public function accepts where it needs neurons (converted with ``NeuronSet(x)``). Defined after the
# class, not as a forward reference, so that runtime type checks resolve it from any importing module.
NeuronsLike = Union[NeuronSet, Tensor, Iterable[Sequence[Any]]]
Neuron = tuple[int, int]  # (layer, neuron)


def top_pooled(sets: Iterable[NeuronSet], k: int) -> NeuronSet:
    """The ``k`` neurons with the largest summed score over ``sets`` (a group's pooled neurons: a neuron in
    several sets adds up its scores), best first; ties (layer, neuron) ascending.

    Example:
        >>> top_pooled([NeuronSet([(0, 1, 1.0), (2, 3, 0.5)]), NeuronSet([(0, 1, 0.5), (1, 0, 0.5)])], 2)
        NeuronSet([(0, 1, 1.5), (1, 0, 0.5)])
    """
    pooled: dict[tuple[int, int], float] = {}
    for ns in sets:
        for layer, n, x in ns:
            pooled[(layer, n)] = pooled.get((layer, n), 0.0) + x
    top = sorted(pooled, key=lambda key: (-pooled[key], key))[:k]
    return NeuronSet([(layer, n, pooled[(layer, n)]) for layer, n in top])


def _short(x: float) -> str:
    return repr(x) if math.isfinite(x) and len(repr(x)) <= 8 else f"{x:.4g}"
