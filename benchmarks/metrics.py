"""What the faithfulness metrics cost: against the forward passes they cannot avoid, and in a monitor.

```bash
python -m benchmarks.metrics                 # about two minutes on 2 cores
python -m benchmarks.metrics --repeats 15 --json out.json
```

1. ``deletion`` + ``insertion`` of ``B`` digits (default steps: 98, so 99 points a curve) against the
   floor: the ``2 * 99 * B`` images they score, pre-built, through ``model(chunk)`` under
   ``torch.inference_mode()`` at the batch size with the best throughput (chosen by timing 32..1024 in
   the same run). Target: at most 1.1x.
2. A :class:`torchvis.Monitor` logging step (saliency and Grad-CAM on 16 probe digits, to a
   ``SummaryWriter``) with ``metrics=("deletion", "insertion")`` against the same step without.
   Target: at most 2x. And the same step against the step without metrics plus the plain forwards of
   the images the metrics score (the least any implementation adds): our own target, at most 1.1x.

Each pair is timed interleaved (A B, B A, ...) after a warm-up, so that load from other jobs on a
shared machine hits both sides alike; the figure is the median over repeats of the paired ratio, with
the lowest and highest ratio as the spread. By default one thread and the process's CPU seconds
(``--threads``, ``--wall-clock`` change that): other jobs on a shared machine then cost waiting, which
is not counted, rather than noise.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from benchmarks.timing import Timing, paired, time_once
from torchvis.apps.digits import MNIST_MEAN, MNIST_STD, DigitsCNN
from torchvis.methods.cam import EmptyMapWarning
from torchvis.methods.combine import explain
from torchvis.metrics.faithfulness import deletion, insertion, ranks, steps
from torchvis.tracking.monitor import Monitor
from torchvis.tracking.scores import monitor_pixels_per_step

CPU = torch.device("cpu")
CPU_CLOCK = True  # CPU seconds of this process: waiting for a core on a shared machine is not counted
BATCHES = (32, 64, 128, 256, 512, 1024)


def digits_model() -> nn.Module:
    return DigitsCNN(generator=torch.Generator().manual_seed(0)).eval()


def digits_batch(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 1, 28, 28, generator=g) - MNIST_MEAN) / MNIST_STD
    return x, torch.randint(0, 10, (n,), generator=g)


def scored_images(x: Tensor, attributions: Tensor, pixels_per_step: int | None = None) -> Tensor:
    """The ``2 * (N+1) * B`` images deletion and insertion score, built once (not timed)."""
    batch, _, height, width = x.shape
    per_step, n = steps(height * width, pixels_per_step)
    rank = ranks(attributions.abs().sum(dim=1).flatten(1)).view(batch, 1, height, width)
    replaced = (torch.arange(n + 1) * per_step).clamp_max(height * width).view(-1, 1, 1, 1, 1)
    moved = rank[None] < replaced  # [N+1, B, 1, H, W]
    deleted = torch.where(moved, torch.zeros_like(x)[None], x[None])
    inserted = torch.where(moved, x[None], x.mean() * torch.ones_like(x)[None])
    return torch.cat([deleted, inserted]).flatten(0, 1)


def best_batch(model: nn.Module, images: Tensor) -> tuple[int, dict[int, float]]:
    """The chunk size with the highest throughput for ``images`` (median of 3 timings each)."""
    seconds = {}
    for size in BATCHES:
        def run(size: int = size) -> None:
            with torch.inference_mode():
                for chunk in images.split(size):
                    model(chunk)
        run()
        seconds[size] = statistics.median(time_once(run, CPU, cpu_clock=CPU_CLOCK) for _ in range(3))
    return min(seconds, key=seconds.__getitem__), seconds


def faithfulness_vs_forwards(batch: int, repeats: int) -> dict[str, Any]:
    model = digits_model()
    x, _ = digits_batch(batch)
    a = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    images = scored_images(x, a)
    size, throughput = best_batch(model, images)

    def metrics() -> None:
        deletion(model, x, a)
        insertion(model, x, a)

    def floor() -> None:
        with torch.inference_mode():
            for chunk in images.split(size):
                model(chunk)

    timing = paired(metrics, floor, CPU, repeats=repeats, cpu_clock=CPU_CLOCK)
    return _row(f"deletion+insertion, {batch} digits, {images.shape[0]} images", timing, 1.1,
                floor=f"forwards at batch {size}", seconds_per_batch=throughput)


def monitor_step(repeats: int) -> list[dict[str, Any]]:
    model = digits_model()
    x, y = digits_batch(16, seed=2)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyMapWarning)  # an untrained model's CAMs may be empty
        writer = SummaryWriter(folder)
        kw: dict[str, Any] = dict(methods=("saliency", "grad_cam"), layer="relu2", mean=MNIST_MEAN,
                                  std=MNIST_STD)
        with_metrics = Monitor(model, writer, x, y, metrics=("deletion", "insertion"), **kw)
        without = Monitor(model, writer, x, y, **kw)
        step = iter(range(1, 10**6))
        timing = paired(lambda: with_metrics.log(next(step)), lambda: without.log(next(step)), CPU,
                        repeats=repeats, cpu_clock=CPU_CLOCK)
        # The least any implementation could add: the forwards of the images the metrics score.
        maps = explain(model, x, methods=["saliency", "grad_cam"], layer="relu2")
        per_step = monitor_pixels_per_step(x)
        images = torch.cat([scored_images(x, a, per_step) for a in maps.values()])

        def floor() -> None:
            without.log(next(step))
            with torch.inference_mode():
                for chunk in images.split(128):
                    model(chunk)

        floored = paired(lambda: with_metrics.log(next(step)), floor, CPU, repeats=repeats,
                         cpu_clock=CPU_CLOCK)
        writer.close()
    return [
        _row("monitor log step, 2 methods, 16 digits: with both metrics / without", timing, 2.0,
             floor="the same step without metrics"),
        _row(f"the same, against the step without + plain forwards of its {images.shape[0]} scored images",
             floored, 1.1, floor="step without metrics + forwards at batch 128"),
    ]


def _row(name: str, timing: Timing, target: float, **extra: Any) -> dict[str, Any]:
    ratios = sorted(a / b for a, b in zip(timing.seconds, timing.floor, strict=True))
    return {
        "name": name,
        "median_s": timing.median,
        "floor_median_s": timing.floor_median,
        "ratio": timing.ratio,
        "ratio_min": ratios[0],
        "ratio_max": ratios[-1],
        "repeats": len(ratios),
        "target": target,
        "met": timing.ratio <= target,
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.metrics", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="digits scored by deletion+insertion (16)")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved pairs per row (9)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1: with --cpu-clock, steady on a shared machine)")
    parser.add_argument("--wall-clock", action="store_true",
                        help="time wall seconds instead of this process's CPU seconds")
    parser.add_argument("--json", metavar="FILE", help="write the rows and the machine here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global CPU_CLOCK
    CPU_CLOCK = not args.wall_clock
    rows = [faithfulness_vs_forwards(args.batch, args.repeats), *monitor_step(args.repeats)]
    for row in rows:
        print(f"{row['name']}: {row['median_s'] * 1000:.1f} ms vs {row['floor_median_s'] * 1000:.1f} ms "
              f"({row['floor']}); ratio {row['ratio']:.3f} (min {row['ratio_min']:.3f}, max "
              f"{row['ratio_max']:.3f}, {row['repeats']} pairs); target <= {row['target']}: "
              f"{'met' if row['met'] else 'NOT met'}")
    if args.json:
        machine = {"python": platform.python_version(), "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                   "command": " ".join(sys.argv)}
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"rows": rows, "machine": machine}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
