"""The fixed cost of one call: ours minus its floor on a model so small that nothing else costs.

    python -m benchmarks.per_call                 # 15 rounds of 200 calls, one thread
    python -m benchmarks.per_call --rounds 5 --calls 50

The model is a 3×3 convolution (1→4 channels), a ReLU and a linear layer on one 8×8 input: its forward
and backward take 100–250 µs, so what a method adds — the guard, the target, the finiteness check, the
hooks, the CAM's arithmetic — shows as the difference. Each round times ``--calls`` calls of every
method and of its floor (:mod:`benchmarks.floors`: the input floor for saliency and guided backprop,
the layer floor — forward and backward to the ReLU's output, no CAM arithmetic — for Grad-CAM, the
input floor for ``explain`` of saliency and Grad-CAM) in turn; a row reports the median over rounds
of ours − floor per call, with the smallest and largest. Issue 13's target is 50 µs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

import torchvis
from benchmarks.floors import input_floor, layer_floor

Run = Callable[[], object]


def tiny_model() -> tuple[nn.Module, torch.Tensor]:
    """The model and its input ``[1,1,8,8]``, seeded."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
        x = torch.randn(1, 1, 8, 8)
    return model, x


def cases(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[Run, Run]]:
    """Per method: (our call, its floor)."""
    to_input, to_layer = input_floor(model, x), layer_floor(model, x, model[1])
    return {
        "saliency": (lambda: torchvis.saliency(model, x), to_input),
        "guided_backprop": (lambda: torchvis.guided_backprop(model, x), to_input),
        "grad_cam": (lambda: torchvis.grad_cam(model, x, layer="1"), to_layer),
        "explain saliency+grad_cam": (
            lambda: torchvis.explain(model, x, methods=["saliency", "grad_cam"], layer="1"), to_input
        ),
    }


def per_call_us(run: Run, calls: int) -> float:
    began = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - began) / calls * 1e6


def measure(rounds: int, calls: int) -> dict[str, list[float]]:
    """Per method, ours − floor in µs per call, one value per round (after one warm-up round)."""
    model, x = tiny_model()
    pairs = cases(model, x)
    extra: dict[str, list[float]] = {name: [] for name in pairs}
    for index in range(rounds + 1):
        for name, (ours, floor) in pairs.items():
            first, second = (ours, floor) if index % 2 else (floor, ours)
            a, b = per_call_us(first, calls), per_call_us(second, calls)
            ours_us, floor_us = (a, b) if index % 2 else (b, a)
            if index:  # round 0 warms up
                extra[name].append(ours_us - floor_us)
    return extra


def main(argv: Sequence[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.per_call",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=200, help="calls per method and round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    extra = measure(args.rounds, args.calls)
    print(f"ours - floor, µs per call (median over {args.rounds} rounds of {args.calls} calls; "
          f"lowest-highest); {args.threads} thread(s), torch {torch.__version__}")
    for name, values in extra.items():
        print(f"{name:<28} {statistics.median(values):8.1f}   {min(values):7.1f}-{max(values):<7.1f}")
    return extra


if __name__ == "__main__":
    main()
