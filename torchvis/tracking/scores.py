"""Faithfulness scores over training: one scalar per metric and method, and the chart that groups them.

At each logging step :func:`log_scores` scores every map of the probe batch with each metric and
writes the mean over the batch as ``<prefix>/<metric>/<method>`` (e.g. ``torchvis/deletion/grad_cam``).
:func:`scores_layout` is the TensorBoard custom-scalars layout that draws every method of one metric
on one chart, so the chart shows which map becomes faithful as the model learns.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from torchvis.core.forward import Target
from torchvis.metrics.faithfulness import deletion, deletion_insertion, insertion

__all__ = [
    "METRICS",
    "check_metric_options",
    "check_metrics",
    "log_scores",
    "monitor_pixels_per_step",
    "scores_layout",
]

METRICS: Mapping[str, Callable[..., Tensor]] = {"deletion": deletion, "insertion": insertion}
"""The metrics a monitor can stream, by name."""

_BETTER = {"deletion": "lower is better", "insertion": "higher is better"}

# Points per curve while training: 20 steps (21 points) instead of the metrics' default 100, which keeps
# a logging step with both metrics for 2 methods on 16 digits under twice one without (see
# benchmarks/metrics.py); the trend over training, not the third decimal, is what the chart is for.
MONITOR_STEPS = 20


def check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """The metric names, checked: each must be one of :data:`METRICS`, none twice."""
    if isinstance(metrics, str):
        raise TypeError(f"metrics is a sequence of names, e.g. ({metrics!r},); got the string {metrics!r}")
    names = tuple(metrics)
    for name in names:
        if name not in METRICS:
            close = difflib.get_close_matches(str(name), list(METRICS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown metric {name!r}{hint}; known: {', '.join(METRICS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"metrics names a metric twice: {list(names)}")
    return names


def check_metric_options(options: Mapping[str, Any]) -> None:
    """Each option must be taken by a metric: ``pixels_per_step``, ``baseline``, ``start``, ``batch_size``."""
    known = {p for fn in METRICS.values() for p in inspect.signature(fn).parameters} - {
        "model", "x", "attributions", "target", "return_curves"}
    for key in options:
        if key not in known:
            raise TypeError(f"metric option {key!r} is taken by no metric; known: {', '.join(sorted(known))}")


def monitor_pixels_per_step(x: Tensor) -> int:
    """Pixels per step for streamed scores: ``ceil(H*W / 20)``, 21 points per curve."""
    return max(1, math.ceil(x.shape[-2] * x.shape[-1] / MONITOR_STEPS))


def log_scores(
    writer: Any,
    model: nn.Module,
    x: Tensor,
    maps: Mapping[str, Tensor],
    target: Target,
    *,
    metrics: Sequence[str],
    step: int,
    prefix: str = "torchvis",
    **options: Any,
) -> dict[str, float]:
    """Score each map with each metric; write the means over the batch as ``<prefix>/<metric>/<key>``.

    ``options`` (``pixels_per_step``, ``baseline``, ``start``, ``batch_size``) go to the metrics that
    take them; ``pixels_per_step`` defaults to :func:`monitor_pixels_per_step`. Returns ``{tag: value}``.
    """
    options.setdefault("pixels_per_step", monitor_pixels_per_step(x))
    add_scalar = getattr(writer, "add_scalar", None)
    names = check_metrics(metrics)
    # All metrics of a map at once: one ranking, one target pass (bit-identical to each metric alone).
    aucs = {key: deletion_insertion(model, x, attr, target, metrics=names, **options)
            for key, attr in maps.items()}
    values: dict[str, float] = {}
    for metric in names:
        for key in maps:
            tag = f"{prefix}/{metric}/{key}"
            values[tag] = float(aucs[key][metric].mean())
            if callable(add_scalar):
                add_scalar(tag, values[tag], step)
    return values


def scores_layout(prefix: str, metrics: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
    """A custom-scalars layout (``SummaryWriter.add_custom_scalars``): one chart per metric, with a
    line per method (every tag under ``<prefix>/<metric>/``)."""
    charts = {
        f"{metric} ({_BETTER[metric]})": ["Multiline", [f"^{re.escape(prefix)}/{metric}/"]]
        for metric in check_metrics(metrics)
    }
    return {f"{prefix}: faithfulness": charts}
