"""Faithfulness scores over training: one scalar per metric and method, and the chart that groups them.

At each logging step :func:`log_scores` scores every map of the probe batch with each metric and
writes the mean over the batch as ``<prefix>/<metric>/<method>`` (e.g. ``torchvis/deletion/grad_cam``).
:func:`scores_layout` is the TensorBoard custom-scalars layout that draws every method of one metric
on one chart, so the chart shows which map becomes faithful as the model learns.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from torchvis.core.targets import Target
from torchvis.metrics.faithfulness import METRICS, check_metrics, deletion_insertion

__all__ = [
    "METRICS",
    "check_metric_options",
    "check_metrics",
    "log_scores",
    "monitor_pixels_per_step",
    "scores_layout",
]

_BETTER = {"deletion": "lower is better", "insertion": "higher is better"}

# Points per curve while training: 20 steps (21 points) instead of the metrics' default 100, a fifth of
# the forwards; the trend over training, not the third decimal, is what the chart is for. Even so the
# metrics' forwards dominate a logging step (benchmarks/metrics.py: 2 methods on 16 digits cost about
# 18x a step without metrics; background=True moves that work off the training thread).
MONITOR_STEPS = 20


def check_metric_options(options: Mapping[str, Any]) -> None:
    """Each option must be taken by a metric: ``pixels_per_step``, ``baseline``, ``start``, ``batch_size``."""
    known = set(inspect.signature(deletion_insertion).parameters) - {
        "model", "x", "attributions", "target", "return_curves", "metrics", "forward_args", "forward_kwargs"}
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
    if not names:
        return {}
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
