"""Occlusion on images before and after inputs of any shape (issue 16): the general path must cost nothing.

``before`` is torchvis at main commit 18bdcb0 (a ``git worktree`` at ``--before``, created if missing),
``after`` this checkout. Each runs in its own long-lived interpreter (one thread) that builds the same
seeded models and inputs; the parent asks them in turn, alternating which goes first in each repeat,
to time one ``occlusion`` call, so drift on a shared machine hits both alike. Per case: the median over
repeats of after / before (CPU seconds of the child, which ignore waiting for a core on a loaded
machine; wall seconds beside), its range, and whether the two maps are bit-identical.

    python -m benchmarks.occlusion_inputs --repeats 15
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BEFORE_COMMIT = "18bdcb0"
ROOT = Path(__file__).resolve().parents[1]
# (model, batch, image side, window, stride): the attribution benchmark's windows (a quarter of the
# side, half-window stride).
CASES = {
    "digits b1": ("digits", 1, 28, 7, 3),
    "digits b16": ("digits", 16, 28, 7, 3),
    "resnet18 64² b1": ("resnet18", 1, 64, 16, 8),
    "resnet18 64² b4": ("resnet18", 4, 64, 16, 8),
}


def child() -> None:
    """Serve timing requests on stdin: a case name in, one JSON line out."""
    import torch

    from torchvis.methods.perturbation import occlusion

    torch.set_num_threads(1)
    built: dict[str, tuple[object, torch.Tensor, int, int]] = {}

    def build(name: str) -> tuple[object, torch.Tensor, int, int]:
        model_name, batch, side, window, stride = CASES[name]
        generator = torch.Generator().manual_seed(0)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            if model_name == "digits":
                from torchvis.apps.digits import DigitsCNN

                model = DigitsCNN(generator=generator).eval()
                x = torch.randn(batch, 1, side, side, generator=generator)
            else:
                from torchvision.models import resnet18

                model = resnet18(weights=None, num_classes=10).eval()
                x = torch.randn(batch, 3, side, side, generator=generator)
        return model, x, window, stride

    for line in sys.stdin:
        name = line.strip()
        if name not in built:
            built[name] = build(name)
        model, x, window, stride = built[name]
        wall, cpu = time.perf_counter(), time.process_time()
        heat = occlusion(model, x, window=window, stride=stride)  # type: ignore[arg-type]
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        digest = hashlib.sha256(heat.numpy().tobytes()).hexdigest()[:16]
        print(json.dumps({"wall": wall, "cpu": cpu, "digest": digest}), flush=True)


class Child:
    """A child interpreter importing torchvis from ``tree``."""

    def __init__(self, tree: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child"], env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tree)

    def run(self, case: str) -> dict[str, float | str]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(case + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the child for {case!r} died")
        result: dict[str, float | str] = json.loads(line)
        return result

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def before_tree(path: Path) -> Path:
    """The worktree at main commit 18bdcb0, added from this checkout's repository if missing."""
    if not (path / "torchvis").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), BEFORE_COMMIT],
                       check=True, capture_output=True)
    return path


def _head(tree: Path) -> str:
    """The tree's commit, with ``+changes`` when its files differ from it."""
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           check=True, capture_output=True, text=True).stdout.strip()
    return head + ("+changes" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--before", type=Path, default=Path("/tmp/before-occ"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child()
        return
    trees = {"before": before_tree(args.before), "after": ROOT}
    children = {label: Child(tree) for label, tree in trees.items()}
    load = os.getloadavg()
    commits = {label: _head(tree) for label, tree in trees.items()}
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} CPUs; "
          f"before = {commits['before']} at {trees['before']}, after = {commits['after']} at {ROOT}")
    print("| case | before ms (CPU) | after ms (CPU) | after / before CPU: median (min–max, IQR) | "
          "wall ratio median | maps identical |")
    print("|---|---|---|---|---|---|")
    try:
        for case in args.cases:
            for _ in range(args.warmup):
                for label in children:
                    children[label].run(case)
            runs: dict[str, list[dict[str, float | str]]] = {label: [] for label in children}
            for repeat in range(args.repeats):
                order = ("before", "after") if repeat % 2 == 0 else ("after", "before")
                for label in order:
                    runs[label].append(children[label].run(case))
            pairs = list(zip(runs["after"], runs["before"], strict=True))
            cpu = [float(a["cpu"]) / float(b["cpu"]) for a, b in pairs]
            wall = [float(a["wall"]) / float(b["wall"]) for a, b in pairs]
            quartiles = statistics.quantiles(cpu, n=4)
            same = {str(r["digest"]) for r in runs["after"] + runs["before"]}
            ms = {label: statistics.median(float(r["cpu"]) for r in runs[label]) * 1e3 for label in runs}
            print(f"| {case} | {ms['before']:.1f} | {ms['after']:.1f} | **{statistics.median(cpu):.3f}** "
                  f"({min(cpu):.3f}–{max(cpu):.3f}, {quartiles[0]:.3f}–{quartiles[2]:.3f}) | "
                  f"{statistics.median(wall):.3f} | {'yes' if len(same) == 1 else 'NO'} |", flush=True)
    finally:
        for c in children.values():
            c.close()
    load = os.getloadavg()
    print(f"load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {args.repeats} interleaved "
          f"repeats per case after {args.warmup} warm-up calls each")


if __name__ == "__main__":
    main()
