"""Which DigitsCNN layer should the demo's Grad-CAM use? Measured after the demo's own training.

    python -m benchmarks.cam_layer [--epochs 3] [--seed 0] [--checkpoint /tmp/demo.pt]

Trains ``DigitsCNN`` exactly as ``torchvis demo`` does (seed 0, 3 epochs, Adam, batch 64) — or loads
``--checkpoint`` if it exists — then computes Grad-CAM of the predicted class on the 1,000 held-out
digits at ``conv2`` (before its ReLU), ``relu2`` and ``pool`` and prints, per layer:

- ``all-zero``: the share of digits whose map is zero everywhere (nothing to show);
- ``on ink``: the share of the map's mass on stroke pixels (intensity > 0.5; strokes cover ~19% of
  a digit), a measure of how well the map outlines the digit;
- ``deletion``: the mean probability of the predicted class as the top 0..50% pixels (by map value)
  are set to background, in steps of 5% (lower = the map found what the model uses), beside the
  same curve for a random pixel order (seeded) — Petsiuk et al., "RISE", BMVC 2018.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor, nn

from torchvis.apps.digits import (
    MNIST_MEAN,
    MNIST_STD,
    DigitsCNN,
    load_digits,
    load_digits_model,
    save_checkpoint,
    train_digits,
)
from torchvis.methods.cam import grad_cam

LAYERS = ("conv2", "relu2", "pool")
FRACTIONS = [i / 20 for i in range(11)]  # 0, 5, ..., 50 % of the pixels deleted
BACKGROUND = (0.0 - MNIST_MEAN) / MNIST_STD  # a black pixel, normalised


def deletion(model: nn.Module, x: Tensor, order: Tensor, predicted: Tensor) -> float:
    """Mean over FRACTIONS and digits of p(predicted), the first pixels of ``order`` [B,784] blacked out."""
    probs = []
    with torch.no_grad():
        for fraction in FRACTIONS:
            k = round(fraction * order.shape[1])
            flat = x.flatten(1).clone()
            flat.scatter_(1, order[:, :k], BACKGROUND)
            p = model(flat.view_as(x)).softmax(dim=1).gather(1, predicted[:, None])
            probs.append(p.mean().item())
    return sum(probs) / len(probs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path)
    args = parser.parse_args()
    data = load_digits(seed=args.seed)
    if args.checkpoint is not None and args.checkpoint.exists():
        model = load_digits_model(args.checkpoint)
    else:
        model = DigitsCNN(generator=torch.Generator().manual_seed(args.seed))
        train_digits(model, data, epochs=args.epochs, seed=args.seed)
        if args.checkpoint is not None:
            save_checkpoint(model, args.checkpoint)
    model.eval()
    x = data.test_x
    with torch.no_grad():
        predicted = model(x).argmax(dim=1)
    ink = (x * MNIST_STD + MNIST_MEAN).flatten(1) > 0.5
    print(f"ink covers {ink.float().mean().item():.1%} of the pixels")
    generator = torch.Generator().manual_seed(args.seed)
    random_order = torch.stack([torch.randperm(784, generator=generator) for _ in range(x.shape[0])])
    print(f"{'layer':8} {'all-zero':>9} {'on ink':>8} {'deletion':>9}")
    for layer in LAYERS:
        heat = grad_cam(model, x, predicted, layer=layer).flatten(1)
        zero = (heat.amax(dim=1) <= 0).float().mean().item()
        mass = heat.sum(dim=1)
        on_ink = ((heat * ink).sum(dim=1) / mass)[mass > 0].mean().item()
        # Ties (flat zero regions) are broken at random, so an all-zero map scores like a random order.
        jitter = torch.rand(heat.shape, generator=generator) * 1e-12
        order = (heat + jitter).argsort(dim=1, descending=True)
        print(f"{layer:8} {zero:9.1%} {on_ink:8.1%} {deletion(model, x, order, predicted):9.3f}")
    print(f"{'random':8} {'':>9} {ink.float().mean().item():8.1%} "
          f"{deletion(model, x, random_order, predicted):9.3f}")


if __name__ == "__main__":
    main()
