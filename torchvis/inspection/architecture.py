"""The model graph in TensorBoard's graph tab, with the model left exactly as it was.

``SummaryWriter.add_graph`` traces the model with ``torch.jit.trace`` after ``model.train(False)`` and
restores only the root's flag afterwards (``model.train(was_training)`` sets every submodule to it):
a BatchNorm frozen in eval mode inside a training model comes back in training mode. Here the trace
runs inside :func:`torchvis.forward.guarded`, which restores every submodule's own flag.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from torchvis.core.forward import guarded
from torchvis.inspection.model_summary import example_input

__all__ = ["GraphWriter", "log_graph"]


class GraphWriter(Protocol):
    """Anything with TensorBoard's ``add_graph`` (``torch.utils.tensorboard.SummaryWriter``)."""

    def add_graph(
        self,
        model: nn.Module,
        input_to_model: Any = None,
        verbose: bool = False,
        use_strict_trace: bool = True,
    ) -> None: ...


def log_graph(
    writer: GraphWriter, model: nn.Module, input: Tensor | Sequence[int], *, strict: bool = True
) -> None:
    """Trace ``model`` on ``input`` (a tensor or a shape, see :func:`torchvis.summary.example_input`)
    in eval mode and write its graph; every submodule's mode, the hooks and the global RNG are kept.

    ``strict=False`` lets the tracer record models that return lists or dicts.
    """
    x = example_input(model, input)
    with guarded(model, x, grad=False), torch.no_grad(), warnings.catch_warnings():
        # add_graph has no other backend yet; the deprecation is torch's to resolve, not the caller's.
        # TracerWarnings (a graph that depends on the input's values) stay visible.
        warnings.filterwarnings("ignore", r"`torch\.jit\.trace(_method)?` is deprecated", FutureWarning)
        writer.add_graph(model, x, use_strict_trace=strict)
