"""What ``maximize`` pays for using ``torch.optim.Adam`` and torchvision's blur: its first call per process.

Both import ``torch._dynamo`` once per process: torchvision when it is imported, ``torch.optim`` when
the first optimizer is built. Each repeat starts two fresh interpreters, in alternating order:
``bare`` imports only torch and torchvis; ``torchvision`` imports torchvision first, as any script
that builds a torchvision model, or trains with a ``torch.optim`` optimizer, already has. Each times
``maximize`` on the digits CNN (its 10 logits, default settings) twice in a row and reports
first / second call; the second call is the steady cost.

    python -m benchmarks.first_use --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

MODES = ("bare", "torchvision")


def child(mode: str) -> dict[str, float]:
    """Time two calls of ``maximize`` in this (fresh) process."""
    import torch

    if mode == "torchvision":
        import torchvision  # noqa: F401

    from torchvis.apps.digits import DigitsCNN
    from torchvis.inspection.activation_maximization import Logit, maximize

    torch.set_num_threads(1)
    model = DigitsCNN(generator=torch.Generator().manual_seed(0)).eval()
    units = [Logit(k) for k in range(10)]
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        maximize(model, units, shape=(1, 28, 28))
        seconds.append(time.perf_counter() - start)
    return {"first": seconds[0], "second": seconds[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    ratios: dict[str, list[float]] = {mode: [] for mode in MODES}
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
            out = subprocess.run([sys.executable, "-m", "benchmarks.first_use", "--child", mode],
                                 check=True, capture_output=True, text=True).stdout
            run = json.loads(out.strip().splitlines()[-1])
            ratios[mode].append(run["first"] / run["second"])
            seconds[mode].append(run["first"] - run["second"])
    for mode in MODES:
        r, s = ratios[mode], seconds[mode]
        print(f"{mode:12s} first/second call: median {statistics.median(r):.2f} (range {min(r):.2f}-"
              f"{max(r):.2f}); first - second: median {statistics.median(s):.2f} s "
              f"(range {min(s):.2f}-{max(s):.2f}), {len(r)} repeats")


if __name__ == "__main__":
    main()
