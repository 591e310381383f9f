"""Attribution maps from a Lightning ``Trainer``: a callback that logs a fixed probe batch.

Needs the ``lightning`` package (``pip install "torchvis[lightning]"``), or ``pytorch_lightning`` when
only that is installed; ``import torchvis`` never imports either. The maps go through the trainer's
:class:`TensorBoardLogger` with the tags of :func:`torchvis.tensorboard.log_attributions`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

try:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
except ImportError:
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.loggers import TensorBoardLogger  # type: ignore[assignment]
    except ImportError as err:
        raise ImportError(
            'torchvis.tracking.lightning needs Lightning: pip install "torchvis[lightning]"'
        ) from err

from torchvis.core.hooks import LayerRef
from torchvis.core.inputs import InputLike, as_inputs
from torchvis.core.targets import Target
from torchvis.methods.spec import Look
from torchvis.tracking.monitor import Monitor
from torchvis.tracking.scores import check_metric_options, check_metrics
from torchvis.tracking.tensorboard import (
    FeatureNames,
    Labels,
    Methods,
    Stats,
    check_logging,
    moved,
)

__all__ = ["AttributionCallback"]


class AttributionCallback(pl.Callback):
    """Log maps of a fixed probe batch (``images``, ``labels`` [B]) every ``every_n_steps`` optimizer
    steps, through the trainer's TensorBoard logger.

    Example::

        callback = AttributionCallback(probe_x, probe_y, layer="model.conv2", every_n_steps=100,
                                       mean=MNIST_MEAN, std=MNIST_STD)
        Trainer(callbacks=[callback], logger=TensorBoardLogger("runs")).fit(module, loader)

    The step is ``trainer.global_step`` (optimizer steps): the state before training is logged at
    step 0, then after every ``every_n_steps``-th optimizer step, each step once also under
    ``accumulate_grad_batches`` (``every_n_steps=None``: never during training). With
    ``on_validation``, the end of every validation epoch (not the sanity check) logs too, at the
    current step unless that step was already logged; this works from ``trainer.validate``, whose
    ``torch.inference_mode`` is left for the duration of the log (the probe, the weights and the maps
    are ordinary tensors). Only global rank zero computes, on the unwrapped ``pl_module``, whose
    forward returns ``[B, classes]`` logits, one score per example ``[B]`` (no ``labels`` then), or
    anything a callable or tuple ``target`` reads; no collective is called. The probe is any input
    the methods take: a tensor ``[B, ...]`` (images, tables, signals, volumes) or a tuple of them,
    with ``forward_args``/``forward_kwargs`` and ``feature_names`` as in
    :class:`~torchvis.monitor.Monitor`. Training is unchanged bit for bit (see
    :class:`torchvis.monitor.Monitor`). A missing TensorBoard logger fails at ``setup``,
    a bad probe, layer, method or option at the start of fit or validation, on every rank (an unknown
    metric already here). ``metrics`` and ``metric_options`` as in :class:`~torchvis.monitor.Monitor`.
    ``background=True`` computes and writes the maps in a worker thread on a snapshot of the weights
    (see :class:`torchvis.monitor.Monitor`); ``teardown`` waits for the queued steps.
    """

    def __init__(
        self,
        images: InputLike,
        labels: Labels | None,
        *,
        methods: Methods = ("saliency", "grad_cam"),
        layer: LayerRef | None | Sequence[LayerRef | None] = None,
        every_n_steps: int | None = 100,
        on_validation: bool = False,
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
        forward_args: Any = None,
        forward_kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1
        ):
            raise ValueError(f"every_n_steps must be a positive int or None; got {every_n_steps!r}")
        if every_n_steps is None and not on_validation:
            raise ValueError("with every_n_steps=None and on_validation=False nothing would be logged")
        # Copies made outside inference_mode are ordinary tensors, which autograd accepts later; the
        # extra arguments are copied too, so that a later in-place change of the user's reaches neither.
        inputs = as_inputs(images, forward_args, forward_kwargs)
        inputs = moved(inputs, inputs.device, copy=True)
        self.images: InputLike = inputs.tensors if inputs.was_tuple else inputs.first
        forward_args = inputs.forward_args or None
        forward_kwargs = dict(inputs.forward_kwargs) or None
        self.labels = labels.detach().clone() if isinstance(labels, Tensor) else labels
        self.every_n_steps, self.on_validation = every_n_steps, on_validation
        check_metric_options(metric_options or {})
        self.options = options
        self.kwargs: dict[str, Any] = dict(
            methods=tuple(methods), layer=layer, target=target, mean=mean, std=std,
            class_names=class_names, feature_names=feature_names, forward_args=forward_args,
            forward_kwargs=forward_kwargs, prefix=prefix, looks=looks, metrics=check_metrics(metrics),
            metric_options=dict(metric_options or {}), **options,
        )
        self.background = background
        self.monitor: Monitor | None = None
        self.logged_steps: list[int] = []  # by the latest fit or validate, on this rank
        self._started = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        tensorboard_logger(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on_validation:  # within fit, on_fit_start came first
            self._start(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_if_due(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._log_if_due(trainer)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on_validation and not trainer.sanity_checking:
            self._log(trainer.global_step)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.monitor is not None:
            self.monitor.close()  # flushes the logger's writer
        self.monitor, self._started = None, False

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.teardown(trainer, pl_module, "exception")  # keep what was logged before the crash

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the arguments against the model on every rank (so that all ranks fail alike, after the
        strategy has built and placed the model); build the monitor on global rank zero."""
        if self._started:
            return
        kw = self.kwargs
        if trainer.is_global_zero:
            writer = tensorboard_logger(trainer).experiment
            # trainer.validate runs its hooks under inference_mode; the probe must not become an
            # inference tensor when the monitor copies it. The Monitor checks the arguments as it is built.
            with torch.inference_mode(False):
                self.monitor = Monitor(pl_module, writer, self.images, self.labels,
                                       every=self.every_n_steps or 1, background=self.background, **kw)
        else:
            check_logging(pl_module, self.images, self.labels, methods=kw["methods"], layer=kw["layer"],
                          target=kw["target"], mean=kw["mean"], std=kw["std"], class_names=kw["class_names"],
                          options=self.options, feature_names=kw["feature_names"], metrics=kw["metrics"],
                          forward_args=kw["forward_args"], forward_kwargs=kw["forward_kwargs"])
        self._started, self.logged_steps = True, []

    def _log_if_due(self, trainer: pl.Trainer) -> None:
        step = trainer.global_step
        if self.every_n_steps is not None and step % self.every_n_steps == 0:
            self._log(step)

    def _log(self, step: int) -> None:
        # Under gradient accumulation global_step stays put for several batches: log it once.
        if self.monitor is None or step in self.logged_steps:
            return
        with torch.inference_mode(False):
            self.monitor.log(step)
        self.logged_steps.append(step)


def tensorboard_logger(trainer: pl.Trainer) -> TensorBoardLogger:
    """The trainer's first :class:`TensorBoardLogger`; ``ValueError`` when it has none."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger
    have = ", ".join(type(logger).__name__ for logger in trainer.loggers) or "none"
    raise ValueError(
        f"AttributionCallback logs images through a TensorBoardLogger; the trainer's loggers: {have}. "
        "Pass Trainer(logger=TensorBoardLogger(save_dir)) (or a list that includes one)"
    )
