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

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from torch import Tensor

from torchvis.core.caller import warn_user
from torchvis.core.targets import is_function
from torchvis.methods.spec import SPECS, Look
from torchvis.rendering import image as im
from torchvis.rendering import kinds

__all__ = ["explained_text", "explanation_figure", "figure_rgb", "panel_boxes", "render_map", "target_name",
           "title_of"]

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


def target_name(target: Callable[..., Any]) -> str:
    """A callable target's name for labels: for torchvis's ready-made score functions the helper that
    made them (``class_logit``), else a function's (or a partial's function's) name, else its type."""
    inner = getattr(target, "func", target)  # functools.partial
    qualified = str(getattr(inner, "__qualname__", ""))
    if getattr(inner, "__module__", None) == _HELPERS and ".<locals>." in qualified:
        return qualified.split(".<locals>.")[0]
    return str(getattr(inner, "__name__", type(inner).__name__))


def explained_text(target: object, example: int) -> str:
    """What a resolved ``target`` explains for one example, as the figures and the logged text say it:
    ``class 3`` (a class tensor ``[B]``), ``output[(1, 5)]`` (an index per example ``[B, k]``, or one
    index for all), ``output`` (``None``: the output itself, one score per example) or
    ``target: <name>`` (a callable)."""
    if is_function(target):
        return f"target: {target_name(target)}"  # type: ignore[arg-type]
    if target is None:
        return "output"
    if isinstance(target, Tensor):
        row = target[example]
        return f"class {int(row)}" if row.dim() == 0 else f"output[{tuple(int(i) for i in row)}]"
    return f"output[{target!r}]"


_HELPERS = "torchvis.core.targets"  # where class_logit, class_in_region and output_tensor live


def _legend(method: str, attr: Tensor | tuple[Tensor, ...] | str) -> str | None:
    """Which colour bar goes under a column: "signed", "heat" or None (text, or RGB kept)."""
    if isinstance(attr, str):
        return None
    look = im.look_of(method)
    if look is Look.HEAT_OVERLAY:
        return "heat"
    first = attr if isinstance(attr, Tensor) else attr[0]
    if look is Look.RGB and first.dim() == 4 and first.shape[1] == 3:
        return None
    return "signed"


def _check(inputs: tuple[Tensor, ...], maps: Mapping[str, Tensor | tuple[Tensor, ...] | str],
           row_labels: Sequence[str] | None) -> None:
    if len(inputs) == 1 and inputs[0].dim() == 4 and inputs[0].shape[1] not in (1, 3):
        raise ValueError(f"images must be [B,C,H,W] with 1 or 3 channels, got {list(inputs[0].shape)}")
    if all(kinds.undrawable(x) for x in inputs):
        reasons = "; ".join(str(kinds.undrawable(x)) for x in inputs)
        raise ValueError(f"nothing to draw: {reasons} (one image: image[None])")
    batch = inputs[0].shape[0]
    for key, attr in maps.items():
        if isinstance(attr, str):
            continue
        parts = (attr,) if isinstance(attr, Tensor) else attr
        if not isinstance(attr, Tensor) and len(attr) != len(inputs):
            raise ValueError(f"map {key!r} has {len(attr)} parts for {len(inputs)} inputs")
        for part in parts:
            if part.shape[0] != batch:
                raise ValueError(f"map {key!r} must have B = {batch} like the inputs, got {list(part.shape)}")
    if row_labels is not None and len(row_labels) != batch:
        raise ValueError(f"row_labels has {len(row_labels)} labels for {batch} rows")


def explanation_figure(
    images: Tensor | tuple[Tensor, ...],
    maps: Mapping[str, Tensor | tuple[Tensor, ...] | str],
    *,
    title: str | None = None,
    row_labels: Sequence[str] | None = None,
    labels: Mapping[str, str] | None = None,
    feature_names: Sequence[str] | Sequence[Sequence[str] | None] | None = None,
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

    Inputs of other kinds are drawn as :mod:`torchvis.rendering.kinds` says (signals ``[B,C,L]`` with
    a heat strip, tables ``[B,N]`` as bar charts named by ``feature_names``, volumes ``[B,C,D,H,W]``
    as central slices; volumes outside [0, 1] are scaled for display). A tuple of inputs gives each
    example one row per input, labelled ``input i``; a map that is a tuple has one part per input, a
    single tensor belongs to the first input. A panel that cannot be drawn says so (and an
    :class:`~torchvis.rendering.kinds.UndrawableWarning` is raised).
    """
    inputs = images if isinstance(images, tuple) else (images,)
    _check(inputs, maps, row_labels)
    names = kinds.feature_names_per_input(feature_names, inputs)
    batch, count, columns = inputs[0].shape[0], len(inputs), 1 + len(maps)
    rows = batch * count
    titles = {**{k: title_of(k) for k in maps}, **(labels or {})}
    legends = {k: _legend(k, v) for k, v in maps.items()}
    labelled = row_labels is not None or count > 1
    left = _MARGIN + (_ROW_LABELS if labelled else 0)
    top = (_TITLE if title else 0) + _COLUMN_TITLES
    bottom = _MARGIN + (_LEGEND if any(legends.values()) else 0)
    width = left + columns * panel + (columns - 1) * _GAP + _MARGIN
    height = top + rows * panel + (rows - 1) * _GAP + bottom
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title, y=1 - 0.08 / height, va="top", fontsize=13)

    def box(row: float, col: int, h: float = panel, inset: float = 0.0) -> tuple[float, float, float, float]:
        y = height - top - row * (panel + _GAP) - h
        x = left + col * (panel + _GAP) + inset * panel
        return (x / width, y / height, (1 - 2 * inset) * panel / width, h / height)

    cells = [_cells(inputs, i, maps, names[i]) for i in range(count)]  # per input: columns of B cells
    for col, name in enumerate(["input", *titles.values()]):
        for row in range(rows):
            b, i = divmod(row, count)
            content, interpolation = cells[i][col][b], cells[i][-1]
            ax = fig.add_axes(box(row, col), label=_PANEL_LABEL)
            if isinstance(content, (Tensor, str)):
                _draw(ax, content, str(interpolation))
            else:
                ax.set_axis_off()
                content(fig, box(row, col))
            if row == 0:
                ax.set_title(name, fontsize=10)
            if col == 0 and labelled:
                lines = [row_labels[b]] if row_labels is not None and i == 0 else []
                lines += [f"input {i}"] if count > 1 else []
                ax.text(-0.06, 0.5, "\n".join(lines), transform=ax.transAxes, ha="right", va="center",
                        fontsize=10)
    for col, kind in enumerate(legends.values(), start=1):
        if kind is not None:
            # Inset, so that the tick labels of neighbouring bars cannot run into each other.
            bar = fig.add_axes(box(rows - 1 + (panel + 0.18) / (panel + _GAP), col, 0.12, inset=0.1))
            _colour_bar(fig, bar, kind, panel)
    return fig


def _cells(inputs: tuple[Tensor, ...], i: int, maps: Mapping[str, Tensor | tuple[Tensor, ...] | str],
           names: Sequence[str] | None) -> list[Any]:
    """Input ``i``'s column contents — the input, then each map, ``B`` cells each — and last the
    interpolation for its pictures."""
    x = inputs[i]
    batch = x.shape[0]
    reason = kinds.undrawable(x)
    if reason is not None:
        warn_user(f"input {i}: cannot draw {reason}", kinds.UndrawableWarning)
        return [[f"cannot draw {reason}"] * batch for _ in range(1 + len(maps))] + ["nearest"]
    kind = kinds.kind_of(x)
    if kind is kinds.Kind.IMAGE:  # exactly as before tuples and other kinds
        columns: list[Any] = [im.to_rgb(x.detach().float().cpu())]
        interpolation = "nearest" if max(x.shape[-2:]) < 100 else "antialiased"
    else:
        shown = kinds.display(x.detach().float().cpu(), None, None)
        columns = [kinds.input_pictures(shown, names)]
        interpolation = "nearest" if kind is not kinds.Kind.VOLUME or max(columns[0].shape[-2:]) < 100 \
            else "antialiased"
    for key, value in maps.items():
        if isinstance(value, str):
            columns.append([value] * batch)
            continue
        attr = dict(kinds.paired(inputs, value)).get(i)
        if attr is None:
            columns.append(["no map for this input"] * batch)
            continue
        problem = kinds.undrawable(x, attr)
        if problem is not None:
            warn_user(f"{key} of input {i}: cannot draw {problem}", kinds.UndrawableWarning)
            columns.append([f"cannot draw {problem}"] * batch)
        elif kind is kinds.Kind.IMAGE:
            columns.append(_render(key, attr, x))
        else:
            columns.append(kinds.map_pictures(attr.detach().float().cpu(), shown, im.look_of(key), names))
    return [*columns, interpolation]


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
