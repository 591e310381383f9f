"""The audit's verdict: where each class's mean map concentrates, which classes look somewhere
suspicious, as a markdown report with figures.

The statistic. For a method and a class, the *class mean* is the mean over the class's images of
each map's attribution mass (``|map|`` summed over channels, normalised to total 1 per image:
:func:`torchvis.apps.audit.mass`), so it is a distribution over pixels. Its *share* in a region is the
mass inside that region. The regions are the four corners (each a quarter of the height by a quarter
of the width) and the border (a band an eighth of the shorter side wide). A class is flagged in a
region when its share there is at least :data:`MIN_RATIO` times the median share of the other classes
*and* exceeds that median by at least :data:`MIN_EXCESS` — a cue that one class uses and the others do
not, like a corner mark planted in one class's training images. A class can only be compared with
others, so a data set of one class flags nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from torchvis.apps.audit import Merged
from torchvis.apps.files import write_atomic
from torchvis.rendering.figure import title_of

MIN_RATIO = 3.0
MIN_EXCESS = 0.1
MAX_SHOWN = 40  # classes a figure shows at most (an ImageNet model has 1,000)
REPORT = "report.md"


def region_masks(height: int, width: int) -> dict[str, np.ndarray]:
    """The regions of the statistic, as ``[H,W]`` boolean masks."""
    qh, qw = max(1, round(height / 4)), max(1, round(width / 4))
    band = max(1, round(min(height, width) / 8))
    masks = {name: np.zeros((height, width), dtype=bool) for name in
             ("top-left corner", "top-right corner", "bottom-left corner", "bottom-right corner", "border")}
    masks["top-left corner"][:qh, :qw] = True
    masks["top-right corner"][:qh, width - qw :] = True
    masks["bottom-left corner"][height - qh :, :qw] = True
    masks["bottom-right corner"][height - qh :, width - qw :] = True
    border = masks["border"]
    border[:band] = border[height - band :] = True
    border[:, :band] = border[:, width - band :] = True
    return masks


@dataclass(frozen=True)
class Flag:
    """A class whose mean map concentrates in a region much more than the other classes' do."""

    method: str
    grouping: str
    label: int
    region: str
    share: float
    others: float  # the median share of the other classes


def region_shares(means: np.ndarray) -> dict[str, np.ndarray]:
    """Each region's share of each class mean ``[classes,H,W]``: ``{region: [classes]}``."""
    return {name: (means * mask).sum(axis=(1, 2)) for name, mask in region_masks(*means.shape[1:]).items()}


def suspicious(means: np.ndarray, counts: np.ndarray, method: str, grouping: str) -> list[Flag]:
    """The flags of one method's class means (classes without images take no part)."""
    present = np.flatnonzero(counts > 0)
    flags = []
    for region, shares in region_shares(means).items():
        for c in present:
            others = np.median(shares[[o for o in present if o != c]]) if len(present) > 1 else np.inf
            if shares[c] >= MIN_RATIO * others and shares[c] - others >= MIN_EXCESS:
                flags.append(Flag(method, grouping, int(c), region, float(shares[c]), float(others)))
    return flags


def shown_classes(counts: np.ndarray, flags: Sequence[Flag], grouping: str) -> list[int]:
    """The classes a figure shows, in class order: those with images, at most :data:`MAX_SHOWN` —
    every flagged class, then the ones with the most images."""
    present = [int(c) for c in np.flatnonzero(counts > 0)]
    if len(present) <= MAX_SHOWN:
        return present
    flagged = {f.label for f in flags if f.grouping == grouping}
    ranked = sorted(present, key=lambda c: (c not in flagged, -int(counts[c]), c))
    return sorted(ranked[:MAX_SHOWN])


def class_means_figure(merged: Merged, grouping: str, names: Sequence[str], flags: Sequence[Flag]) -> Figure:
    """Rows = methods, columns = classes (:func:`shown_classes`): each class mean (``inferno``, scaled
    per tile, shown 64 to 128 pixels a side), titled with the class and its image count; a flagged
    region is outlined in cyan. One image in one axes: a figure of hundreds of subplots would cost
    seconds per audit."""
    keys = merged.keys
    shown = shown_classes(merged.counts[grouping], flags, grouping)
    height, width = merged.means[(keys[0], grouping)].shape[1:]
    # Whole factors keep pixels square: enlarge small maps, take every step-th pixel of large ones.
    scale = max(1, -(-64 // min(height, width)))
    step = max(1, min(height, width) // 128)
    tile_h, tile_w = len(range(0, height, step)) * scale, len(range(0, width, step)) * scale
    gap = max(2, scale)
    canvas = np.ones(((tile_h + gap) * len(keys), (tile_w + gap) * max(1, len(shown)), 3))
    inferno = colormaps["inferno"]
    for row, key in enumerate(keys):
        means = merged.means[(key, grouping)]
        for col, c in enumerate(shown):
            top = means[c].max()
            tile = inferno(means[c] / top if top > 0 else means[c])[::step, ::step, :3]
            tile = tile.repeat(scale, axis=0).repeat(scale, axis=1)
            y, x = row * (tile_h + gap), col * (tile_w + gap)
            canvas[y : y + tile_h, x : x + tile_w] = tile
    inches = (canvas.shape[1] / 60, canvas.shape[0] / 60)  # the tiles at 60 pixels an inch
    fig_w, fig_h = inches[0] + 1.8, inches[1] + 1.0  # a margin for row labels, one for titles
    fig = Figure(figsize=(fig_w, fig_h), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((1.7 / fig_w, 0.1 / fig_h, inches[0] / fig_w, inches[1] / fig_h))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    present = int((merged.counts[grouping] > 0).sum())
    extra = f" ({len(shown)} of {present} classes)" if len(shown) < present else ""
    fig.suptitle(f"mean attribution mass by {grouping} class{extra}", fontsize=11)
    for col, c in enumerate(shown):
        ax.text(col * (tile_w + gap) + tile_w / 2, -gap, f"{names[c]}\n({int(merged.counts[grouping][c])})",
                ha="center", va="bottom", fontsize=8)
    for row, key in enumerate(keys):
        ax.text(-gap, row * (tile_h + gap) + tile_h / 2, title_of(key), ha="right", va="center", fontsize=9)
    masks = {region: np.nonzero(mask[::step, ::step]) for region, mask in region_masks(height, width).items()}
    for flag in flags:
        if flag.grouping != grouping or flag.method not in keys or flag.label not in shown:
            continue
        rows, cols = masks[flag.region]
        y0 = keys.index(flag.method) * (tile_h + gap) + rows.min() * scale
        x0 = shown.index(flag.label) * (tile_w + gap) + cols.min() * scale
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), (cols.max() - cols.min() + 1) * scale,
                               (rows.max() - rows.min() + 1) * scale, fill=False, edgecolor="cyan", lw=1.5))
    return fig


def save_png(fig: Figure, path: Path) -> None:
    """Save atomically (:func:`~torchvis.apps.files.write_atomic`)."""
    write_atomic(path, lambda fh: fig.savefig(fh, format="png"))


def write_report(out: Path, merged: Merged, class_names: Sequence[str] | None) -> Path:
    """Write ``report.md`` and its figures into ``out``; returns the report's path."""
    classes = len(merged.counts["true"])
    names = list(class_names) if class_names is not None else [str(c) for c in range(classes)]
    flags = [flag for key in merged.keys for grouping in ("true", "predicted")
             for flag in suspicious(merged.means[(key, grouping)], merged.counts[grouping], key, grouping)]
    for grouping in ("true", "predicted"):
        save_png(class_means_figure(merged, grouping, names, flags), out / f"class_means_{grouping}.png")
    lines = [f"# torchvis audit: {len(merged.rows)} images, methods {', '.join(merged.keys)}", ""]
    lines += _accuracy_table(merged, names)
    verdict = [f for f in flags if f.grouping == "true"]
    lines += ["## Verdict", ""]
    if verdict:
        lines += [f"- **{names[f.label]}** ({f.method}): {f.share:.0%} of its attribution mass lies in the "
                  f"{f.region}; the other classes' median is {f.others:.0%}." for f in verdict]
    else:
        lines.append("No class's mean map concentrates in a corner or the border more than the others' do.")
    lines += ["", f"A class is flagged when its share of mass in a region is at least {MIN_RATIO:g}x the "
              f"other classes' median and {MIN_EXCESS:.0%} above it (regions: the four corners, a quarter "
              "of each side; the border, an eighth of the shorter side).", ""]
    lines += ["## Mean maps by true class", "", "![by true class](class_means_true.png)", "",
              "## Mean maps by predicted class", "", "![by predicted class](class_means_predicted.png)", ""]
    lines += _shares_tables(merged, names)
    empty = {key: n for key, n in merged.empty.items() if n}
    if empty:
        lines += ["## Empty maps", ""]
        lines += [f"- {key}: {n} of {len(merged.rows)} maps are all zero" for key, n in empty.items()] + [""]
    lines += _outside_region(merged)
    path = out / REPORT
    write_atomic(path, lambda fh: fh.write(("\n".join(lines) + "\n").encode("utf-8")))
    return path


def _accuracy_table(merged: Merged, names: Sequence[str]) -> list[str]:
    lines = ["| class | images | accuracy |", "|---|---|---|"]
    for c, name in enumerate(names):
        mine = [r for r in merged.rows if r["label"] == c]
        if mine:
            right = sum(r["predicted"] == c for r in mine) / len(mine)
            lines.append(f"| {name} | {len(mine)} | {right:.1%} |")
    return lines + [""]


def _shares_tables(merged: Merged, names: Sequence[str]) -> list[str]:
    lines = ["## Share of attribution mass per region (by true class)", ""]
    for key in merged.keys:
        shares = region_shares(merged.means[(key, "true")])
        lines += [f"**{key}**", "", "| class | " + " | ".join(shares) + " |", "|---|" + "---|" * len(shares)]
        for c, name in enumerate(names):
            if merged.counts["true"][c]:
                lines.append(f"| {name} | " + " | ".join(f"{s[c]:.2f}" for s in shares.values()) + " |")
        lines.append("")
    return lines


def _outside_region(merged: Merged, top: int = 10) -> list[str]:
    """The images whose maps put the most mass outside their region, per method (when regions exist)."""
    lines: list[str] = []
    for key in merged.keys:
        column = f"inside:{key}"
        if merged.rows and column in merged.rows[0]:
            worst = sorted(merged.rows, key=lambda r: r[column])[:top]
            lines += [f"## Looking outside the region ({key})", ""]
            lines += ["| file | class | inside |", "|---|---|---|"]
            lines += [f"| {r['file']} | {r['label']} | {r[column]:.2f} |" for r in worst] + [""]
    return lines
