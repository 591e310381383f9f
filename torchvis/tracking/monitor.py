"""Watch attribution maps evolve during training: a fixed probe batch, logged every ``every`` steps.

Between logging steps :meth:`Monitor.step` costs one modulo: no hook is registered and no tensor is
kept but the probe batch. A logging step runs :func:`torchvis.tensorboard.log_attributions` on the
current weights; it leaves training exactly as it was (eval mode only inside, every submodule's
mode restored, the global RNG forked, gradients taken with ``torch.autograd.grad``, no ``.grad``
touched), so a run with the monitor trains bit-identically to one without.

With ``background=True`` a logging step only copies the weights: parameters and buffers go into a
snapshot slot, and one worker thread loads the slot into a shadow model (a ``copy.deepcopy`` of the
model made at construction, and again after the model changes dtype, device or shapes), computes the
maps on it, renders and writes them. The training thread waits for the copy only — unless
``queue_size`` steps are already waiting, when it blocks until the worker takes one (nothing is ever
dropped). A worker error is raised at the next :meth:`Monitor.step`, :meth:`Monitor.log` or
:meth:`Monitor.close`; :meth:`Monitor.close` waits for every queued step.
"""

from __future__ import annotations

import copy
import queue
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from torchvis.core.hooks import LayerRef
from torchvis.core.inputs import InputLike, Inputs
from torchvis.core.targets import Target, as_target
from torchvis.methods.spec import Look
from torchvis.tracking.scores import check_metric_options, check_metrics, scores_layout
from torchvis.tracking.tensorboard import (
    FeatureNames,
    Labels,
    Methods,
    Sink,
    Stats,
    check_logging,
    check_sink,
    check_writable,
    host_labels,
    is_closed,
    log_checked,
    model_device,
    moved,
)


class Monitor:
    """Log maps of a fixed probe batch (``images``, ``labels`` [B]) every ``every`` steps.

    Example::

        writer = SummaryWriter("runs/digits")
        with Monitor(model, writer, probe_x, probe_y, layer="relu2", every=100,
                     mean=MNIST_MEAN, std=MNIST_STD) as monitor:
            for step, (x, y) in enumerate(batches):
                ...  # forward, backward, optimizer step
                monitor.step(step)

    Tags and looks are those of :func:`torchvis.tensorboard.log_attributions`; the input grid is
    logged once, at the first logging step. ``labels`` (the true classes, or ``None``) are shown
    next to the predictions and give the ``probe_accuracy`` scalar. ``target`` chooses the
    class explained (None: the predicted one; ``target=labels``: the true one). ``metrics``, e.g.
    ``("deletion", "insertion")``, add a scalar per metric and method at every logging step
    (``<prefix>/deletion/grad_cam``: the mean AUC over the probe, 21 points per curve unless
    ``metric_options`` say otherwise) and, once, a TensorBoard custom-scalars layout that draws each
    metric's methods on one chart (the Custom Scalars tab). The probe is copied
    to the model's device now, and again if the model moves or changes dtype. With ``background=True``
    the maps are computed off the training thread (see the module docstring), which costs a shadow
    copy of the model and ``queue_size`` snapshots of its weights in memory. Every argument is
    checked here, so a mistake fails at construction, not at step 5,000.

    The probe may be any input a method takes — a tensor ``[B, ...]`` (an image batch, a table
    ``[B,N]``, signals ``[B,C,L]``, volumes ``[B,C,D,H,W]``) or a tuple of them — with
    ``forward_args``/``forward_kwargs`` for the model (tensors among them follow the model's device,
    floating ones its dtype, like the probe), and ``feature_names`` for tables; each kind is drawn as
    :func:`~torchvis.tracking.tensorboard.log_attributions` says. ``target`` may be a callable
    ``f(output) -> [B]`` (the text then names it and the score) or a tuple indexing a larger output,
    and a model may return one score per example ``[B]`` (no ``labels`` then). The deletion/insertion
    ``metrics`` need one image probe (any target, with or without forward arguments).

    Under DDP, build it on rank 0 only with ``ddp_model.module``. :meth:`close` (or leaving the
    ``with`` block, or normal interpreter exit) flushes the writer; it does not close it, since the
    writer is yours.
    """

    def __init__(
        self,
        model: nn.Module,
        writer: Sink,
        images: InputLike,
        labels: Labels | None,
        *,
        methods: Methods = ("saliency", "grad_cam"),
        layer: LayerRef | None | Sequence[LayerRef | None] = None,
        every: int = 100,
        target: Target = None,
        mean: Stats | None = None,
        std: Stats | None = None,
        class_names: Sequence[str] | None = None,
        feature_names: FeatureNames = None,
        prefix: str = "torchvis",
        looks: Mapping[str, Look] | None = None,
        metrics: Sequence[str] = (),
        metric_options: Mapping[str, Any] | None = None,
        background: bool = False,
        queue_size: int = 2,
        forward_args: Any = None,
        forward_kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError("pass ddp_model.module, and build the Monitor on rank 0 only: a DDP forward "
                            "on one rank would wait for the others forever")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int (log every `every` steps); got {every!r}")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be a positive int; got {queue_size!r}")
        inputs = check_logging(model, images, labels, methods=methods, layer=layer, target=target, mean=mean,
                               std=std, class_names=class_names, options=options, feature_names=feature_names,
                               metrics=metrics, forward_args=forward_args, forward_kwargs=forward_kwargs)
        self.metrics = check_metrics(metrics)
        check_metric_options(metric_options or {})
        check_sink(writer)
        check_writable(writer)
        self.model, self.writer, self.every = model, writer, every
        self._options: dict[str, Any] = dict(
            methods=tuple(methods), layer=layer, mean=mean, std=std, class_names=class_names,
            feature_names=feature_names, prefix=prefix, looks=looks, metrics=self.metrics,
            metric_options=dict(metric_options or {}),
            **options,
        )
        self._prefix = prefix
        device = model_device(model) or inputs.device
        # Copies, so later in-place changes to the user's tensors cannot reach the probe.
        self._probe = moved(inputs, device, copy=True)
        self._key: tuple[torch.device, torch.dtype] | None = None
        self._inputs = self._follow_dtype(model_dtype(model))
        self.labels = host_labels(labels)
        target = as_target(target)
        self.target = target.to(device, copy=True) if isinstance(target, Tensor) else target
        self.logged_steps: list[int] = []
        self._closed = False
        self._background = _Background(model, writer, queue_size) if background else None
        worker = self._background
        self._finalizer = weakref.finalize(self, _finish, writer, worker)  # also runs at interpreter exit

    def step(self, step: int) -> bool:
        """Log if ``step % every == 0``; returns whether it did."""
        if self._closed:
            raise RuntimeError("this Monitor is closed")
        if self._background is not None:
            self._background.raise_error()
        if step % self.every:
            return False
        self.log(step)
        return True

    def log(self, step: int) -> None:
        """Log now, whatever the step (in background mode: snapshot the weights and queue the step)."""
        if self._closed:
            raise RuntimeError("this Monitor is closed")
        check_sink(self.writer)
        if self._background is not None:
            self._background.raise_error()
        self._follow(self.model)
        kwargs = dict(labels=self.labels, log_inputs=not self.logged_steps, **self._options)
        add_layout = getattr(self.writer, "add_custom_scalars", None)
        if self.metrics and not self.logged_steps and callable(add_layout):
            add_layout(scores_layout(self._prefix, self.metrics))  # once: the charts of every method
        # Checked at construction: the step logs without checking the probe, labels and options again.
        if self._background is not None:
            self._background.submit(step, self._inputs, self.target, kwargs)
        else:
            log_checked(self.writer, self.model, self._inputs, self.target, step=step, **kwargs)
        self.logged_steps.append(step)

    @property
    def images(self) -> InputLike:
        """The probe as the model gets it (on its device, in its dtype): a tensor, or a tuple."""
        tensors = self._inputs.tensors
        return tensors if self._inputs.was_tuple else tensors[0]

    def _follow(self, model: nn.Module) -> None:
        """Move the probe (and a tensor target) to the model's device and dtype, if they changed."""
        device, dtype = model_device(model), model_dtype(model)
        if device is not None and device != self._inputs.device:
            self._probe = moved(self._probe, device)
            if isinstance(self.target, Tensor):
                self.target = self.target.to(device)
        self._inputs = self._follow_dtype(dtype)

    def _follow_dtype(self, dtype: torch.dtype | None) -> Inputs:
        """The probe, and the floating tensors among its forward arguments, in ``dtype`` — made from the
        first copy, so a round trip through bfloat16 loses nothing; remade only when the device or the
        dtype changed (``moved`` returns tensors already right as they are)."""
        key = (self._probe.device, dtype or self._probe.first.dtype)
        if key != self._key:
            self._inputs, self._key = moved(self._probe, *key), key
        return self._inputs

    def wait(self) -> None:
        """Block until every logging step queued so far (``background=True``) is written, and raise
        the first error of one that failed; returns at once in the foreground. The writer is not
        flushed (:meth:`close` does that)."""
        if self._background is not None:
            self._background.wait()

    def close(self) -> None:
        """Wait for queued steps (background mode), flush the writer and stop; later calls to
        :meth:`step` raise. A background error not yet raised is raised here."""
        if not self._closed:
            self._closed = True
            self._finalizer()
            if self._background is not None:
                self._background.raise_error()

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


def _finish(writer: Sink, background: _Background | None) -> None:
    if background is not None:
        background.stop()
    _flush(writer)


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating parameter (or buffer); None if it has none."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


_Job = tuple[int, list[Tensor], list[bool], Inputs, Any, dict[str, Any]]


class _Background:
    """One worker thread that logs snapshots of the model's weights on a shadow copy of it."""

    def __init__(self, model: nn.Module, writer: Sink, queue_size: int) -> None:
        self.model, self.writer, self.queue_size = model, writer, queue_size
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.errors: list[tuple[int, BaseException]] = []
        self._shadow(model)
        self.worker = threading.Thread(target=self._work, name="torchvis-monitor", daemon=True)
        self.worker.start()

    def _shadow(self, model: nn.Module) -> None:
        """A fresh shadow model and ``queue_size`` snapshot slots shaped like the model's tensors."""
        try:
            self.shadow = copy.deepcopy(model)
        except Exception as err:
            raise TypeError(
                f"background=True needs a copy of the model (copy.deepcopy), which failed: {err}"
            ) from err
        self.sources = [*model.parameters(), *model.buffers()]
        self.targets = [*self.shadow.parameters(), *self.shadow.buffers()]
        self.free: queue.Queue[list[Tensor]] = queue.Queue()
        for _ in range(self.queue_size):
            self.free.put([t.detach().clone() for t in self.sources])

    def submit(self, step: int, inputs: Inputs, target: Any, kwargs: dict[str, Any]) -> None:
        """Copy the weights into a free slot (waiting for one if ``queue_size`` steps are queued) and
        queue the step."""
        sources = [*self.model.parameters(), *self.model.buffers()]
        if not self._fits(sources):  # model.double(), .to(device), a new layer: start a new shadow
            self.wait()
            self._shadow(self.model)
            sources = self.sources
        slot = self.free.get()
        with torch.no_grad():
            torch._foreach_copy_(slot, [t.detach() for t in sources])
        modes = [m.training for m in self.model.modules()]
        self.jobs.put((step, slot, modes, inputs, target, kwargs))

    def _fits(self, sources: list[Tensor]) -> bool:
        return len(sources) == len(self.sources) and all(
            a is b or (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device)
            for a, b in zip(sources, self.targets, strict=True)
        )

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                self._log(*job)
            except BaseException as err:  # noqa: BLE001 - raised in the training thread
                self.errors.append((job[0] if job is not None else -1, err))
            finally:
                self.jobs.task_done()

    def _log(self, step: int, slot: list[Tensor], modes: list[bool], inputs: Inputs, target: Any,
             kwargs: dict[str, Any]) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.targets, slot)
        self.free.put(slot)
        for module, training in zip(self.shadow.modules(), modes, strict=True):
            module.training = training
        log_checked(self.writer, self.shadow, inputs, target, step=step, **kwargs)

    def wait(self) -> None:
        """Wait for every queued step, then raise the first error not raised yet."""
        self.jobs.join()
        self.raise_error()

    def raise_error(self) -> None:
        """Raise the first error of the worker not raised yet."""
        if self.errors:
            step, err = self.errors.pop(0)
            message = f"background logging of step {step} failed: {type(err).__name__}: {err}"
            raise RuntimeError(message) from err

    def stop(self) -> None:
        """Wait for every queued step, then end the worker."""
        if self.worker.is_alive():
            self.jobs.put(None)
            self.worker.join()
