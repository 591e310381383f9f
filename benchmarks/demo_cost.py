"""What the demo's toolbox logging costs beside its attribution logging and its training, per call.

    python -m benchmarks.demo_cost [--repeats 5]

Times, interleaved and repeated (CPU time of this process, so a busy machine hurts less): one
``Monitor.log`` (the attribution grids of the 10 probes: saliency, guided backprop, Grad-CAM,
occlusion), one ``_log_insides`` (first-layer filters and two feature-map grids of one digit), ten
training steps (the demo's ``--every``), and once the end-of-run activation maximization. Prints the
median of each and the median ratio of the insides to the monitor and to ten training steps, with the
spread (min..max) of the paired ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter

from torchvis.apps import demo
from torchvis.apps.digits import CLASS_NAMES, MNIST_MEAN, MNIST_STD, DigitsCNN, load_digits
from torchvis.tracking.monitor import Monitor


def cpu_seconds(run: Callable[[], object]) -> float:
    start = time.process_time()
    run()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    data = load_digits(seed=0)
    probe = torch.stack([torch.nonzero(data.test_y == c)[0, 0] for c in range(10)])
    model = DigitsCNN(generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train_ten() -> None:
        for k in range(10):
            batch = slice(64 * k, 64 * k + 64)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(data.train_x[batch]), data.train_y[batch]).backward()
            optimizer.step()

    with tempfile.TemporaryDirectory() as folder, SummaryWriter(folder) as writer, Monitor(
        model, writer, data.test_x[probe], data.test_y[probe], methods=list(demo.DEFAULT_METHODS),
        layer=demo.GRAD_CAM_LAYER, every=10, mean=MNIST_MEAN, std=MNIST_STD, class_names=CLASS_NAMES,
        window=demo.OCCLUSION_WINDOW,
    ) as monitor:
        digit = data.test_x[probe[demo.FEATURE_DIGIT]][None]
        runs = {
            "monitor.log": lambda: monitor.log(0),
            "insides": lambda: demo._log_insides(writer, model, digit, 0),
            "10 train steps": train_ten,
        }
        for run in runs.values():  # warm-up
            run()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name].append(cpu_seconds(run))
        maximize = cpu_seconds(lambda: demo._log_maximized(writer, model, 0, 0, 128))
    for name, values in times.items():
        print(f"{name:15} median {statistics.median(values):.3f} s CPU")
    print(f"{'maximize (once)':15} {maximize:.3f} s CPU")
    for other in ("monitor.log", "10 train steps"):
        ratios = [a / b for a, b in zip(times["insides"], times[other], strict=True)]
        print(f"insides / {other}: median {statistics.median(ratios):.2f} "
              f"(spread {min(ratios):.2f}..{max(ratios):.2f}, {args.repeats} repeats)")


if __name__ == "__main__":
    main()
