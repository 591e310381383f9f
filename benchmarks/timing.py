"""Clocks, paired repeats and peak memory: the measuring half of the benchmarks.

A method and its floor are timed in alternating order (A B, B A, A B, ...) so that drift on a shared
machine hits both alike; the figure reported is the median, over repeats, of each repeat's ratio. On
CUDA the clock is a pair of device events and the host waits only after the end event is recorded.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Run = Callable[[], object]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(run: Run, device: torch.device, *, cpu_clock: bool = False) -> float:
    """Seconds that one call of ``run`` takes: the host clock on the CPU, device events on CUDA.

    ``cpu_clock`` counts the CPU seconds of this process instead of wall seconds (CPU device only):
    on a machine shared with other jobs this ignores time spent waiting for a core, though it also
    counts threads spinning while they wait for work, so use it with one thread.
    """
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    clock = time.process_time if cpu_clock else time.perf_counter
    begin = clock()
    run()
    return clock() - begin


@dataclass(frozen=True)
class Timing:
    """Seconds per call of a measured callable and of its floor, one pair per repeat."""

    seconds: tuple[float, ...]
    floor: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def floor_median(self) -> float:
        return statistics.median(self.floor)

    @property
    def ratios(self) -> list[float]:
        """(measured / floor) of each repeat."""
        return [a / b for a, b in zip(self.seconds, self.floor, strict=True)]

    @property
    def ratio(self) -> float:
        """Median over repeats of (measured / floor) within the same repeat."""
        return statistics.median(self.ratios)


def paired(
    run: Run,
    floor: Run,
    device: torch.device,
    *,
    repeats: int,
    warmup: int = 1,
    budget: float = float("inf"),
    min_repeats: int = 3,
    cpu_clock: bool = False,
) -> Timing:
    """Time ``run`` and ``floor`` interleaved, ``repeats`` pairs after ``warmup`` calls of each.

    Stops early, after at least ``min_repeats`` pairs, once ``budget`` seconds have gone by.
    """
    for _ in range(warmup):
        run()
        floor()
    synchronize(device)
    measured: list[float] = []
    floors: list[float] = []
    # As timeit does: no garbage collection inside the loop, where it would land on one side of a pair.
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        began = time.perf_counter()
        for index in range(repeats):
            if index % 2 == 0:
                measured.append(time_once(run, device, cpu_clock=cpu_clock))
                floors.append(time_once(floor, device, cpu_clock=cpu_clock))
            else:
                floors.append(time_once(floor, device, cpu_clock=cpu_clock))
                measured.append(time_once(run, device, cpu_clock=cpu_clock))
            if index + 1 >= min_repeats and time.perf_counter() - began > budget:
                break
    finally:
        if enabled:
            gc.enable()
    return Timing(tuple(measured), tuple(floors))


def _start_ns(event: Any) -> int:
    """A profiler event's start time; torch < 2.3 only has ``start_us``."""
    return int(event.start_ns()) if hasattr(event, "start_ns") else 1000 * int(event.start_us())


def peak_bytes(run: Run, device: torch.device) -> int:
    """Peak bytes of tensor memory that one call of ``run`` allocates above what was live before.

    CUDA: the caching allocator's peak statistic. CPU: the allocation events that the profiler
    records (``profile_memory``); the call runs once more, untimed.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler's start/stop chatter on stderr
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted(
        (_start_ns(event), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch._C._autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak
