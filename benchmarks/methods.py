"""The gradient family and the CAM family against their floors, and Score-CAM against its peers.

    python -m benchmarks.methods                          # resnet18, a few minutes on 2 cores
    python -m benchmarks.methods --size 64 --repeats 5 --clock cpu

Each row times a call and its floor interleaved (:func:`benchmarks.timing.paired`) and reports the
median of the paired ratios with its spread (the lowest and highest ratio of the repeats):

- SmoothGrad (saliency, ``samples`` noisy copies): one forward+backward to the input of the
  ``samples * B`` noisy inputs, built beforehand, as one batch (``batch_size=samples*B``) and at the
  default batch size in batches of that size;
- Integrated Gradients (``steps`` nodes): the same floor for its ``steps * B`` path points;
- both also with the target given (the predicted class, passed in): the call then runs no forward of
  the clean input to fix it; with ``--clean-floor``, both with ``target=None`` also against a floor
  that runs that forward too (``model(x).argmax(1)`` without gradients, then the batch);
- ``explain`` of Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM and HiResCAM at one layer: one
  ``grad_cam`` call at that layer;
- Score-CAM: ``model(batch)`` under ``torch.inference_mode()`` over ``K * B`` images, built
  beforehand, in batches of the same size; pytorch-grad-cam's and torchcam's ScoreCAM are timed
  against the same floor when installed.
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from benchmarks.timing import Run, Timing, paired
from torchvis.core.hooks import resolve_layer
from torchvis.methods.cam import grad_cam
from torchvis.methods.combine import explain
from torchvis.methods.noise import smoothgrad
from torchvis.methods.path import integrated_gradients
from torchvis.methods.perturbation import default_batch_size
from torchvis.methods.score import score_cam

CAMS = ("grad_cam", "grad_cam_pp", "xgrad_cam", "layer_cam", "hires_cam")


@dataclass(frozen=True)
class Row:
    name: str
    floor: str
    timing: Timing

    def format(self) -> str:
        ratios = [a / b for a, b in zip(self.timing.seconds, self.timing.floor, strict=True)]
        times = f"{self.timing.median * 1e3:9.1f} {self.timing.floor_median * 1e3:9.1f}"
        spread = f"{min(ratios):6.3f}-{max(ratios):<6.3f}"
        return f"{self.name:<48} {times} {self.timing.ratio:7.3f} {spread} {len(ratios):3d}  {self.floor}"


HEADER = f"{'call':<48} {'ms':>9} {'floor ms':>9} {'×floor':>7} {'spread':>13} {'n':>3}  floor"


def input_floor_batches(model: nn.Module, inputs: Tensor, batch_size: int) -> Run:
    """Forward and backward to the input of every row of ``inputs``, ``batch_size`` rows at a time,
    the score being the sum of each row's top logit."""

    def run() -> None:
        for lo in range(0, inputs.shape[0], batch_size):
            leaf = inputs[lo : lo + batch_size].detach().requires_grad_(True)
            logits = model(leaf)
            torch.autograd.grad(logits.gather(1, logits.argmax(dim=1, keepdim=True)).sum(), leaf)

    return run


def clean_then(model: nn.Module, x: Tensor, floor: Run) -> Run:
    """One forward of the clean ``x`` without gradients (what fixes the target when none is given),
    then ``floor``: the floor of a call with ``target=None``."""

    def run() -> None:
        with torch.no_grad():
            model(x).argmax(dim=1)
        floor()

    return run


def forward_batches(model: nn.Module, inputs: Tensor, batch_size: int) -> Run:
    """``model(batch)`` over ``inputs`` under ``torch.inference_mode()``, ``batch_size`` rows at a time."""

    def run() -> None:
        with torch.inference_mode():
            for lo in range(0, inputs.shape[0], batch_size):
                model(inputs[lo : lo + batch_size])

    return run


def measure(name: str, floor_name: str, run: Run, floor: Run, args: argparse.Namespace) -> Row:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timing = paired(run, floor, torch.device("cpu"), repeats=args.repeats, warmup=1, budget=args.budget,
                        cpu_clock=args.clock == "cpu")
    row = Row(name, floor_name, timing)
    print(row.format(), flush=True)
    return row


def gradient_family_rows(model: nn.Module, x: Tensor, args: argparse.Namespace) -> list[Row]:
    batch, n, steps = x.shape[0], args.samples, args.steps
    noise = torch.randn(n * batch, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    noisy = x.repeat(n, 1, 1, 1) + 0.1 * noise
    default = default_batch_size(x)
    rows = [
        measure(f"smoothgrad samples={n} batch_size={n * batch}", f"fwd+bwd of {n * batch} inputs, one batch",
                lambda: smoothgrad(model, x, samples=n, batch_size=n * batch),
                input_floor_batches(model, noisy, n * batch), args),
        measure(f"smoothgrad samples={n} (default batch {default})", f"the same in batches of {default}",
                lambda: smoothgrad(model, x, samples=n), input_floor_batches(model, noisy, default), args),
    ]
    if args.clean_floor:
        rows.append(measure(f"smoothgrad samples={n} batch_size={n * batch}",
                            f"fwd of the {batch} clean inputs + fwd+bwd of {n * batch}, one batch",
                            lambda: smoothgrad(model, x, samples=n, batch_size=n * batch),
                            clean_then(model, x, input_floor_batches(model, noisy, n * batch)), args))
    with torch.no_grad():
        given = model(x).argmax(dim=1)  # the class a caller passes: no clean forward inside the call
    rows.append(measure(f"smoothgrad samples={n} batch_size={n * batch}, target given",
                        f"fwd+bwd of {n * batch} inputs, one batch",
                        lambda: smoothgrad(model, x, given, samples=n, batch_size=n * batch),
                        input_floor_batches(model, noisy, n * batch), args))
    alphas = torch.rand(steps * batch, 1, 1, 1, generator=torch.Generator().manual_seed(1))
    path = x.repeat(steps, 1, 1, 1) * alphas
    rows += [
        measure(f"integrated_gradients steps={steps} batch_size={steps * batch}",
                f"fwd+bwd of {steps * batch} inputs, one batch",
                lambda: integrated_gradients(model, x, steps=steps, batch_size=steps * batch),
                input_floor_batches(model, path, steps * batch), args),
        measure(f"integrated_gradients steps={steps} (default batch {default})",
                f"the same in batches of {default}",
                lambda: integrated_gradients(model, x, steps=steps),
                input_floor_batches(model, path, default), args),
        measure(f"integrated_gradients steps={steps} batch_size={steps * batch}, target given",
                f"fwd+bwd of {steps * batch} inputs, one batch",
                lambda: integrated_gradients(model, x, given, steps=steps, batch_size=steps * batch),
                input_floor_batches(model, path, steps * batch), args),
    ]
    if args.clean_floor:
        rows.append(measure(f"integrated_gradients steps={steps} batch_size={steps * batch}",
                            f"fwd of the {batch} clean inputs + fwd+bwd of {steps * batch}, one batch",
                            lambda: integrated_gradients(model, x, steps=steps, batch_size=steps * batch),
                            clean_then(model, x, input_floor_batches(model, path, steps * batch)), args))
    return rows


def cam_rows(model: nn.Module, x: Tensor, layer: str, args: argparse.Namespace) -> list[Row]:
    return [measure(f"explain of the five CAMs @{layer}", "one grad_cam call",
                    lambda: explain(model, x, methods=CAMS, layer=layer),
                    lambda: grad_cam(model, x, layer=layer), args)]


def score_cam_rows(model: nn.Module, x: Tensor, layer: str, args: argparse.Namespace) -> list[Row]:
    with torch.no_grad():
        channels = _activation(model, x, layer).shape[1]
        target = int(model(x).argmax(dim=1)[0])
    size = default_batch_size(x)
    masked = x.repeat(channels, 1, 1, 1) * torch.rand(channels * x.shape[0], 1, *x.shape[2:],
                                                     generator=torch.Generator().manual_seed(2))
    floor = forward_batches(model, masked, size)
    label = f"fwd of {masked.shape[0]} images, batches of {size}"
    rows = [measure(f"score_cam @{layer} (K={channels})", label,
                    lambda: score_cam(model, x, layer=layer, batch_size=size), floor, args)]
    for name, build in (("pytorch-grad-cam ScoreCAM", _grad_cam_peer), ("torchcam ScoreCAM", _torchcam_peer)):
        try:
            run = build(model, x, layer, target, size)
        except ImportError as error:
            print(f"{name:<44} not installed ({error.name})")
            continue
        rows.append(measure(name, label, run, floor, args))
    return rows


def _activation(model: nn.Module, x: Tensor, layer: str) -> Tensor:
    kept: list[Tensor] = []
    handle = resolve_layer(model, layer)[1].register_forward_hook(lambda m, i, out: kept.append(out))
    try:
        model(x)
    finally:
        handle.remove()
    return kept[0]


def _grad_cam_peer(model: nn.Module, x: Tensor, layer: str, target: int, size: int) -> Run:
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    module = resolve_layer(model, layer)[1]

    def run() -> object:
        with ScoreCAM(model=model, target_layers=[module]) as cam:
            cam.batch_size = size
            return cam(input_tensor=x, targets=[ClassifierOutputTarget(target)] * x.shape[0])

    return run


def _torchcam_peer(model: nn.Module, x: Tensor, layer: str, target: int, size: int) -> Run:
    from torchcam.methods import ScoreCAM

    def run() -> object:
        with ScoreCAM(model, layer, batch_size=size, input_shape=tuple(x.shape[1:])) as extractor:
            with torch.inference_mode():
                scores = model(x)
            return extractor(target, scores)

    return run


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.methods",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="input size of resnet18 (default 64)")
    parser.add_argument("--batch", type=int, default=2, help="examples per call (Score-CAM: 1)")
    parser.add_argument("--samples", type=int, default=16, help="SmoothGrad samples")
    parser.add_argument("--steps", type=int, default=16, help="Integrated Gradients steps")
    parser.add_argument("--layer", default="layer3", help="the CAM and Score-CAM layer")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=7, help="paired repeats per row (median)")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds per row after 3 repeats")
    parser.add_argument("--only-gradient", action="store_true", help="SmoothGrad and IG rows only")
    parser.add_argument("--clean-floor", action="store_true",
                        help="also SmoothGrad and IG (target=None) against a floor with the clean forward "
                             "that fixes their target")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="cpu",
                        help="cpu: this process's CPU seconds (steadier when shared); wall: perf_counter")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    from torchvision.models import resnet18

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = resnet18(weights=None, num_classes=1000).eval()
    x = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    print(f"resnet18 {args.size}² batch {args.batch}, {args.threads} thread(s), clock {args.clock}, "
          f"torch {torch.__version__}")
    print(HEADER)
    rows = gradient_family_rows(model, x, args)
    if not args.only_gradient:
        rows += cam_rows(model, x, args.layer, args)
        rows += score_cam_rows(model, x[:1], args.layer, args)
    print(f"median of the ratios: {statistics.median(r.timing.ratio for r in rows):.3f}")


if __name__ == "__main__":
    main()
