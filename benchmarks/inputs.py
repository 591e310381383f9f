"""What the general inputs (issue 16) cost: (a) per-call time on images before and after, (b) a
two-input model's saliency against its floor.

(a) Two worker processes, one importing torchvis from a checkout of the code before the general
inputs (``--before``, default a worktree of main at 18bdcb0; create it with
``git worktree add /tmp/before 18bdcb0``) and one from this checkout, time the same calls on the same
model and input in rounds that alternate which goes first; a round's figure is each side's median
per-call time, and the ratio reported is the median over rounds of after / before, with the lowest
and highest round. Models: the digits CNN at batch 1 (28²) and resnet18 (10 classes, random weights)
at 64², batch 1; methods: saliency, guided backprop, Grad-CAM, explain(saliency + Grad-CAM), integrated
gradients (16 steps) and SmoothGrad (8 samples).

(b) An image CNN (resnet18's trunk at 64²) and a metadata MLP (16 -> 64 -> 64) whose features are
concatenated before a linear head, at batch 8 and 1: ``saliency(model, (image, meta), target)``
against its floor — fresh leaves, one forward, one ``torch.autograd.grad`` to both inputs — timed
interleaved (:func:`benchmarks.timing.paired`); also with a per-example mask as ``forward_args``.

Both run with one intra-op thread and, by default, the process CPU clock (``--wall`` for wall time),
which on a shared machine ignores time spent waiting for a core.

    python -m benchmarks.inputs [--rounds 9] [--before /tmp/before] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.timing import paired

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import torch, torchvision
torch.set_num_threads(1)
import torchvis
from torchvis.apps.digits import DigitsCNN

clock = time.perf_counter if sys.argv[1] == "wall" else time.process_time

def case(name):
    g = torch.Generator().manual_seed(0)
    if name == "digits":
        return DigitsCNN(generator=g).eval(), torch.randn(1, 1, 28, 28, generator=g), "relu2"
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    return model, torch.randn(1, 3, 64, 64, generator=g), "layer4"

CALLS = {
    "saliency": lambda m, x, layer: torchvis.saliency(m, x, 3),
    "guided_backprop": lambda m, x, layer: torchvis.guided_backprop(m, x, 3),
    "grad_cam": lambda m, x, layer: torchvis.grad_cam(m, x, 3, layer=layer),
    "explain": lambda m, x, layer: torchvis.explain(m, x, 3, methods=["saliency", "grad_cam"], layer=layer),
    "integrated_gradients": lambda m, x, layer: torchvis.integrated_gradients(m, x, 3, steps=16),
    "smoothgrad": lambda m, x, layer: torchvis.smoothgrad(m, x, 3, samples=8),
}
cases = {}
print(json.dumps({"file": torchvis.__file__}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if request["model"] not in cases:
        cases[request["model"]] = case(request["model"])
    model, x, layer = cases[request["model"]]
    call = CALLS[request["method"]]
    call(model, x, layer)
    times = []
    for _ in range(request["calls"]):
        begin = clock()
        call(model, x, layer)
        times.append(clock() - begin)
    print(json.dumps(times), flush=True)
"""

MODELS = ("digits", "resnet18")
METHODS = ("saliency", "guided_backprop", "grad_cam", "explain", "integrated_gradients", "smoothgrad")


class Worker:
    """A Python process importing torchvis from ``root``, timing calls on request."""

    def __init__(self, root: Path, clock: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen([sys.executable, "-c", WORKER, clock], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env, cwd=root)
        self.file = json.loads(self._read())["file"]

    def _read(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("a benchmark worker died")
        return line

    def time(self, model: str, method: str, calls: int) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"model": model, "method": method, "calls": calls}) + "\n")
        self.process.stdin.flush()
        return statistics.median(json.loads(self._read()))

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait()


def before_after(before: Path, rounds: int, clock: str) -> list[dict[str, Any]]:
    old, new = Worker(before, clock), Worker(ROOT, clock)
    print(f"before: {old.file}\nafter:  {new.file}")
    rows = []
    try:
        for model in MODELS:
            for method in METHODS:
                probe = new.time(model, method, 1)
                calls = max(1, min(50, int(0.25 / max(probe, 1e-6))))
                ratios, befores, afters = [], [], []
                for r in range(rounds):
                    if r % 2 == 0:
                        b, a = old.time(model, method, calls), new.time(model, method, calls)
                    else:
                        a, b = new.time(model, method, calls), old.time(model, method, calls)
                    befores.append(b)
                    afters.append(a)
                    ratios.append(a / b)
                row = {"model": model, "method": method, "calls_per_round": calls,
                       "before_ms": 1e3 * statistics.median(befores),
                       "after_ms": 1e3 * statistics.median(afters),
                       "ratio": statistics.median(ratios), "lowest": min(ratios), "highest": max(ratios)}
                print(f"{model:9} {method:21} before {row['before_ms']:8.3f} ms  "
                      f"after {row['after_ms']:8.3f} ms  "
                      f"ratio {row['ratio']:.3f} [{row['lowest']:.3f}, {row['highest']:.3f}]", flush=True)
                rows.append(row)
    finally:
        old.close()
        new.close()
    return rows


class ImageAndMeta(nn.Module):
    """resnet18's trunk on the image, a two-layer MLP on 16 metadata fields, a linear head on both."""

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        trunk = torchvision.models.resnet18(num_classes=10)
        trunk.fc = nn.Identity()  # type: ignore[assignment]
        self.image = trunk
        self.meta = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(512 + 64, 10)

    def forward(self, image: Tensor, meta: Tensor, mask: Tensor | None = None) -> Tensor:
        meta = meta if mask is None else meta * mask
        return self.head(torch.cat([self.image(image), self.meta(meta)], dim=1))


def two_inputs(batch: int, repeats: int, cpu_clock: bool) -> list[dict[str, Any]]:
    import torchvis

    torch.manual_seed(0)
    model = ImageAndMeta().eval()
    g = torch.Generator().manual_seed(1)
    image, meta = torch.randn(batch, 3, 64, 64, generator=g), torch.randn(batch, 16, generator=g)
    mask = (torch.rand(batch, 16, generator=g) > 0.2).float()
    rows = []
    for label, extra in (("tuple", ()), ("tuple + forward_args mask", (mask,))):
        def ours(extra: tuple[Tensor, ...] = extra) -> object:
            return torchvis.saliency(model, (image, meta), 3, forward_args=extra or None)

        def floor(extra: tuple[Tensor, ...] = extra) -> object:
            leaves = [image.detach().requires_grad_(True), meta.detach().requires_grad_(True)]
            return torch.autograd.grad(model(*leaves, *extra)[:, 3].sum(), leaves)

        timing = paired(ours, floor, torch.device("cpu"), repeats=repeats, warmup=2, cpu_clock=cpu_clock)
        ratios = sorted(a / b for a, b in zip(timing.seconds, timing.floor, strict=True))
        row = {"batch": batch, "case": label, "ours_ms": 1e3 * timing.median,
               "floor_ms": 1e3 * timing.floor_median, "ratio": timing.ratio,
               "q1": ratios[len(ratios) // 4], "q3": ratios[(3 * len(ratios)) // 4]}
        print(f"two inputs, batch {batch}, {label:26} ours {row['ours_ms']:8.3f} ms  "
              f"floor {row['floor_ms']:8.3f} ms  ratio {row['ratio']:.3f} "
              f"[q1 {row['q1']:.3f}, q3 {row['q3']:.3f}]", flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, default=Path("/tmp/before"))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=41, help="pairs for the two-input floor")
    parser.add_argument("--wall", action="store_true", help="wall clock instead of the process CPU clock")
    parser.add_argument("--skip-before-after", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; torch {torch.__version__}; "
          f"clock {'wall' if args.wall else 'process CPU'}; one thread", flush=True)
    started = time.time()
    result: dict[str, Any] = {"load_before": load}
    if not args.skip_before_after:
        result["before_after"] = before_after(args.before, args.rounds, "wall" if args.wall else "cpu")
    result["two_inputs"] = [row for batch in (8, 1) for row in two_inputs(batch, args.repeats, not args.wall)]
    result["load_after"] = os.getloadavg()
    result["seconds"] = time.time() - started
    print(f"load average after {result['load_after'][0]:.2f}; {result['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
