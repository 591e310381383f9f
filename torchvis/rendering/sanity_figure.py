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
    [0, 1]). Adebayo et al., NeurIPS 2018, figure 2.
    """
    batch = result.images.shape[0]
    if not 0 <= example < batch:
        raise ValueError(f"example {example} is out of range for a batch of {batch}")
    x = result.images[example : example + 1].float()
    channels = x.shape[1]
    if mean is not None and std is not None:
        x = im.denormalize(x, im.per_channel(mean, channels, "mean"), im.per_channel(std, channels, "std"))
    display = x.clamp(0, 1)
    columns = ("original", *result.stages)
    rows, cols = len(result.methods), len(columns)
    width, height = _LABEL + cols * _PANEL, 0.4 + rows * (_PANEL + 0.35)
    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    target = result.target
    classes = isinstance(target, Tensor) and target.dim() == 1
    explained = f"class {int(target[example])}" if classes else "target"  # type: ignore[index]
    figure.suptitle(f"cascading randomisation, example {example} ({explained})", fontsize=11)
    axes = figure.subplots(rows, cols, squeeze=False)
    for r, method in enumerate(result.methods):
        title = fig_module.title_of(method)
        for c, stage in enumerate(columns):
            attr = result.maps[method][c][example : example + 1].float()
            picture = im.render_map(attr, display, im.look_of(method))[0]
            ax = axes[r][c]
            ax.imshow(picture.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            caption = stage if c == 0 else f"{stage}\nρ|·|={_rho(result, method, stage)}"
            ax.set_title(caption, fontsize=8)
            if c == 0:
                ax.set_ylabel(title, fontsize=10)
    figure.subplots_adjust(left=_LABEL / width * 0.6, right=0.99, top=1 - 0.8 / height, bottom=0.02,
                           hspace=0.45, wspace=0.08)
    return figure


def _rho(result: SanityResult, method: str, stage: str) -> str:
    value = result.row(method, stage).spearman_abs
    return "n/a" if value is None else f"{value:+.2f}"
