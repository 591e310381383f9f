"""Watch attribution maps evolve during training: a fixed probe batch, logged every ``every`` steps.

Between logging steps :meth:`Monitor.step` costs one modulo: no hook is registered and no tensor is
kept but the probe batch. A logging step runs :func:`torchvis.tensorboard.log_attributions` on the
current weights; it leaves training exactly as it was (eval mode only inside, every submodule's
mode restored, the global RNG forked, gradients taken with ``torch.autograd.grad``, no ``.grad``
touched), so a run with the monitor trains bit-identically to one without.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from torchvis.core.forward import Target
from torchvis.core.hooks import LayerRef
from torchvis.methods.spec import Look
from torchvis.tracking.scores import check_metric_options, check_metrics, scores_layout
from torchvis.tracking.tensorboard import (
    Labels,
    Methods,
    Sink,
    Stats,
    check_logging,
    check_sink,
    check_writable,
    is_closed,
    log_attributions,
    model_device,
)


class Monitor:
    """Log maps of a fixed probe batch (``images`` [B,C,H,W], ``labels`` [B]) every ``every`` steps.

    Example::

        writer = SummaryWriter("runs/digits")
        with Monitor(model, writer, probe_x, probe_y, layer="relu2", every=100,
                     mean=MNIST_MEAN, std=MNIST_STD) as monitor:
            for step, (x, y) in enumerate(batches):
                ...  # forward, backward, optimizer step
                monitor.step(step)

    Tags and looks are those of :func:`torchvis.tensorboard.log_attributions`; the input grid is
    logged once, at the first logging step. ``labels`` (the true classes) are required: they are
    shown next to the predictions and give the ``probe_accuracy`` scalar. ``target`` chooses the
    class explained (None: the predicted one; ``target=labels``: the true one). ``metrics``, e.g.
    ``("deletion", "insertion")``, add a scalar per metric and method at every logging step
    (``<prefix>/deletion/grad_cam``: the mean AUC over the probe, 21 points per curve unless
    ``metric_options`` say otherwise) and, once, a TensorBoard custom-scalars layout that draws each
    metric's methods on one chart (the Custom Scalars tab). The probe is copied
    to the model's device now, and again if the model moves. Every argument is checked here, so a
    mistake fails at construction, not at step 5,000. Under DDP, build it on rank 0 only with
    ``ddp_model.module``. :meth:`close` (or leaving the ``with`` block, or normal interpreter exit)
    flushes the writer; it does not close it, since the writer is yours.
    """

    def __init__(
        self,
        model: nn.Module,
        writer: Sink,
        images: Tensor,
        labels: Labels,
        *,
        methods: Methods = ("saliency", "grad_cam"),
        layer: LayerRef | None | Sequence[LayerRef | None] = None,
        every: int = 100,
        target: Target = None,
        mean: Stats | None = None,
        std: Stats | None = None,
        class_names: Sequence[str] | None = None,
        prefix: str = "torchvis",
        looks: Mapping[str, Look] | None = None,
        metrics: Sequence[str] = (),
        metric_options: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError("pass ddp_model.module, and build the Monitor on rank 0 only: a DDP forward "
                            "on one rank would wait for the others forever")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int (log every `every` steps); got {every!r}")
        if labels is None:
            raise ValueError("the Monitor needs the probe's labels (the true classes, shown next to the "
                             "predictions); pass labels=[B] class indices")
        check_logging(model, images, labels, methods=methods, layer=layer, target=target, mean=mean, std=std,
                      class_names=class_names, options=options)
        self.metrics = check_metrics(metrics)
        check_metric_options(metric_options or {})
        check_sink(writer)
        check_writable(writer)
        self.model, self.writer, self.every = model, writer, every
        self._options: dict[str, Any] = dict(
            methods=tuple(methods), layer=layer, mean=mean, std=std, class_names=class_names,
            prefix=prefix, looks=looks, metrics=self.metrics, metric_options=dict(metric_options or {}),
            **options,
        )
        self._prefix = prefix
        device = model_device(model) or images.device
        # Copies, so later in-place changes to the user's tensors cannot reach the probe.
        self.images = images.detach().to(device, copy=True)
        self.labels = torch.as_tensor(labels).to(device, copy=True)
        self.target = target.to(device, copy=True) if isinstance(target, Tensor) else target
        self.logged_steps: list[int] = []
        self._closed = False
        self._finalizer = weakref.finalize(self, _flush, writer)  # also runs at interpreter exit

    def step(self, step: int) -> bool:
        """Log if ``step % every == 0``; returns whether it did."""
        if self._closed:
            raise RuntimeError("this Monitor is closed")
        if step % self.every:
            return False
        self.log(step)
        return True

    def log(self, step: int) -> None:
        """Log now, whatever the step."""
        if self._closed:
            raise RuntimeError("this Monitor is closed")
        check_sink(self.writer)
        device = model_device(self.model)
        if device is not None and device != self.images.device:
            self.images, self.labels = self.images.to(device), self.labels.to(device)
            if isinstance(self.target, Tensor):
                self.target = self.target.to(device)
        log_attributions(self.writer, self.model, self.images, self.target, step=step, labels=self.labels,
                         log_inputs=not self.logged_steps, **self._options)
        add_layout = getattr(self.writer, "add_custom_scalars", None)
        if self.metrics and not self.logged_steps and callable(add_layout):
            add_layout(scores_layout(self._prefix, self.metrics))  # once: the charts of every method
        self.logged_steps.append(step)

    def close(self) -> None:
        """Flush the writer and stop; later calls to :meth:`step` raise."""
        if not self._closed:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _flush(writer: Sink) -> None:
    flush: Callable[[], None] | None = getattr(writer, "flush", None)
    if callable(flush) and not is_closed(writer):
        flush()
