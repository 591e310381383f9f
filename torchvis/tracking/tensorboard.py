"""Attribution maps to TensorBoard (or any sink with ``add_images``): one call per batch and step.

:func:`log_attributions` runs :func:`torchvis.explain` on a batch, renders each map with
:mod:`torchvis.image` on the model's device, and writes, under ``prefix`` (default ``"torchvis"``):

=============================  =====================================================================
tag                            content
=============================  =====================================================================
``<prefix>/<method>``          one grid per method and step: the batch's maps in batch order, row by
                               row, ``grid_columns(B)`` per row (``<prefix>/grad_cam/<layer>`` when
                               several layers are asked)
``<prefix>/input``             the batch as the model's inputs, shown denormalised with ``mean`` and
                               ``std``, in the same grid layout (only when ``log_inputs``)
``<prefix>/classes``           text: a markdown table of each tile's true class (given ``labels``),
                               predicted class and its softmax probability ``p``, and the class
                               explained when ``target`` is given (TensorBoard lists the tag as
                               ``<prefix>/classes/text_summary``)
``<prefix>/probe_accuracy``    scalar, when ``labels`` are given and the sink has ``add_scalar``
``<prefix>/<metric>/<method>`` scalar per ``metrics`` entry and map: the mean deletion or insertion
                               AUC over the batch (:mod:`torchvis.tracking.scores`)
=============================  =====================================================================

The grid has :func:`torchvis.image.grid_columns` columns, so its rows are as full as they can be (10
probes: two rows of 5, not 8 + 2). Inputs under :data:`torchvis.image.LEGIBLE` (96) pixels on the
short side are enlarged for display by a whole factor, repeating pixels (:func:`torchvis.image.enlarge`:
a 28 px digit becomes a 112 px tile). Each map is drawn in the look of its method
(:class:`torchvis.Look`, given when the method is registered; override with ``looks=``). Images go
to the sink as uint8 ``[1,3,H,W]`` on the CPU: one device-to-host copy per grid, and no sink-side
scaling to guess.

:class:`PNGWriter` is a sink for people who do not open TensorBoard: ``<folder>/<tag>/step_000100.png``
with each ``/`` of the tag replaced by ``-``.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.tensorboard import summary

from torchvis.core.forward import (
    Target,
    as_target,
    check_input,
    checked_logits,
    guarded,
    resolve_target,
)
from torchvis.core.hooks import LayerRef, resolve_layer
from torchvis.methods.combine import explain, unique_specs
from torchvis.methods.spec import Look, MethodSpec
from torchvis.rendering import image
from torchvis.tracking.scores import check_metric_options, check_metrics, log_scores


class Sink(Protocol):
    """What :func:`log_attributions` writes to: ``torch.utils.tensorboard.SummaryWriter``, Lightning's
    ``trainer.logger.experiment``, :class:`PNGWriter`, or your own. ``add_scalar`` is optional."""

    def add_images(self, tag: str, img_tensor: Any, global_step: int | None = None) -> None: ...

    def add_text(self, tag: str, text_string: str, global_step: int | None = None) -> None: ...



Stats = float | Sequence[float]
Labels = Tensor | Sequence[int]
Methods = Sequence[str | Callable[..., Tensor]]


def log_attributions(
    writer: Sink,
    model: nn.Module,
    images: Tensor,
    target: Target = None,
    *,
    step: int,
    methods: Methods = ("saliency", "grad_cam"),
    labels: Labels | None = None,
    layer: LayerRef | None | Sequence[LayerRef | None] = None,
    mean: Stats | None = None,
    std: Stats | None = None,
    class_names: Sequence[str] | None = None,
    prefix: str = "torchvis",
    log_inputs: bool = True,
    looks: Mapping[str, Look] | None = None,
    metrics: Sequence[str] = (),
    metric_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> dict[str, Tensor]:
    """Explain ``images`` [B,C,H,W] with each method and log the grids; returns ``{tag: uint8 [1,3,H',W']}``.

    ``images`` are the model's (normalised) inputs; ``mean``/``std`` undo that normalisation for
    display (without them the inputs must lie in [0, 1]). ``target`` as in every method (None: the
    predicted class). ``labels`` [B] are the true classes, shown in the text. Inputs, labels and a
    tensor target are moved to the model's device. One extra no-grad forward pass finds the
    predictions; the maps then explain exactly the classes the text shows. ``metrics`` (names of
    :data:`torchvis.tracking.scores.METRICS`) add one scalar per metric and map,
    ``<prefix>/<metric>/<method>``: the mean over the batch (see :func:`~torchvis.tracking.scores.log_scores`,
    which takes ``metric_options``).
    """
    check_metrics(metrics)
    check_metric_options(metric_options or {})
    check_logging(model, images, labels, methods=methods, layer=layer, target=target, mean=mean, std=std,
                  class_names=class_names, options=options)
    check_sink(writer)
    device = model_device(model) or images.device
    x = images.detach().to(device)
    y = None if labels is None else torch.as_tensor(labels).to(device)
    target = as_target(target)
    if isinstance(target, Tensor):
        target = target.to(device)
    with guarded(model, x, grad=False), torch.no_grad():
        logits = checked_logits(model(x), x.shape[0]).float()
    if class_names is not None and len(class_names) != logits.shape[1]:
        raise ValueError(f"class_names has {len(class_names)} names; the model has {logits.shape[1]} classes")
    if y is not None and int(y.max()) >= logits.shape[1]:
        raise ValueError(f"labels go up to {int(y.max())}; the model has {logits.shape[1]} classes")
    predicted = logits.argmax(dim=1)
    explained = predicted if target is None else resolve_target(target, logits)
    maps = explain(model, x, explained, methods=methods, layer=layer, **options)

    display = input_display(x, mean, std).float()
    grids = {f"{prefix}/input": display} if log_inputs else {}
    for key, attr in maps.items():
        grids[f"{prefix}/{key}"] = image.render_map(attr.float(), display, image.look_of(key, looks))
    # Small inputs are enlarged (whole factor, nearest neighbour) so that a 28 px digit is legible.
    columns = image.grid_columns(x.shape[0])
    logged = {tag: image.to_uint8(image.grid(image.enlarge(tiles), nrow=columns))[None]
              for tag, tiles in grids.items()}
    for tag, grid in logged.items():
        writer.add_images(tag, grid, step)

    probability = logits.softmax(dim=1).gather(1, predicted[:, None])[:, 0]
    names = list(class_names) if class_names is not None else [str(c) for c in range(logits.shape[1])]
    writer.add_text(f"{prefix}/classes", classes_text(
        names, predicted.tolist(), probability.tolist(),
        None if y is None else y.tolist(), None if target is None else explained.tolist(),
    ), step)
    add_scalar = getattr(writer, "add_scalar", None)
    if y is not None and callable(add_scalar):
        add_scalar(f"{prefix}/probe_accuracy", (predicted == y).float().mean().item(), step)
    if metrics:
        log_scores(writer, model, x, maps, explained, metrics=metrics, step=step, prefix=prefix,
                   **(metric_options or {}))
    return logged


def input_display(x: Tensor, mean: Stats | None, std: Stats | None) -> Tensor:
    """The inputs [B,C,H,W] as pictures in [0, 1]: denormalised when ``mean`` and ``std`` are given."""
    if mean is None or std is None:
        return x
    c = x.shape[1]
    return image.denormalize(x, image.per_channel(mean, c, "mean"), image.per_channel(std, c, "std"))


def classes_text(
    names: Sequence[str],
    predicted: Sequence[int],
    probability: Sequence[float],
    labels: Sequence[int] | None,
    explained: Sequence[int] | None,
) -> str:
    """A markdown table, one row per tile (batch order, grids filled row by row); ``p`` is the
    softmax probability of the predicted class, and a wrong prediction is bold and marked ✗."""
    header = ["#"] + (["true"] if labels is not None else []) + ["predicted", "p"]
    header += ["explained"] if explained is not None else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, (pred, p) in enumerate(zip(predicted, probability, strict=True)):
        row = [str(i)]
        if labels is not None:
            row.append(names[labels[i]])
        row += [names[pred] if labels is None or pred == labels[i] else f"**{names[pred]}** ✗", f"{p:.2f}"]
        row += [names[explained[i]]] if explained is not None else []
        lines.append("| " + " | ".join(row) + " |")
    if labels is not None:
        right = sum(pred == label for pred, label in zip(predicted, labels, strict=True))
        lines.insert(0, f"{right} of {len(labels)} correct\n")
    return "\n".join(lines)


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (or buffer); None for a model with neither."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return None


# --- checks that run before any model call ----------------------------------------------------------

def check_logging(
    model: nn.Module,
    images: Tensor,
    labels: Labels | None,
    *,
    methods: Methods,
    layer: LayerRef | None | Sequence[LayerRef | None],
    mean: Stats | None,
    std: Stats | None,
    class_names: Sequence[str] | None,
    options: Mapping[str, Any],
    target: Target = None,
) -> None:
    """Raise for anything that would only fail at a logging step; runs no model."""
    check_input(images)
    batch, channels = images.shape[:2]
    check_target(target, batch)
    if labels is not None:
        y = torch.as_tensor(labels)
        if y.dim() != 1 or y.shape[0] != batch or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"labels must be {batch} integer class indices; got {y.dtype} {list(y.shape)}")
        high = len(class_names) if class_names is not None else math.inf
        if int(y.min()) < 0 or int(y.max()) >= high:
            raise ValueError(f"labels must lie in [0, {high}); got {y.min().item()}..{y.max().item()}")
    specs = unique_specs(methods)
    refs: Sequence[LayerRef | None] = layer if isinstance(layer, (list, tuple)) else [layer]  # type: ignore[list-item]
    for ref in refs:
        if ref is not None:
            resolve_layer(model, ref)
    _check_options(specs, options, has_layer=all(ref is not None for ref in refs))
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (the normalisation of the inputs), or neither")
    if mean is not None and std is not None:
        if not all(s > 0 for s in image.per_channel(std, channels, "std")):
            raise ValueError(f"std entries must be positive; got {std}")
        image.per_channel(mean, channels, "mean")
    elif not bool(((images >= 0) & (images <= 1)).all()):
        raise ValueError(
            f"the inputs lie in [{images.min().item():.3g}, {images.max().item():.3g}], not [0, 1]; "
            "pass the mean and std they were normalised with, so they can be shown as images"
        )


def check_target(target: Target, batch: int) -> None:
    """``target`` must be None, a class index, or one class index per example (``batch``)."""
    target = as_target(target)  # NumPy integers and 0-d arrays or tensors are class indices
    if target is None:
        return
    if isinstance(target, bool) or (isinstance(target, int) and target < 0):
        raise ValueError(f"target must be None, a class index or {batch} class indices; got {target!r}")
    if not isinstance(target, int):
        t = torch.as_tensor(target)
        if t.dim() != 1 or t.shape[0] != batch or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"target must hold {batch} integer class indices; got {t.dtype} {list(t.shape)}")


def _check_options(specs: Sequence[MethodSpec], options: Mapping[str, Any], *, has_layer: bool) -> None:
    """Every option is taken by some method, every method gets the options it requires, and a method
    whose ``layer`` has no default gets one."""
    for key in options:
        if not any(key in spec.options for spec in specs):
            raise TypeError(f"option {key!r} is taken by none of the methods {[s.name for s in specs]}")
    for spec in specs:
        missing = [name for name in spec.required_options if name not in options]
        if missing:
            raise TypeError(
                f"method {spec.name!r} needs the option(s) {missing}, e.g. window=8 for occlusion"
            )
        if spec.layer_required and not has_layer:
            raise TypeError(f"method {spec.name!r} needs a layer; pass layer='<dotted module name>'")


def check_sink(writer: object) -> None:
    """Raise unless ``writer`` has ``add_images`` and ``add_text`` and is open."""
    for attr in ("add_images", "add_text"):
        if not callable(getattr(writer, attr, None)):
            raise TypeError(f"the writer {type(writer).__name__} has no {attr}(); pass a SummaryWriter, "
                            "a PNGWriter, or an object with add_images(tag, images, step) and add_text")
    if is_closed(writer):
        raise ValueError(f"the writer {type(writer).__name__} is closed")


def is_closed(writer: object) -> bool:
    """Whether a SummaryWriter (or a sink with a ``closed`` flag) has been closed."""
    # SummaryWriter sets all_writers to None on close, and would silently open a new event file.
    summary_writer_closed = hasattr(writer, "file_writer") and getattr(writer, "all_writers", {}) is None
    return summary_writer_closed or getattr(writer, "closed", False) is True


def check_writable(writer: object) -> None:
    """Raise ``OSError`` if the writer's local log directory cannot take a new file."""
    get_logdir = getattr(writer, "get_logdir", None)
    logdir = get_logdir() if callable(get_logdir) else getattr(writer, "log_dir", None)
    if not isinstance(logdir, (str, os.PathLike)) or "://" in str(logdir):
        return  # not a local folder (or none we can see): nothing to probe
    try:
        with tempfile.TemporaryFile(dir=os.fspath(logdir)):
            pass
    except OSError as err:
        raise OSError(f"cannot write to the log directory {str(logdir)!r}: {err}") from err


# --- a folder of PNGs ------------------------------------------------------------------------------

class PNGWriter:
    """A sink writing ``<folder>/<tag>/step_000100.png`` (and ``.md`` for text, ``scalars.csv``).

    Each ``/`` of a tag becomes ``-`` and other characters outside ``[A-Za-z0-9._-]`` become ``_``.
    The PNGs hold exactly the bytes ``SummaryWriter.add_images`` would store (same scaling and grid).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.closed = False
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"cannot create the folder {str(self.folder)!r}: {err}") from err
        check_writable(self)

    def get_logdir(self) -> str:
        return str(self.folder)

    def add_images(self, tag: str, img_tensor: Any, global_step: int | None = None,
                   walltime: float | None = None, dataformats: str = "NCHW") -> None:
        """Write ``img_tensor`` (uint8, or float in [0, 1]) as one PNG; several images are tiled."""
        png = summary.image(tag, img_tensor, dataformats=dataformats).value[0].image.encoded_image_string
        self._path(tag, global_step, ".png").write_bytes(png)

    def add_text(self, tag: str, text_string: str, global_step: int | None = None,
                 walltime: float | None = None) -> None:
        self._path(tag, global_step, ".md").write_text(text_string, encoding="utf-8")

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None,
                   walltime: float | None = None) -> None:
        self._check_open()
        with open(self.folder / "scalars.csv", "a", encoding="utf-8") as f:
            f.write(f"{tag},{global_step},{float(scalar_value)!r}\n")

    def flush(self) -> None:
        """Nothing to do: every file is complete when its ``add_*`` returns."""

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> PNGWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"the PNGWriter for {str(self.folder)!r} is closed")

    def _path(self, tag: str, step: int | None, suffix: str) -> Path:
        self._check_open()
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"PNGWriter needs a global_step that is an int >= 0; got {step!r}")
        name = re.sub(r"[^A-Za-z0-9._-]", "_", tag.replace("/", "-")).lstrip(".") or "_"
        folder = self.folder / name
        folder.mkdir(exist_ok=True)
        return folder / f"step_{step:06d}{suffix}"
