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

A probe that is a tuple of inputs gets one picture per input under each of these image tags,
``<tag>/x<i>`` (a map that is one tensor for a tuple — the CAMs — under ``/x0``). Inputs that are not
images are drawn by their kind (:mod:`torchvis.rendering.kinds`: tables as bar charts, signals with a
heat strip, volumes as central slices), the examples of one tag in one matplotlib figure laid out like
the grid. For a model whose output is not ``[B, classes]`` (a callable or index target) the text
lists the explained score per example instead of the predictions.

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

from torchvis.core.caller import warn_user
from torchvis.core.forward import guarded
from torchvis.core.hooks import LayerRef, resolve_layer
from torchvis.core.inputs import InputLike, Inputs, as_inputs
from torchvis.core.targets import Target, as_target, is_function, resolve_target, score_of
from torchvis.methods.combine import explain, unique_specs
from torchvis.methods.spec import Look, MethodSpec
from torchvis.rendering import image, kinds, plots
from torchvis.rendering.figure import explained_text, figure_rgb
from torchvis.tracking.scores import check_metric_options, check_metrics, log_scores


class Sink(Protocol):
    """What :func:`log_attributions` writes to: ``torch.utils.tensorboard.SummaryWriter``, Lightning's
    ``trainer.logger.experiment``, :class:`PNGWriter`, or your own. ``add_scalar`` is optional."""

    def add_images(self, tag: str, img_tensor: Any, global_step: int | None = None) -> None: ...

    def add_text(self, tag: str, text_string: str, global_step: int | None = None) -> None: ...


Stats = float | Sequence[float]
Labels = Tensor | Sequence[int]
Methods = Sequence[str | Callable[..., Tensor]]
FeatureNames = Sequence[str] | Sequence[Sequence[str] | None] | None


def log_attributions(
    writer: Sink,
    model: nn.Module,
    images: InputLike,
    target: Target = None,
    *,
    step: int,
    methods: Methods = ("saliency", "grad_cam"),
    labels: Labels | None = None,
    layer: LayerRef | None | Sequence[LayerRef | None] = None,
    mean: Stats | None = None,
    std: Stats | None = None,
    class_names: Sequence[str] | None = None,
    feature_names: FeatureNames = None,
    prefix: str = "torchvis",
    log_inputs: bool = True,
    looks: Mapping[str, Look] | None = None,
    metrics: Sequence[str] = (),
    metric_options: Mapping[str, Any] | None = None,
    forward_args: Any = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> dict[str, Tensor]:
    """Explain ``images`` with each method and log the pictures; returns ``{tag: uint8 [1,3,H',W']}``.

    ``images`` are the model's inputs: a tensor ``[B, ...]`` or a tuple of them (see
    :mod:`torchvis.core.inputs`; ``forward_args``/``forward_kwargs`` go to the model with every call).
    Each input is drawn by its kind (:mod:`torchvis.rendering.kinds`): images ``[B,C,H,W]`` as
    always, signals ``[B,C,L]`` as lines with a heat strip, tables ``[B,N]`` as bar charts of the
    strongest features (named by ``feature_names``: one list for the table, or one entry per input),
    volumes ``[B,C,D,H,W]`` as their central slices; with a tuple each input's pictures get their own
    tag, ``<tag>/x<i>``. What cannot be drawn is left out with an
    :class:`~torchvis.rendering.kinds.UndrawableWarning` (shown once per tag and reason).

    ``mean``/``std`` undo the normalisation of image (and volume) inputs for display (without them
    image inputs must lie in [0, 1]). ``target`` as in every method (None: the predicted class; a
    callable ``f(output) -> [B]``, whose name the text then shows). ``labels`` [B] are the true
    classes, shown in the text. Inputs, labels and a tensor target are moved to the model's device. One
    extra no-grad forward pass finds the predictions; the maps then explain exactly the classes the
    text shows. ``metrics`` (names of :data:`torchvis.tracking.scores.METRICS`) add one scalar per
    metric and map, ``<prefix>/<metric>/<method>``: the mean over the batch (see
    :func:`~torchvis.tracking.scores.log_scores`, which takes ``metric_options``).
    """
    check_metrics(metrics)
    check_metric_options(metric_options or {})
    inputs = check_logging(model, images, labels, methods=methods, layer=layer, target=target, mean=mean,
                           std=std, class_names=class_names, options=options, feature_names=feature_names,
                           metrics=metrics, forward_args=forward_args, forward_kwargs=forward_kwargs)
    check_sink(writer)
    device = model_device(model) or inputs.device
    target = as_target(target)
    return log_checked(writer, model, moved(inputs, device),
                       target.to(device) if isinstance(target, Tensor) else target, step=step,
                       methods=methods, labels=host_labels(labels), layer=layer,
                       mean=mean, std=std, class_names=class_names, feature_names=feature_names,
                       prefix=prefix, log_inputs=log_inputs, looks=looks, metrics=metrics,
                       metric_options=metric_options, **options)


def log_checked(
    writer: Sink,
    model: nn.Module,
    inputs: Inputs,
    target: Target,
    *,
    step: int,
    methods: Methods,
    labels: list[int] | None,
    layer: LayerRef | None | Sequence[LayerRef | None],
    mean: Stats | None,
    std: Stats | None,
    class_names: Sequence[str] | None,
    feature_names: FeatureNames,
    prefix: str,
    log_inputs: bool,
    looks: Mapping[str, Look] | None,
    metrics: Sequence[str],
    metric_options: Mapping[str, Any] | None,
    **options: Any,
) -> dict[str, Tensor]:
    """:func:`log_attributions` of ``inputs`` (the forward arguments inside them) whose arguments
    :func:`check_logging`, :func:`check_metrics` and :func:`check_sink` have passed — the Monitor checks
    them once, at construction, not at every logging step. ``inputs`` and a tensor ``target`` are on
    the model's device already (:func:`as_target` applied); ``labels`` are the true classes read to the
    host (they are only read: the range check, the text, the accuracy)."""
    x = inputs.tensors
    batch = inputs.batch
    with guarded(model, inputs.first, grad=False), torch.no_grad():
        output = inputs.call(model)
    logits = output.float() if _is_logits(output, batch) else None
    if logits is None:
        if labels is not None:
            raise ValueError(f"labels are true classes, but the model's output is {_shape(output)}, not "
                             f"[B={batch}, classes]; leave labels out")
        resolved = resolve_target(target, output, batch)
        explained: Any = target
    else:
        if class_names is not None and len(class_names) != logits.shape[1]:
            raise ValueError(
                f"class_names has {len(class_names)} names; the model has {logits.shape[1]} classes")
        if labels is not None and max(labels) >= logits.shape[1]:
            raise ValueError(f"labels go up to {max(labels)}; the model has {logits.shape[1]} classes")
        predicted = logits.argmax(dim=1)
        resolved = explained = predicted if target is None else resolve_target(target, logits)
    maps = explain(model, x if inputs.was_tuple else x[0], explained, methods=methods, layer=layer,
                   forward_args=inputs.forward_args or None,
                   forward_kwargs=dict(inputs.forward_kwargs) or None,
                   **options)

    names = kinds.feature_names_per_input(feature_names, x)
    shown = [kinds.display(t, mean, std).float() for t in x]
    suffix = [f"/x{i}" if inputs.was_tuple else "" for i in range(len(x))]
    pictures: dict[str, kinds.Pictures] = {}
    if log_inputs:
        for i, t in enumerate(x):
            tag = f"{prefix}/input{suffix[i]}"
            if _drawable(tag, t):
                pictures[tag] = kinds.input_pictures(shown[i], names[i])
    for key, value in maps.items():
        for i, attr in kinds.paired(x, value):
            tag = f"{prefix}/{key}{suffix[i]}"
            if _drawable(tag, x[i], attr):
                look = image.look_of(key, looks)
                pictures[tag] = kinds.map_pictures(attr.float(), shown[i], look, names[i])
    # Small inputs are enlarged (whole factor, nearest neighbour) so that a 28 px digit is legible.
    columns = image.grid_columns(batch)
    logged = {tag: _logged(p, columns) for tag, p in pictures.items()}
    for tag, grid in logged.items():
        writer.add_images(tag, grid, step)

    if logits is not None:
        probability = logits.softmax(dim=1).gather(1, predicted[:, None])[:, 0]
        classes = list(class_names) if class_names is not None else [str(c) for c in range(logits.shape[1])]
        given = target is not None and not is_function(target)  # explained: classes of its own
        # The predictions, their probabilities and the explained classes: one host read.
        read = torch.stack([predicted.double(), probability.double(),
                            *([explained.double()] if given else [])]).tolist()
        guesses = [int(v) for v in read[0]]
        shown_target: list[int | str] | None = (
            [int(v) for v in read[2]] if given
            else [explained_text(target, 0)] * batch if is_function(target) else None
        )
        text = classes_text(classes, guesses, read[1], labels, shown_target)
    else:
        text = scores_text(target, score_of(output, resolved, batch).float().tolist())
    writer.add_text(f"{prefix}/classes", text, step)
    add_scalar = getattr(writer, "add_scalar", None)
    if logits is not None and labels is not None and callable(add_scalar):
        right = sum(guess == label for guess, label in zip(guesses, labels, strict=True))
        add_scalar(f"{prefix}/probe_accuracy", right / batch, step)
    if metrics:
        extra = {"forward_args": inputs.forward_args or None,
                 "forward_kwargs": dict(inputs.forward_kwargs) or None}
        log_scores(writer, model, x[0], maps, explained, metrics=metrics, step=step, prefix=prefix,
                   **extra, **(metric_options or {}))
    return logged


def _is_logits(output: object, batch: int) -> bool:
    return isinstance(output, Tensor) and output.dim() == 2 and output.shape[0] == batch


def _shape(output: object) -> str:
    return f"a tensor of shape {list(output.shape)}" if isinstance(output, Tensor) else type(output).__name__


def _drawable(tag: str, x: Tensor, attr: Tensor | None = None) -> bool:
    """Whether the input (or the map over it) can be drawn; if not, say so once per tag and reason (the
    warnings module shows a repeated message once)."""
    reason = kinds.undrawable(x, attr)
    if reason is not None:
        warn_user(f"{tag}: cannot draw {reason}; it is left out", kinds.UndrawableWarning)
    return reason is None


def _logged(pictures: kinds.Pictures, columns: int) -> Tensor:
    """One uint8 ``[1,3,H,W]`` grid: picture tensors tiled (enlarged when small), plots drawn in one
    figure."""
    if isinstance(pictures, Tensor):
        return image.to_uint8(image.grid(image.enlarge(pictures), nrow=columns))[None]
    rgb = figure_rgb(plots.plot_grid(pictures, columns))
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()


def moved(
    inputs: Inputs, device: torch.device, dtype: torch.dtype | None = None, *, copy: bool = False
) -> Inputs:
    """``inputs`` on ``device``: the attributed tensors detached (and in ``dtype`` when given), tensors
    among the extra arguments moved too (floating ones to ``dtype``); ``copy`` forces new tensors."""

    def to(t: Any, attributed: bool = False) -> Any:
        if not isinstance(t, Tensor):
            return t
        wanted = dtype if dtype is not None and t.is_floating_point() else t.dtype
        return (t.detach() if attributed else t).to(device, wanted, copy=copy)

    args = tuple(to(a) for a in inputs.forward_args)
    kwargs = {k: to(v) for k, v in inputs.forward_kwargs.items()}
    return Inputs(tuple(to(t, True) for t in inputs.tensors), inputs.was_tuple, args, kwargs)


def classes_text(
    names: Sequence[str],
    predicted: Sequence[int],
    probability: Sequence[float],
    labels: Sequence[int] | None,
    explained: Sequence[int | str] | None,
) -> str:
    """A markdown table, one row per tile (batch order, grids filled row by row); ``p`` is the
    softmax probability of the predicted class, and a wrong prediction is bold and marked ✗.
    ``explained``: the class explained per example, or a text (``"target: <callable name>"``)."""
    header = ["#"] + (["true"] if labels is not None else []) + ["predicted", "p"]
    header += ["explained"] if explained is not None else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, (pred, p) in enumerate(zip(predicted, probability, strict=True)):
        row = [str(i)]
        if labels is not None:
            row.append(names[labels[i]])
        row += [names[pred] if labels is None or pred == labels[i] else f"**{names[pred]}** ✗", f"{p:.2f}"]
        if explained is not None:
            e = explained[i]
            row.append(e if isinstance(e, str) else names[e])
        lines.append("| " + " | ".join(row) + " |")
    if labels is not None:
        right = sum(pred == label for pred, label in zip(predicted, labels, strict=True))
        lines.insert(0, f"{right} of {len(labels)} correct\n")
    return "\n".join(lines)


def scores_text(target: Any, scores: Sequence[float]) -> str:
    """A markdown table of the explained score per example, for a model whose output is not
    ``[B, classes]`` (a callable target, an index into a larger output, one score per example)."""
    lines = ["| # | explained | score |", "|---|---|---|"]
    shown = target.cpu() if isinstance(target, Tensor) else target  # one read, not one per example
    lines += [f"| {i} | {explained_text(shown, i)} | {s:.4g} |" for i, s in enumerate(scores)]
    return "\n".join(lines)


def host_labels(labels: Any) -> list[int] | None:
    """The true classes (anything :func:`check_logging` accepts, NumPy included) as a host list, read
    once: a logging step only reads them (the range check, the text, the accuracy)."""
    return None if labels is None else torch.as_tensor(as_target(labels)).tolist()


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (or buffer); None for a model with neither."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return None


# --- checks that run before any model call ----------------------------------------------------------

def check_logging(
    model: nn.Module,
    images: InputLike,
    labels: Labels | None,
    *,
    methods: Methods,
    layer: LayerRef | None | Sequence[LayerRef | None],
    mean: Stats | None,
    std: Stats | None,
    class_names: Sequence[str] | None,
    options: Mapping[str, Any],
    target: Target = None,
    feature_names: FeatureNames = None,
    metrics: Sequence[str] = (),
    forward_args: Any = None,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> Inputs:
    """Raise for anything that would only fail at a logging step; runs no model. Returns the checked
    inputs (:func:`torchvis.core.inputs.as_inputs`)."""
    inputs = as_inputs(images, forward_args, forward_kwargs)
    batch = inputs.batch
    check_target(target, batch)
    if metrics and (inputs.was_tuple or inputs.first.dim() != 4):
        raise ValueError(_METRICS_REFUSED)
    kinds.feature_names_per_input(feature_names, inputs.tensors)
    if labels is not None:
        y = torch.as_tensor(labels)
        if y.dim() != 1 or y.shape[0] != batch or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"labels must be {batch} integer class indices; got {y.dtype} {list(y.shape)}")
        high = len(class_names) if class_names is not None else math.inf
        low, top = torch.stack(torch.aminmax(y)).tolist()
        if low < 0 or top >= high:
            raise ValueError(f"labels must lie in [0, {high}); got {low}..{top}")
    specs = unique_specs(methods)
    refs: Sequence[LayerRef | None] = layer if isinstance(layer, (list, tuple)) else [layer]  # type: ignore[list-item]
    for ref in refs:
        if ref is not None:
            resolve_layer(model, ref)
    _check_options(specs, options, has_layer=all(ref is not None for ref in refs))
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (the normalisation of the inputs), or neither")
    for i, x in enumerate(inputs.tensors):
        if kinds.kind_of(x) in (kinds.Kind.IMAGE, kinds.Kind.VOLUME):
            _check_display(x, mean, std, f"x[{i}]" if inputs.was_tuple else "the inputs")
    return inputs


# The streamed scores rank a map's pixels: every method must give one map per input of the probe,
# which the CAMs (one map, over the first input) do only for a single image.
_METRICS_REFUSED = ("metrics (deletion, insertion) in the monitor need one image probe [B,C,H,W] (any "
                    "target, forward_args allowed); call torchvis.deletion/insertion directly for "
                    "other inputs")


def _check_display(x: Tensor, mean: Stats | None, std: Stats | None, name: str) -> None:
    """An image (or volume) input can be shown: ``mean``/``std`` fit its channels, or it lies in
    [0, 1] (volumes outside it are scaled for display instead)."""
    channels = x.shape[1]
    if mean is not None and std is not None:
        if not all(s > 0 for s in image.per_channel(std, channels, "std")):
            raise ValueError(f"std entries must be positive; got {std}")
        image.per_channel(mean, channels, "mean")
    elif x.dim() == 4 and not bool(((x >= 0) & (x <= 1)).all()):
        raise ValueError(
            f"{name} lie in [{x.min().item():.3g}, {x.max().item():.3g}], not [0, 1]; "
            "pass the mean and std they were normalised with, so they can be shown as images"
        )


def check_target(target: Target, batch: int) -> None:
    """``target`` must be None, a class index, one class index per example (``batch``), a tuple of
    indices into a larger output (``(3, 1)``), one such index per example (``[B, k]``), or a callable
    ``f(output) -> [B]``. Whether it fits the model's output is checked at the first logging step."""
    if is_function(target):
        return
    target = as_target(target)  # NumPy integers and 0-d arrays or tensors are class indices
    if target is None:
        return
    if isinstance(target, bool) or (isinstance(target, int) and target < 0):
        raise ValueError(f"target must be None, a class index, {batch} class indices, a tuple of indices or "
                         f"a callable; got {target!r}")
    if isinstance(target, int):
        return
    if isinstance(target, tuple) and target and all(isinstance(as_target(i), int) for i in target):
        if any(as_target(i) < 0 for i in target):
            raise ValueError(f"target indices must be >= 0; got {target!r}")
        return  # an index into an output [B, d1..dk] (or, of length B, one class per example)
    try:
        t = torch.as_tensor(target)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"target must be None, a class index, {batch} class indices, a tuple of indices "
                         f"or a callable; got {type(target).__name__}") from err
    if t.dim() not in (1, 2) or t.shape[0] != batch or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"target must hold {batch} integer class indices (or [{batch}, k] indices); got "
                         f"{t.dtype} {list(t.shape)}")


def _check_options(specs: Sequence[MethodSpec], options: Mapping[str, Any], *, has_layer: bool) -> None:
    """Every option is taken by some method, every method gets the options it requires, and a method
    whose ``layer`` has no default gets one."""
    taken = [spec.options_with(options) for spec in specs]
    for key in options:
        if not any(key in names for names in taken):
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
