"""Grad-CAM on a vision transformer's tokens against its floor (issue 12: reshape adds no pass).

    python -m benchmarks.vit [--size 224] [--batch 1 8] [--repeats 7] [--threads N]

torchvision's ``vit_b_16`` (random weights, never downloaded) at ``--size``; Grad-CAM of class 3 at
the last block's ``ln_1`` with ``reshape="auto"``, against its floor: one forward that keeps the
layer's output (a plain forward hook) and one ``torch.autograd.grad`` of the target logit to it.
Timed in interleaved pairs (``benchmarks.timing.paired``); prints the median of the per-pair ratios
and their spread (min-max). Target: <= 1.05x.
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
from torch import Tensor, nn
from torchvision.models import vit_b_16

from benchmarks.timing import Timing, paired
from torchvis.methods.cam import grad_cam

LAYER = "encoder.layers.encoder_layer_11.ln_1"
TARGET = 3


def floor(model: nn.Module, x: Tensor, module: nn.Module) -> Tensor:
    """One forward keeping ``module``'s output, one backward from the target logit to it."""
    seen: dict[str, Tensor] = {}
    handle = module.register_forward_hook(lambda m, i, o: seen.update(a=o))
    try:
        out = model(x)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(out[:, TARGET].sum(), seen["a"])
    return grad


def measure(model: nn.Module, x: Tensor, *, layer: str = LAYER, repeats: int = 7) -> Timing:
    """Grad-CAM (``reshape="auto"``) at ``layer`` and its floor, interleaved."""
    module = dict(model.named_modules())[layer]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an empty map on random weights is no concern here
        return paired(
            lambda: grad_cam(model, x, TARGET, layer=layer, reshape="auto"),
            lambda: floor(model, x, module),
            torch.device("cpu"),
            repeats=repeats,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = vit_b_16(weights=None, image_size=args.size).eval()
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zeroes the head: no gradient at all
    print(f"vit_b_16 {args.size}² on cpu, {args.threads} threads, load {os.getloadavg()[0]:.2f}")
    print(f"{'batch':>5} {'grad_cam ms':>12} {'floor ms':>9} {'ratio':>6} {'spread':>13}")
    for batch in args.batch:
        x = torch.randn(batch, 3, args.size, args.size)
        timing = measure(model, x, repeats=args.repeats)
        ratios = [a / b for a, b in zip(timing.seconds, timing.floor, strict=True)]
        print(f"{batch:>5} {timing.median * 1e3:>12.1f} {timing.floor_median * 1e3:>9.1f} "
              f"{timing.ratio:>6.3f} {min(ratios):>6.3f}-{max(ratios):.3f}")
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
