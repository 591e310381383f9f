"""The fixed cost of one call: ours minus its floor on a model so small that nothing else costs.

    python -m benchmarks.per_call                 # 15 rounds of 200 calls, one thread
    python -m benchmarks.per_call --rounds 5 --calls 50

The model is a 3×3 convolution (1→4 channels), a ReLU and a linear layer on one 8×8 input: its forward
and backward take 100–250 µs, so what a method adds — the guard, the target, the finiteness check, the
hooks, the CAM's arithmetic — shows as the difference. Each round times ``--calls`` calls of a method
and of its floor, interleaved. The floors are those of :mod:`benchmarks.floors`: the input floor for
saliency, guided backprop and ``explain`` of saliency and Grad-CAM; the layer floor (forward and
backward to the ReLU's output, no CAM arithmetic) for Grad-CAM. A row reports the median over rounds
of ours − floor per call, with the smallest and largest. Issue 13's target is 50 µs.

The last row, ``promises alone``, times :func:`promised_saliency` against the same input floor: plain
PyTorch doing only what the product's promises ask of every call (a lock held while the modules' modes
are read on entry and compared on exit, the global RNG saved and restored, gradients on, the input
copied before the model sees it, the target read from the logits, one finiteness read of the logits
and the gradient), and nothing else: no argument checks, no registry, no hooks. It says how much of
the fixed cost the promises themselves take on this machine.
"""

from __future__ import annotations

import argparse
import math
import statistics
import threading
from collections.abc import Callable, Sequence

import torch
from torch import nn

import torchvis
from benchmarks.floors import input_floor, layer_floor
from benchmarks.timing import paired

Run = Callable[[], object]


def tiny_model() -> tuple[nn.Sequential, torch.Tensor]:
    """The model and its input ``[1,1,8,8]``, seeded."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
        x = torch.randn(1, 1, 8, 8)
    return model, x


def promised_saliency(model: nn.Module, x: torch.Tensor) -> Run:
    """Saliency with only what the promises need, in plain PyTorch (see the module doc): the least a
    call that keeps them can cost. Returns ``d score / d x`` ``[B,C,H,W]``."""
    lock = threading.Lock()

    def run() -> torch.Tensor:
        with lock:  # the lease: modes read on entry ...
            modes = [module.training for module in model.modules()]
        rng = torch.get_rng_state()
        try:
            with torch.enable_grad():
                leaf = x.detach().requires_grad_(True)
                logits = model(leaf.clone())
                target = logits.argmax(dim=1)
                score = logits.gather(1, target.unsqueeze(1)).sum()
                (grad,) = torch.autograd.grad(score, leaf)
                if not all(math.isfinite(v) for v in torch.stack([logits.sum(), grad.sum()]).tolist()):
                    raise ValueError("not finite")
        finally:
            torch.set_rng_state(rng)
            with lock:  # ... and compared on exit
                if [module.training for module in model.modules()] != modes:
                    raise RuntimeError("a mode changed")
        return grad

    return run


def cases(model: nn.Sequential, x: torch.Tensor) -> dict[str, tuple[Run, Run]]:
    """Per method: (our call, its floor)."""
    to_input, to_layer = input_floor(model, x), layer_floor(model, x, model[1])
    return {
        "saliency": (lambda: torchvis.saliency(model, x), to_input),
        "guided_backprop": (lambda: torchvis.guided_backprop(model, x), to_input),
        "grad_cam": (lambda: torchvis.grad_cam(model, x, layer="1"), to_layer),
        "explain saliency+grad_cam": (
            lambda: torchvis.explain(model, x, methods=["saliency", "grad_cam"], layer="1"), to_input
        ),
        "promises alone": (promised_saliency(model, x), to_input),
    }


def repeated(run: Run, calls: int) -> Run:
    """``run`` called ``calls`` times."""

    def many() -> None:
        for _ in range(calls):
            run()

    return many


def measure(rounds: int, calls: int) -> dict[str, list[float]]:
    """Per method, ours − floor in µs per call, one value per round: ``calls`` calls of each side,
    interleaved by :func:`benchmarks.timing.paired` (alternating order, one warm-up, no garbage
    collection inside the loop)."""
    model, x = tiny_model()
    extra: dict[str, list[float]] = {}
    for name, (ours, floor) in cases(model, x).items():
        timing = paired(repeated(ours, calls), repeated(floor, calls), torch.device("cpu"), repeats=rounds,
                        min_repeats=rounds)
        extra[name] = [(a - b) / calls * 1e6 for a, b in zip(timing.seconds, timing.floor, strict=True)]
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
