"""What the training-loop monitor costs: a digits training step without torchvis, with
:class:`torchvis.monitor.Monitor` on a non-logging step, on a logging step, and on a logging step in
background mode (``background=True``: the training thread only snapshots the weights).

The background variant is timed in its own interleaved loop: after each timed logging step the
worker is waited for, untimed, so that every pair starts with an idle worker and the figure is what
the training thread waits for. Its ``call_us`` is the snapshot (``Monitor.step`` alone, worker idle).

Each variant is timed interleaved with the plain step (see :mod:`benchmarks.timing`). The model,
optimizer and data are those of a real step (DigitsCNN, Adam, cross-entropy, a batch of 64); the
monitor writes to a real TensorBoard ``SummaryWriter`` in a temporary folder.
"""

from __future__ import annotations

import tempfile
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.timing import Timing, paired, time_once


@dataclass(frozen=True)
class TrainingResult:
    """One variant of the step, timed against the plain step; ``call_us`` is the cost of the
    monitor's ``step`` call alone (measured over many calls), when that is what is compared."""

    name: str
    timing: Timing
    batch: int
    call_us: float | None = None


def measure_training(
    device: torch.device,
    *,
    repeats: int,
    warmup: int = 3,
    budget: float = float("inf"),
    cpu_clock: bool = False,
    batch: int = 64,
    probe: int = 8,
) -> list[TrainingResult]:
    """Time a plain step, a step plus a non-logging ``Monitor.step`` and a step plus a logging one."""
    from torch.utils.tensorboard import SummaryWriter

    from torchvis.apps.digits import MNIST_MEAN, MNIST_STD, DigitsCNN
    from torchvis.tracking.monitor import Monitor

    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = DigitsCNN().to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    pixels = torch.rand(batch, 1, 28, 28, generator=generator)
    x = ((pixels - MNIST_MEAN) / MNIST_STD).to(device)
    y = torch.randint(0, 10, (batch,), generator=generator).to(device)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    results = []
    with tempfile.TemporaryDirectory() as folder, SummaryWriter(folder) as writer:
        monitor = Monitor(
            model, writer, x[:probe], y[:probe], layer="conv2", every=1000, mean=MNIST_MEAN, std=MNIST_STD
        )

        def with_monitor(step: int) -> Callable[[], None]:
            def run() -> None:
                train_step()
                monitor.step(step)

            return run

        variants = (("train step + Monitor.step, not logging", 1), ("train step + Monitor.step, logging", 0))
        for name, step in variants:
            timing = paired(
                with_monitor(step), train_step, device,
                repeats=repeats, warmup=warmup, budget=budget, cpu_clock=cpu_clock,
            )
            call_us = None
            if step:  # the difference is below the noise of a shared machine: time the call alone
                calls = 100_000
                call_us = min(timeit.repeat(lambda: monitor.step(1), number=calls, repeat=3)) / calls * 1e6
            results.append(TrainingResult(name, timing, batch, call_us))
        monitor.close()
        background = Monitor(
            model, writer, x[:probe], y[:probe], layer="conv2", every=1000, mean=MNIST_MEAN, std=MNIST_STD,
            background=True,
        )
        try:
            results.append(_background_result(
                background, train_step, device, repeats, warmup, budget, cpu_clock, batch))
        finally:
            background.close()
    return results


def _background_result(
    monitor: Any, train_step: Callable[[], None], device: torch.device, repeats: int, warmup: int,
    budget: float, cpu_clock: bool, batch: int,
) -> TrainingResult:
    """A training step plus a logging ``Monitor.step`` in background mode against the plain step,
    interleaved; the worker is drained, untimed, after each logging step."""
    import time

    def logging_step() -> None:
        train_step()
        monitor.step(0)

    for _ in range(warmup):
        logging_step()
        monitor.wait()
        train_step()
    measured: list[float] = []
    floors: list[float] = []
    began = time.perf_counter()
    for index in range(repeats):
        pair = [(measured, logging_step), (floors, train_step)]
        for into, run in pair if index % 2 == 0 else pair[::-1]:
            into.append(time_once(run, device, cpu_clock=cpu_clock))
            monitor.wait()
        if index + 1 >= 3 and time.perf_counter() - began > budget:
            break
    snapshots = []
    for _ in range(20):
        snapshots.append(time_once(lambda: monitor.step(0), device, cpu_clock=cpu_clock))
        monitor.wait()
    call_us = sorted(snapshots)[len(snapshots) // 2] * 1e6
    name = "train step + Monitor.step, logging, background"
    return TrainingResult(name, Timing(tuple(measured), tuple(floors)), batch, call_us)
