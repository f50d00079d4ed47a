"""Matplotlib figures of a run's maps: geographical heatmaps, layer distributions, the overlap matrix.

Every function takes ``qrnca_lens.render.analysis`` outputs and returns a ``matplotlib.figure.Figure`` drawn on the
Agg canvas (no pyplot, no GUI, no global backend switch); ``png_bytes(fig)`` turns it into PNG bytes.

Example:
    >>> from qrnca_lens.render import analysis as A
    >>> maps = {g: A.heatmap(doc, 30, 1536, group=g) for g in A.groups(doc)}   # doctest: +SKIP
    >>> Path("map.png").write_bytes(png_bytes(heatmap_figure(maps)))          # doctest: +SKIP
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from jaxtyping import Float

__all__ = ["PNG_SIGNATURE", "new_figure", "png_bytes", "heatmap_figure", "layer_distribution_figure",
           "overlap_figure"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8}


def new_figure(width: float, height: float) -> Any:
    """A Figure on an Agg canvas, outside pyplot (so nothing accumulates in pyplot's figure registry)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Any, dpi: int = 110) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def _grid(n: int, ncols: int) -> tuple[int, int]:
    cols = max(1, min(ncols, n))
    return math.ceil(n / cols), cols


def heatmap_figure(
    maps: Mapping[str, Float[np.ndarray, "layer d_mlp"]],
    *,
    n_bins: int = 192,
    ncols: int = 2,
    gamma: float = 0.5,
    title: str | None = None,
) -> Any:
    """One geographical map per group: layer (bottom = first) x neuron, brightness = accumulated naica.

    Neurons are summed into ``n_bins`` column bins (``analysis.bin_columns``) so that a single neuron among
    thousands still shows as a cell. Each panel scales to its own maximum (printed in its title) through a
    power norm (``gamma`` < 1 brightens weak cells), because one strong neuron would otherwise hide the rest.
    """
    from matplotlib import rc_context
    from matplotlib.colors import PowerNorm

    from .analysis import bin_columns

    names = list(maps)
    rows, cols = _grid(max(len(names), 1), ncols)
    with rc_context(_STYLE):  # type: ignore[arg-type]  # matplotlib types its keys as a Literal of all rc names
        fig = new_figure(5.2 * cols, 0.6 + 2.3 * rows)
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax in axes.flat[len(names):]:
            ax.set_visible(False)
        for ax, g in zip(axes.flat, names):
            m = np.asarray(maps[g], dtype=np.float64)
            n_layers, d = m.shape
            binned = bin_columns(m, n_bins)
            width = math.ceil(d / binned.shape[1])
            top = float(binned.max()) if binned.size else 0.0
            ax.imshow(binned, aspect="auto", origin="lower", cmap="magma", interpolation="nearest",
                      norm=PowerNorm(gamma, vmin=0.0, vmax=top if top > 0 else 1.0),
                      extent=(0, d, -0.5, n_layers - 0.5))
            ax.set_title(f"{g}  (max Σnaica {top:.3g})", loc="left")
            ax.set_ylabel("layer")
            ax.set_xlabel(f"neuron (bins of {width})" if width > 1 else "neuron")
            ax.set_yticks(_layer_ticks(n_layers))
        if title:
            fig.suptitle(title, x=0.01, ha="left")
    return fig


def _layer_ticks(n_layers: int) -> list[int]:
    step = max(1, math.ceil(n_layers / 6))
    return list(range(0, n_layers, step))


def layer_distribution_figure(
    dist: Mapping[str, np.ndarray],
    *,
    normalized: bool = False,
    ncols: int = 3,
    with_total: bool = True,
    title: str | None = None,
) -> Any:
    """Small multiples: QR neurons per layer for each group (shared axes), after an "all groups" panel.

    ``dist`` is ``analysis.layer_distribution(...)``; with ``normalized=True`` the y axis reads as a share.
    """
    from matplotlib import rc_context

    panels = list(dist.items())
    if with_total and len(panels) > 1:
        total = np.sum([np.asarray(v, dtype=np.float64) for _, v in panels], axis=0)
        if normalized and total.sum() > 0:
            total = total / total.sum()
        panels = [("all groups", total)] + panels
    rows, cols = _grid(max(len(panels), 1), ncols)
    with rc_context(_STYLE):  # type: ignore[arg-type]  # matplotlib types its keys as a Literal of all rc names
        fig = new_figure(3.6 * cols, 0.5 + 1.9 * rows)
        axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for i, (ax, (g, counts)) in enumerate(zip(axes.flat, panels)):
            c = np.asarray(counts, dtype=np.float64)
            colour = "#555555" if (with_total and i == 0 and len(panels) > 1) else "#3b6ea5"
            ax.bar(np.arange(len(c)), c, width=0.85, color=colour)
            n = "" if normalized else f" ({int(c.sum())})"
            ax.set_title(f"{g}{n}", loc="left")
            ax.set_xlim(-0.7, len(c) - 0.3)
            ax.set_xticks(_layer_ticks(len(c)))
            ax.spines[["top", "right"]].set_visible(False)
            if i % cols == 0:
                ax.set_ylabel("share" if normalized else "neurons")
            if i >= len(panels) - cols:
                ax.set_xlabel("layer")
                ax.tick_params(labelbottom=True)
        if title:
            fig.suptitle(title, x=0.01, ha="left")
    return fig


def overlap_figure(
    groups: Sequence[str],
    matrix: Float[np.ndarray, "group group"],
    *,
    annotate: bool | None = None,
    title: str | None = None,
) -> Any:
    """The overlap-rate matrix, values written in the cells (up to 20 groups; NaN shows as a dash)."""
    from matplotlib import rc_context

    n = len(groups)
    m = np.asarray(matrix, dtype=np.float64)
    annotate = n <= 20 if annotate is None else annotate
    side = min(11.0, 1.6 + 0.62 * n)
    with rc_context(_STYLE):  # type: ignore[arg-type]  # matplotlib types its keys as a Literal of all rc names
        fig = new_figure(side + 1.0, side)
        ax = fig.subplots()
        im = ax.imshow(np.ma.masked_invalid(m), cmap="Blues", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(n), list(groups), rotation=40, ha="right")
        ax.set_yticks(range(n), list(groups))
        if annotate:
            for i in range(n):
                for j in range(n):
                    v = m[i, j]
                    text = "–" if not np.isfinite(v) else f"{v:.2f}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=8,
                            color="white" if np.isfinite(v) and v > 0.6 else "#222222")
        fig.colorbar(im, ax=ax, shrink=0.8, label="|A ∩ B| / |A ∪ B|")
        ax.set_title(title or "overlap rate of pooled QR neurons", loc="left")
    return fig
