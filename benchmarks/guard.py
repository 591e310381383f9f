"""What the thread-safe guard and the wider finiteness check add per call, on the digits CNN at batch 1.

    python -m benchmarks.guard            # about a minute on 2 cores

The baseline is the guard as it was before the per-model leases (modes recorded and restored per call,
the global RNG forked) and the NaN-only check of the logits, re-stated here; both sides run
interleaved in one process, timed in process CPU seconds with one thread (a shared machine's waiting
for a core is left out), and the added cost is the median of the paired differences, with its spread.
"""

from __future__ import annotations

import statistics
import time
import timeit
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from torchvis.apps.digits import DigitsCNN
from torchvis.core.forward import check_finite, guarded, restored_modes
from torchvis.methods.gradient import saliency


@contextmanager
def guard_before(model: nn.Module, x: Tensor, *, eval_mode: bool = True) -> Iterator[None]:
    """The guard before issue 11, for comparison."""
    with restored_modes(model) as modes, torch.random.fork_rng(devices=[]):
        if eval_mode and any(training for _, training in modes):
            model.eval()
        with torch.enable_grad():
            yield


def check_before(logits: Tensor) -> None:
    if torch.isnan(logits).any():
        raise ValueError("NaN")


def per_call_us(run: Callable[[], object], number: int) -> float:
    return timeit.timeit(run, number=number, timer=time.process_time) / number * 1e6


def added(new: Callable[[], object], old: Callable[[], object], repeats: int = 15,
          number: int = 2000) -> tuple[float, float, float, float, float]:
    """Medians of new and old per call, and the median and quartiles of new - old (µs), interleaved."""
    news, olds = [], []
    for index in range(repeats):
        order = [(news, new), (olds, old)] if index % 2 == 0 else [(olds, old), (news, new)]
        for into, run in order:
            into.append(per_call_us(run, number))
    diffs = [a - b for a, b in zip(news, olds, strict=True)]
    q1, _, q3 = statistics.quantiles(diffs, n=4)
    return statistics.median(news), statistics.median(olds), statistics.median(diffs), q1, q3


def main() -> None:
    torch.set_num_threads(1)
    x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for mode in ("eval", "train"):
        model = DigitsCNN(generator=torch.Generator().manual_seed(0)).train(mode == "train")

        def new(model: nn.Module = model) -> None:
            with guarded(model, x):
                pass

        def old(model: nn.Module = model) -> None:
            with guard_before(model, x):
                pass

        n, o, d, q1, q3 = added(new, old)
        print(f"guard, {mode}-mode model: {n:.1f} µs, before {o:.1f} µs: +{d:.1f} µs "
              f"(quartiles {q1:.1f} to {q3:.1f}, 15 paired repeats)")
    logits, grad = torch.randn(1, 10), torch.randn(1, 1, 28, 28)
    n, o, d, q1, q3 = added(lambda: check_finite(logits, grad), lambda: check_before(logits))
    print(f"finite logits and input gradient: {n:.1f} µs, NaN-only logits {o:.1f} µs: +{d:.1f} µs "
          f"(quartiles {q1:.1f} to {q3:.1f})")
    model = DigitsCNN(generator=torch.Generator().manual_seed(0)).eval()
    whole = statistics.median(per_call_us(lambda: saliency(model, x, 3), 200) for _ in range(7))
    print(f"for scale, saliency on the digits CNN at batch 1: {whole:.0f} µs a call")


if __name__ == "__main__":
    main()
