"""The explanation figure: rows of inputs beside their attribution maps, titled, labelled, with legends.

One function draws both ``torchvis explain``'s figure (one row per image) and the demo's
``panel.png`` (one row per probe digit): a column per method titled with :func:`title_of`, an
optional label left of each row (true and predicted class), and under each colour-mapped column a
colour bar saying what the colours mean. Pure functions from tensors to a matplotlib ``Figure`` or
an RGB array; no pyplot (so no global figure registry and no GUI backend), no files. Each map is
drawn as TensorBoard draws it (the method's registered :class:`torchvis.Look`): Grad-CAM as an
"inferno" overlay on the input, occlusion as a signed "bwr" overlay, saliency as a signed "bwr" map,
guided backprop and guided Grad-CAM as RGB gradient pictures (grey is zero; "bwr" for grey inputs).
In every signed map red marks pixels whose content raises the explained class's score and blue those
that lower it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from torch import Tensor

from torchvis.methods.spec import SPECS, Look
from torchvis.rendering import image as im

__all__ = ["explanation_figure", "figure_rgb", "panel_boxes", "render_map", "title_of"]

SIGNED_LEGEND = "blue lowers, red raises\nthe class score"
HEAT_LEGEND = "importance for the class"

# Layout, in inches: square panels, bands for the title, the column titles, the row labels and the
# colour bars, thin margins.
_PANEL, _GAP, _MARGIN = 2.4, 0.1, 0.1
_TITLE, _COLUMN_TITLES, _ROW_LABELS, _LEGEND = 0.4, 0.35, 1.15, 0.8
_PANEL_LABEL = "torchvis-panel"  # marks the image axes among the colour bars, for panel_boxes


def title_of(key: str) -> str:
    """The column title of a map keyed ``"<method>"`` or ``"<method>/<layer>"``: the registered
    method's title (:class:`torchvis.methods.spec.MethodSpec`; ``"grad_cam/layer4"`` -> ``"Grad-CAM
    (layer4)"``), an unknown name as it is."""
    method, _, layer = key.partition("/")
    title = SPECS[method].title if method in SPECS else method
    return f"{title} ({layer})" if layer else title


def render_map(method: str, attr: Tensor, image: Tensor) -> Tensor:
    """One raw map ``[C|1,h,w]`` of ``method`` for the input ``image`` ``[C,H,W]`` in [0, 1], drawn in
    the method's registered :class:`torchvis.Look`, as in TensorBoard. Returns ``[3,H,W]`` in
    [0, 1] (``[3,h,w]`` for the looks drawn without the input)."""
    return _render(method, attr[None], image[None])[0]


def _render(method: str, attr: Tensor, images: Tensor) -> Tensor:
    return im.render_map(attr.detach().float().cpu(), images.detach().float().cpu(), im.look_of(method))


def _legend(method: str, attr: Tensor | str) -> str | None:
    """Which colour bar goes under a column: "signed", "heat" or None (text, or RGB kept)."""
    if isinstance(attr, str):
        return None
    look = im.look_of(method)
    if look is Look.HEAT_OVERLAY:
        return "heat"
    if look is Look.RGB and attr.shape[1] == 3:
        return None
    return "signed"


def _check(images: Tensor, maps: Mapping[str, Tensor | str], row_labels: Sequence[str] | None) -> None:
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B,C,H,W] with 1 or 3 channels, got {list(images.shape)} "
                         "(one image: image[None])")
    batch = images.shape[0]
    for key, attr in maps.items():
        if isinstance(attr, Tensor) and (attr.dim() != 4 or attr.shape[0] != batch):
            raise ValueError(f"map {key!r} must be [B,C,h,w] with B = {batch} like images, "
                             f"got {list(attr.shape)}")
    if row_labels is not None and len(row_labels) != batch:
        raise ValueError(f"row_labels has {len(row_labels)} labels for {batch} rows")


def explanation_figure(
    images: Tensor,
    maps: Mapping[str, Tensor | str],
    *,
    title: str | None = None,
    row_labels: Sequence[str] | None = None,
    labels: Mapping[str, str] | None = None,
    panel: float = _PANEL,
    dpi: int = 100,
) -> Figure:
    """Rows = examples: input ``images[b]`` (``[B,C,H,W]`` in [0, 1]), then one panel per map.

    A map is a raw attribution ``[B,C|1,h,w]`` keyed by method name (see :func:`render_map`); a
    string instead is written in that column's panels (e.g. ``"n/a for TorchScript"``). Columns are
    titled with :func:`title_of` (``labels`` override it per key); ``row_labels`` (one per row, e.g.
    ``"true 3\\npred 3 (0.99)"``) are written left of the rows; ``title`` above everything. Signed
    columns get a "bwr" colour bar (blue lowers, red raises the class score), Grad-CAM an "inferno"
    one. Panels are ``panel`` inches square: ``H != W`` images are letterboxed.
    """
    _check(images, maps, row_labels)
    batch, columns = images.shape[0], 1 + len(maps)
    names = {**{k: title_of(k) for k in maps}, **(labels or {})}
    legends = {k: _legend(k, v) for k, v in maps.items()}
    left = _MARGIN + (_ROW_LABELS if row_labels is not None else 0)
    top = (_TITLE if title else 0) + _COLUMN_TITLES
    bottom = _MARGIN + (_LEGEND if any(legends.values()) else 0)
    width = left + columns * panel + (columns - 1) * _GAP + _MARGIN
    height = top + batch * panel + (batch - 1) * _GAP + bottom
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title, y=1 - 0.08 / height, va="top", fontsize=13)

    def box(row: float, col: int, h: float = panel, inset: float = 0.0) -> tuple[float, float, float, float]:
        y = height - top - row * (panel + _GAP) - h
        x = left + col * (panel + _GAP) + inset * panel
        return (x / width, y / height, (1 - 2 * inset) * panel / width, h / height)

    interpolation = "nearest" if max(images.shape[-2:]) < 100 else "antialiased"
    pictures: list[Tensor | str] = [im.to_rgb(images.detach().float().cpu())]
    pictures += [v if isinstance(v, str) else _render(k, v, images) for k, v in maps.items()]
    for col, (picture, name) in enumerate(zip(pictures, ["input", *names.values()], strict=True)):
        for row in range(batch):
            ax = fig.add_axes(box(row, col), label=_PANEL_LABEL)
            _draw(ax, picture if isinstance(picture, str) else picture[row], interpolation)
            if row == 0:
                ax.set_title(name, fontsize=10)
            if col == 0 and row_labels is not None:
                ax.text(-0.06, 0.5, row_labels[row], transform=ax.transAxes, ha="right", va="center",
                        fontsize=10)
    for col, kind in enumerate(legends.values(), start=1):
        if kind is not None:
            # Inset, so that the tick labels of neighbouring bars cannot run into each other.
            bar = fig.add_axes(box(batch - 1 + (panel + 0.18) / (panel + _GAP), col, 0.12, inset=0.1))
            _colour_bar(fig, bar, kind, panel)
    return fig


def _draw(ax: Axes, content: Tensor | str, interpolation: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if isinstance(content, str):
        ax.text(0.5, 0.5, content, ha="center", va="center", wrap=True, fontsize=9, color="0.3")
        ax.set_facecolor("0.93")
    else:
        ax.imshow(content.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation=interpolation)
        ax.set_axis_off()


def _colour_bar(fig: Figure, ax: Axes, kind: str, panel: float) -> None:
    signed = kind == "signed"
    colours = ScalarMappable(Normalize(-1 if signed else 0, 1), im.DIVERGING if signed else im.SEQUENTIAL)
    bar = fig.colorbar(colours, cax=ax, orientation="horizontal")
    bar.set_ticks([-1, 0, 1] if signed else [0, 1], labels=["−", "0", "+"] if signed else ["0", "max"])
    bar.ax.tick_params(labelsize=8, length=2, pad=1)
    bar.set_label(SIGNED_LEGEND if signed else HEAT_LEGEND, fontsize=8 if panel < 2 else 9, labelpad=2)


def figure_rgb(fig: Figure) -> np.ndarray:
    """Draw ``fig`` and return its pixels, ``[H,W,3]`` uint8."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def panel_boxes(fig: Figure) -> list[tuple[int, int, int, int]]:
    """The pixel box ``(top, left, bottom, right)`` of each image panel in :func:`figure_rgb`'s array,
    row by row, left to right (bottom and right exclusive); colour bars are not panels."""
    height = fig.bbox.height
    boxes = []
    for ax in fig.axes:
        if ax.get_label() == _PANEL_LABEL:
            box = ax.get_window_extent()
            boxes.append((round(height - box.y1), round(box.x0), round(height - box.y0), round(box.x1)))
    return sorted(boxes)
