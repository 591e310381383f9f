"""What the faithfulness metrics cost: against the forward passes they cannot avoid, and in a monitor.

```bash
python -m benchmarks.metrics                 # about four minutes on 2 cores
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
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from benchmarks.timing import Timing, paired, time_once
from torchvis.apps.digits import MNIST_MEAN, MNIST_STD, DigitsCNN
from torchvis.methods.cam import EmptyMapWarning
from torchvis.methods.combine import explain
from torchvis.methods.perturbation import default_batch_size
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


def best_batch(model: nn.Module, images: Tensor, rounds: int = 5) -> tuple[int, dict[int, float]]:
    """The chunk size with the highest throughput for ``images``: the median of ``rounds`` timings each,
    every round timing all sizes (so a burst of load from other jobs does not pick the size for us)."""
    def run(size: int) -> None:
        with torch.inference_mode():
            for chunk in images.split(size):
                model(chunk)

    timings: dict[int, list[float]] = {size: [] for size in BATCHES}
    for size in BATCHES:
        run(size)
    for _ in range(rounds):
        for size in BATCHES:
            timings[size].append(time_once(lambda size=size: run(size), CPU, cpu_clock=CPU_CLOCK))
    seconds = {size: statistics.median(t) for size, t in timings.items()}
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
                for chunk in images.split(default_batch_size(x)):
                    model(chunk)

        floored = paired(lambda: with_metrics.log(next(step)), floor, CPU, repeats=repeats,
                         cpu_clock=CPU_CLOCK)
        writer.close()
    return [
        _row("monitor log step, 2 methods, 16 digits: with both metrics / without", timing, 2.0,
             floor="the same step without metrics"),
        _row(f"the same, against the step without + plain forwards of its {images.shape[0]} scored images",
             floored, 1.1, floor="step without metrics + forwards at the metrics' default batch"),
    ]


def background_monitor(repeats: int, span: int = 20, train_batch: int = 64) -> list[dict[str, Any]]:
    """Rows 3a and 3b: the background monitor with both metrics, seen from the training thread."""
    model = digits_model().train()
    x, y = digits_batch(16, seed=2)
    data, labels = digits_batch(train_batch, seed=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train_step() -> None:
        loss = nn.functional.cross_entropy(model(data), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyMapWarning)
        writer = SummaryWriter(folder)
        kw: dict[str, Any] = dict(methods=("saliency", "grad_cam"), layer="relu2", mean=MNIST_MEAN,
                                  std=MNIST_STD)
        behind = Monitor(model, writer, x, y, metrics=("deletion", "insertion"), background=True, **kw)
        without = Monitor(model, writer, x, y, **kw)
        step = iter(range(1, 10**6))

        def logged(monitor: Monitor) -> Callable[[], float]:
            def run() -> float:  # the training thread's CPU seconds of one logging step
                behind.wait()  # outside the timed part: each logging step finds the queue empty
                begin = time.thread_time()
                monitor.log(next(step))
                return time.thread_time() - begin
            return run

        step_timing = _pairs(logged(behind), logged(without), repeats)

        def spanned(monitor: Monitor) -> Callable[[], tuple[float, float, float]]:
            def run() -> tuple[float, float, float]:
                behind.wait()
                wall, cpu = time.perf_counter(), time.process_time()
                monitor.log(next(step))  # the span's first step logs
                for _ in range(span):
                    train_step()
                trained = time.perf_counter() - wall
                behind.wait()  # the worker's rest, after the last training step
                return trained, time.perf_counter() - wall - trained, time.process_time() - cpu
            return run

        spans_behind: list[tuple[float, float, float]] = []
        spans_without: list[tuple[float, float, float]] = []
        span_timing = _pairs(lambda: _keep(spans_behind, spanned(behind)()),
                             lambda: _keep(spans_without, spanned(without)()), repeats)
        behind.close()
        without.close()
        writer.close()
    drain = statistics.median(d for _, d, _ in spans_behind[1:])
    cpu = Timing(tuple(c for _, _, c in spans_behind[1:]), tuple(c for _, _, c in spans_without[1:]))
    return [
        _row("background monitor log step, 2 methods, 16 digits, both metrics: training thread's CPU "
             "seconds / the foreground step without metrics", step_timing, None,
             floor="the foreground step without metrics (thread CPU seconds)",
             note="the metrics' work is moved to the worker thread, not removed: see the span rows"),
        _row(f"{span} training steps (digits CNN, batch {train_batch}) whose first logs: wall time with the "
             "background monitor and both metrics / with the foreground monitor without metrics",
             span_timing, None, floor="the same span, foreground monitor without metrics (wall)",
             drain_median_s=drain),
        _row("the same spans, process CPU seconds (both threads), span + the worker's drain",
             cpu, None, floor="span with the foreground monitor without metrics (process CPU)"),
    ]


def _keep(into: list[tuple[float, float, float]], value: tuple[float, float, float]) -> float:
    into.append(value)
    return value[0]


def _pairs(run: Callable[[], float], floor: Callable[[], float], repeats: int) -> Timing:
    """Interleaved pairs (A B, B A, ...) after one warm-up each, of callables that time themselves."""
    run()
    floor()
    measured: list[float] = []
    floors: list[float] = []
    gc.collect()
    for index in range(repeats):
        if index % 2 == 0:
            measured.append(run())
            floors.append(floor())
        else:
            floors.append(floor())
            measured.append(run())
    return Timing(tuple(measured), tuple(floors))


def _row(name: str, timing: Timing, target: float | None, **extra: Any) -> dict[str, Any]:
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
        "met": None if target is None else timing.ratio <= target,
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
    parser.add_argument("--rows", nargs="+", choices=("faithfulness", "monitor", "background"),
                        default=["faithfulness", "monitor", "background"], help="which rows to run (all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global CPU_CLOCK
    CPU_CLOCK = not args.wall_clock
    rows = [*([faithfulness_vs_forwards(args.batch, args.repeats)] if "faithfulness" in args.rows else []),
            *(monitor_step(args.repeats) if "monitor" in args.rows else []),
            *(background_monitor(args.repeats) if "background" in args.rows else [])]
    for row in rows:
        print(f"{row['name']}: {row['median_s'] * 1000:.1f} ms vs {row['floor_median_s'] * 1000:.1f} ms "
              f"({row['floor']}); ratio {row['ratio']:.3f} (min {row['ratio_min']:.3f}, max "
              f"{row['ratio_max']:.3f}, {row['repeats']} pairs); "
              + ("no target claimed" if row["target"] is None else
                 f"target <= {row['target']}: {'met' if row['met'] else 'NOT met'}")
              + (f"; worker's drain after the span: median {row['drain_median_s'] * 1000:.0f} ms"
                 if "drain_median_s" in row else ""))
    if args.json:
        machine = {"python": platform.python_version(), "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                   "command": " ".join(sys.argv)}
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"rows": rows, "machine": machine}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
