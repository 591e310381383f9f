"""The sanity-check figure: one row per method, one column per randomisation stage.

Pure function from a :class:`torchvis.metrics.sanity.SanityResult` to a matplotlib ``Figure`` (no
pyplot, no files); each map is drawn in its method's look, as in TensorBoard and the explain figure.
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from torchvis.metrics.sanity import SanityResult
from torchvis.rendering import figure as fig_module
from torchvis.rendering import image as im
from torchvis.rendering import kinds

__all__ = ["sanity_figure"]

_PANEL, _LABEL = 1.6, 1.4  # inches: square panels, a column for the method names


def sanity_figure(
    result: SanityResult,
    *,
    example: int = 0,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    dpi: int = 100,
) -> Figure:
    """Maps of one ``example`` per method (rows) and stage (columns: the original model, then each
    cumulative re-initialisation), titled with the stage and the |map| Spearman correlation.

    ``mean``/``std`` undo the input normalisation for the overlays (without them inputs must lie in
    [0, 1]). With a tuple of inputs each method gets one row per input it has a map for, drawn by the
    input's kind (:mod:`torchvis.rendering.kinds`); what cannot be drawn is a text panel. Adebayo et
    al., NeurIPS 2018, figure 2.
    """
    inputs = result.images if isinstance(result.images, tuple) else (result.images,)
    batch = inputs[0].shape[0]
    if not 0 <= example < batch:
        raise ValueError(f"example {example} is out of range for a batch of {batch}")
    shown = [kinds.display(x[example : example + 1].float(), mean, std) for x in inputs]
    shown = [s.clamp(0, 1) if kinds.kind_of(s) is kinds.Kind.IMAGE else s for s in shown]
    columns = ("original", *result.stages)
    # One row per (method, input): the inputs each method has maps for.
    rows = [(method, i) for method in result.methods
            for i, _ in kinds.paired(inputs, result.maps[method][0])]
    cols = len(columns)
    width, height = _LABEL + cols * _PANEL, 0.4 + len(rows) * (_PANEL + 0.35)
    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    explained = fig_module.explained_text(result.target, example)
    figure.suptitle(f"cascading randomisation, example {example} ({explained})", fontsize=11)
    axes = figure.subplots(len(rows), cols, squeeze=False)
    figure.subplots_adjust(left=_LABEL / width * 0.6, right=0.99, top=1 - 0.8 / height, bottom=0.02,
                           hspace=0.45, wspace=0.08)
    for r, (method, i) in enumerate(rows):
        title = fig_module.title_of(method) + (f"\ninput {i}" if len(inputs) > 1 else "")
        for c, stage in enumerate(columns):
            attr = dict(kinds.paired(inputs, result.maps[method][c]))[i][example : example + 1].float()
            ax = axes[r][c]
            reason = kinds.undrawable(inputs[i][example : example + 1], attr)
            if reason is not None:
                ax.text(0.5, 0.5, f"cannot draw {reason}", ha="center", va="center", wrap=True, fontsize=7)
            else:
                picture = kinds.map_pictures(attr, shown[i], im.look_of(method))
                if isinstance(picture, Tensor):
                    ax.imshow(picture[0].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
                else:
                    ax.set_frame_on(False)
                    box = ax.get_position()
                    picture[0](figure, (box.x0, box.y0, box.width, box.height))
            ax.set_xticks([])
            ax.set_yticks([])
            caption = stage if c == 0 else f"{stage}\nρ|·|={_rho(result, method, stage, i)}"
            ax.set_title(caption, fontsize=8)
            if c == 0:
                ax.set_ylabel(title, fontsize=10)
    return figure


def _rho(result: SanityResult, method: str, stage: str, input: int) -> str:
    value = result.row(method, stage, input if isinstance(result.images, tuple) else None).spearman_abs
    return "n/a" if value is None else f"{value:+.2f}"
