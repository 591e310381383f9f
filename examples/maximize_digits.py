"""What does the digits CNN want to see? Activation maximization of its 10 logits and 8 conv2 channels.

    python examples/maximize_digits.py --out maximize_out [--checkpoint digits.pt]

Trains ``DigitsCNN`` for one epoch on the 5,000 bundled MNIST digits (or loads ``--checkpoint`` if the
file exists; a freshly trained model is saved there), then writes ``maximize_out/maximize_digits.png``:
row 1 the inputs that maximise the logits of digits 0-9, row 2 those of conv2 channels 0-7.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from torchvis.apps.digits import (
    MNIST_MEAN,
    MNIST_STD,
    DigitsCNN,
    evaluate,
    load_digits,
    load_digits_model,
    save_checkpoint,
    train_digits,
)
from torchvis.inspection.activation_maximization import Channel, Logit, maximize, to_images
from torchvis.rendering.image import grid


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("maximize_out"), help="output folder")
    parser.add_argument("--checkpoint", type=Path, help="load this model if it exists, else save to it")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=128, help="optimisation steps per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zoom", type=int, default=4, help="pixels per input pixel in the PNG")
    args = parser.parse_args()

    if args.checkpoint is not None and args.checkpoint.exists():
        model = load_digits_model(args.checkpoint)
    else:
        data = load_digits(seed=args.seed)
        model = DigitsCNN(generator=torch.Generator().manual_seed(args.seed))
        train_digits(model, data, epochs=args.epochs, seed=args.seed, progress=True)
        print(f"test accuracy after {args.epochs} epoch(s): {evaluate(model, data.test_x, data.test_y):.3f}")
        if args.checkpoint is not None:
            save_checkpoint(model, args.checkpoint)

    run = partial(maximize, model, shape=(1, 28, 28), steps=args.steps, seed=args.seed, mean=MNIST_MEAN,
                  std=MNIST_STD, progress=True)
    logits = run([Logit(d) for d in range(10)])
    # A channel's spatial mean is ~20x smaller than a trained logit: lighter penalties to match.
    channels = run([Channel("conv2", k) for k in range(8)], l2=0.01, tv=0.01)

    pictures = to_images(torch.cat([logits, channels]), MNIST_MEAN, MNIST_STD)
    sheet = grid(pictures, nrow=10, padding=2, pad_value=1.0)
    sheet = F.interpolate(sheet[None], scale_factor=args.zoom, mode="nearest")[0]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "maximize_digits.png"
    plt.imsave(path, sheet.permute(1, 2, 0).numpy())
    print(f"wrote {path}: row 1 logits of digits 0-9, row 2 conv2 channels 0-7")


if __name__ == "__main__":
    main()
