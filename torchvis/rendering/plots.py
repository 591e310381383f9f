"""The maps that are not images, drawn with matplotlib: a signal with a heat strip, a bar chart of the
strongest features, and a grid of such plots as one figure.

Each ``draw_*`` function draws one example into a rectangle of a ``Figure`` (figure fractions
``(left, bottom, width, height)``), so the same drawing fills a panel of the explanation figure and a
cell of the picture logged to TensorBoard (:func:`plot_grid`). Pure functions of tensors: no pyplot,
no files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

__all__ = ["TOP", "Plot", "draw_bars", "draw_signal", "draw_values", "feature_names_for", "plot_grid",
           "top_features"]

TOP = 10
"""How many features a tabular map shows: the strongest by ``|value|``."""

Rect = tuple[float, float, float, float]
Plot = Callable[[Figure, Rect], None]
"""Draws one panel into a rectangle of a figure (figure fractions)."""

_STRIP = 0.16  # share of a signal panel's height taken by the heat strip under the line
_LINE = "0.15"
_INPUT_BAR = "0.55"


def draw_signal(fig: Figure, rect: Rect, signal: Tensor, strip: Tensor | None = None) -> None:
    """The signal ``[C,L]`` as one line per channel over time steps 0..L-1, and under it, sharing the
    time axis, the heat strip ``[3,L]`` (RGB in [0, 1], one colour per time step) when given."""
    left, bottom, width, height = rect
    # Inset, so that the tick labels stay inside the rectangle.
    left, bottom, width, height = left + 0.14 * width, bottom + 0.09 * height, 0.84 * width, 0.89 * height
    values = signal.detach().float().cpu().numpy()
    steps = values.shape[-1]
    line_height = height * (1 - _STRIP - 0.04) if strip is not None else height
    ax = fig.add_axes((left, bottom + height - line_height, width, line_height), label="signal")
    for channel in values:
        ax.plot(np.arange(steps), channel, color=_LINE if len(values) == 1 else None, linewidth=0.9)
    ax.set_xlim(-0.5, steps - 0.5)
    ax.tick_params(labelsize=7, length=2, pad=1)
    if strip is None:
        return
    ax.tick_params(labelbottom=False)
    colours = strip.detach().float().cpu().clamp(0, 1).permute(1, 0)[None].numpy()  # [1, L, 3]
    bar = fig.add_axes((left, bottom, width, height * _STRIP), sharex=ax, label="heat strip")
    # Pixel-exact colours: nearest interpolation, one column per time step.
    bar.imshow(colours, aspect="auto", interpolation="nearest", extent=(-0.5, steps - 0.5, 0, 1))
    bar.set_yticks([])
    bar.tick_params(labelsize=7, length=2, pad=1)


def top_features(values: Tensor, top: int = TOP) -> list[int]:
    """The indices of the ``top`` entries of ``values`` ``[N]`` with the largest ``|value|``, strongest
    first (ties: the lower index first)."""
    v = values.detach().double().cpu().abs()
    return torch.sort(-v, stable=True).indices[:top].tolist()  # stable: equal values keep index order


def draw_bars(
    fig: Figure,
    rect: Rect,
    values: Tensor,
    names: Sequence[str],
    colours: Sequence[tuple[float, float, float]],
    *,
    inputs: Tensor | None = None,
    top: int = TOP,
) -> None:
    """A horizontal bar chart of the ``top`` features of ``values`` ``[N]`` with the largest
    ``|value|``, the strongest at the top, each labelled with its name (and ``= <input value>`` when
    ``inputs`` ``[N]`` is given); ``colours`` has one RGB colour per feature."""
    chosen = top_features(values, top)
    raw = values.detach().double().cpu()
    labels = [names[i] if inputs is None else f"{names[i]} = {float(inputs[i]):.3g}" for i in chosen]
    ax = _bar_axes(fig, rect, labels)
    ax.barh(range(len(chosen)), [float(raw[i]) for i in chosen], color=[colours[i] for i in chosen])
    ax.axvline(0, color="0.3", linewidth=0.6)
    if len(chosen) < raw.shape[0]:
        ax.set_title(f"top {len(chosen)} of {raw.shape[0]} by |value|", fontsize=7, pad=2)


def draw_values(fig: Figure, rect: Rect, values: Tensor, names: Sequence[str], *, top: int = 2 * TOP) -> None:
    """The input's features ``[N]`` as grey bars in their order (the first ``top``)."""
    shown = min(top, values.shape[0])
    raw = values.detach().double().cpu()
    ax = _bar_axes(fig, rect, [names[i] for i in range(shown)])
    ax.barh(range(shown), [float(raw[i]) for i in range(shown)], color=_INPUT_BAR)
    ax.axvline(0, color="0.3", linewidth=0.6)
    if shown < raw.shape[0]:
        ax.set_title(f"first {shown} of {raw.shape[0]} features", fontsize=7, pad=2)


def _bar_axes(fig: Figure, rect: Rect, labels: Sequence[str]):  # type: ignore[no-untyped-def]
    left, bottom, width, height = rect
    room = 0.45  # of the panel's width, for the feature names
    ax = fig.add_axes((left + room * width, bottom + 0.06 * height, (1 - room - 0.03) * width, 0.86 * height),
                      label="bars")
    ax.set_yticks(range(len(labels)), labels=list(labels), fontsize=7)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # first (strongest) at the top
    ax.tick_params(axis="x", labelsize=6, length=2, pad=1)
    return ax


def feature_names_for(count: int, names: Sequence[str] | None) -> list[str]:
    """``names`` checked against ``count`` features, or ``"x[0]"``, ``"x[1]"``, ... ."""
    if names is None:
        return [f"x[{i}]" for i in range(count)]
    if len(names) != count:
        raise ValueError(f"feature_names has {len(names)} names for {count} features")
    return [str(n) for n in names]


def plot_grid(plots: Sequence[Plot], columns: int, *, cell: tuple[float, float] = (3.2, 2.0),
              dpi: int = 80) -> Figure:
    """One figure with ``plots`` in a grid, ``columns`` per row, row by row (``cell``: inches)."""
    rows = -(-len(plots) // columns)
    width, height = columns * cell[0], rows * cell[1]
    fig = Figure(figsize=(width, height), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    margin_x, margin_y = 0.06 / columns, 0.1 / rows
    for k, plot in enumerate(plots):
        row, col = divmod(k, columns)
        left = col / columns + margin_x
        bottom = 1 - (row + 1) / rows + margin_y
        plot(fig, (left, bottom, 1 / columns - 2 * margin_x, 1 / rows - 2 * margin_y))
    return fig
