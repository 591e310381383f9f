"""The tutorial figure: an input and its attribution maps side by side, titled with the prediction.

Pure functions from tensors to a matplotlib ``Figure`` or an RGB array; no pyplot (so no global
figure registry and no GUI backend), no files. Each map is drawn as TensorBoard draws it
(the method's registered :class:`torchvis.Look`): Grad-CAM as an "inferno" overlay on the input,
occlusion as a signed "bwr" overlay (red: hiding the patch lowers the score), saliency as a signed
"bwr" map, guided backprop and guided Grad-CAM as RGB gradient pictures (grey is zero; "bwr" for grey inputs).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from torchvis.methods.spec import SPECS
from torchvis.rendering import image as im

__all__ = ["explanation_figure", "figure_rgb", "panel_boxes", "render_map", "title_of"]

def title_of(key: str) -> str:
    """The panel title of a map keyed ``"<method>"`` or ``"<method>/<layer>"``: the registered method's
    title (:class:`torchvis.methods.spec.MethodSpec`), with the layer in brackets."""
    method, _, layer = key.partition("/")
    title = SPECS[method].title if method in SPECS else method
    return f"{title} ({layer})" if layer else title

# Layout, in inches: square panels, a band above them for the titles, thin margins.
_PANEL, _GAP, _MARGIN, _TITLES = 2.4, 0.1, 0.1, 0.75


def render_map(method: str, attr: Tensor, image: Tensor) -> Tensor:
    """One raw map ``[C|1,h,w]`` of ``method`` for the input ``image`` ``[C,H,W]`` in [0, 1], drawn in
    the method's registered :class:`torchvis.Look`, as in TensorBoard. Returns ``[3,H,W]`` in [0, 1]
    (``[3,h,w]`` for the looks drawn without the input)."""
    picture = im.render_map(attr.detach().float().cpu()[None], image.detach().float().cpu()[None],
                                 im.look_of(method))
    return picture[0]


def explanation_figure(
    image: Tensor,
    maps: Mapping[str, Tensor | str],
    *,
    title: str,
    labels: Mapping[str, str] | None = None,
    dpi: int = 100,
) -> Figure:
    """One row: the input ``image`` ``[C,H,W]`` in [0, 1], then one panel per entry of ``maps``.

    A map is a raw attribution ``[C|1,h,w]`` keyed by method name (see :func:`render_map`); a string
    instead of a map is written in its panel (e.g. ``"n/a for TorchScript"``). ``labels`` override
    panel titles. Panels are square: ``H != W`` images are letterboxed.
    """
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be [C,H,W] with 1 or 3 channels, got {list(image.shape)}")
    names = {**{k: title_of(k) for k in maps}, **(labels or {})}
    n = 1 + len(maps)
    width, height = 2 * _MARGIN + n * _PANEL + (n - 1) * _GAP, _MARGIN + _PANEL + _TITLES
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    fig.suptitle(title, y=1 - 0.08 / height, va="top", fontsize=13)
    interpolation = "nearest" if max(image.shape[-2:]) < 100 else "antialiased"
    panels: list[tuple[str, Tensor | str]] = [("input", im.to_rgb(image.float().cpu()[None])[0])]
    panels += [(names[k], v if isinstance(v, str) else render_map(k, v, image)) for k, v in maps.items()]
    for i, (label, content) in enumerate(panels):
        ax = fig.add_axes((
            (_MARGIN + i * (_PANEL + _GAP)) / width, _MARGIN / height, _PANEL / width, _PANEL / height
        ))
        ax.set_title(label, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        if isinstance(content, str):
            ax.text(0.5, 0.5, content, ha="center", va="center", wrap=True, fontsize=9, color="0.3")
            ax.set_facecolor("0.93")
        else:
            ax.imshow(content.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation=interpolation)
            ax.set_axis_off()
    return fig


def figure_rgb(fig: Figure) -> np.ndarray:
    """Draw ``fig`` and return its pixels, ``[H,W,3]`` uint8."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def panel_boxes(fig: Figure) -> list[tuple[int, int, int, int]]:
    """The pixel box ``(top, left, bottom, right)`` of each panel in :func:`figure_rgb`'s array, left
    to right (bottom and right exclusive)."""
    height = fig.bbox.height
    boxes = []
    for ax in fig.axes:
        box = ax.get_window_extent()
        boxes.append((round(height - box.y1), round(box.x0), round(height - box.y0), round(box.x1)))
    return boxes
