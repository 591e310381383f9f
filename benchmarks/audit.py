"""Audit throughput against its floor: ``python -m benchmarks.audit``.

The floor is plain batched inference plus one backward to the input on the same images and batches
(what saliency and Grad-CAM need at least); the audit's per-image work adds the maps' bookkeeping and
the writing of every map to its shard files (metrics off: deletion/insertion are scored against their
own floor in ``benchmarks.metrics``). The merge and report, a fixed cost per audit, are timed once.
Audit and floor alternate per repeat; the figure is the median of the per-repeat ratios, with the
spread (``--threads 1 --cpu-clock``: CPU seconds of one thread, which a shared machine's other jobs
move little). ``--scaling N`` also times the command on N digits with 1 and 2 processes (torchrun's
variables, gloo on loopback).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.floors import input_floor
from benchmarks.timing import paired
from torchvis.apps.audit import ShardRun, TensorData, audit, shard_path, write_npz_atomic

CASES = {
    # name: (build, input shape, images, batch, Grad-CAM layer)
    "digits": ("digits", (1, 28, 28), 1024, 128, "relu2"),
    "resnet18": ("resnet18", (3, 224, 224), 64, 16, "layer4"),
}


def build(name: str) -> nn.Module:
    if name == "digits":
        from torchvis.apps.digits import DigitsCNN

        return DigitsCNN(generator=torch.Generator().manual_seed(0)).eval()
    import torchvision

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return torchvision.models.resnet18(weights=None).eval()


def measure(case: str, repeats: int, cpu_clock: bool = False) -> dict[str, float]:
    kind, shape, n, batch, layer = CASES[case]
    model = build(kind)
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))
    data = TensorData(x, torch.zeros(n, dtype=torch.long))
    root = Path(tempfile.mkdtemp(prefix="audit-bench-"))

    engine = ShardRun(model, ["saliency", "grad_cam"], layer, (), 1, {}, torch.device("cpu"))
    (root / "out" / "shards").mkdir(parents=True)

    def run_audit() -> None:  # the per-image work of audit(): maps, predictions, shard files
        for k in range(0, n, 512):
            arrays = engine.shard(data, range(k, min(n, k + 512)), batch, _NoBar())
            write_npz_atomic(shard_path(root / "out", k // 512), arrays)

    floors = [input_floor(model, x[i : i + batch]) for i in range(0, n, batch)]

    def run_floor() -> None:
        for floor in floors:
            floor()

    try:
        timing = paired(run_audit, run_floor, torch.device("cpu"), repeats=repeats, cpu_clock=cpu_clock)
        began = time.perf_counter()
        audit(model, data, root / "out", methods=["saliency", "grad_cam"], layer=layer, metrics=(),
              batch_size=batch, shard_size=512, progress=False)  # shards exist: merge and report only
        fixed = time.perf_counter() - began
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratios = sorted(f / a for a, f in zip(timing.seconds, timing.floor, strict=True))
    return {"audit_ips": n / timing.median, "floor_ips": n / timing.floor_median, "fixed": fixed,
            "ratio": statistics.median(ratios), "low": ratios[0], "high": ratios[-1], "repeats": len(ratios)}


class _NoBar:
    def update(self, n: int) -> None:
        pass


def scaling(images: int) -> dict[int, float]:
    """Wall seconds of ``torchvis audit`` on an image folder of real digits with 1 and 2 processes."""
    from PIL import Image

    from torchvis.apps.digits import DigitsCNN, load_digits, save_checkpoint

    root = Path(tempfile.mkdtemp(prefix="audit-scaling-"))
    data = load_digits()
    for i in range(images):
        folder = root / "images" / str(int(data.test_y[i]))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = ((data.test_x[i, 0] * 0.3081 + 0.1307).clamp(0, 1) * 255).byte().numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    save_checkpoint(DigitsCNN(generator=torch.Generator().manual_seed(0)), root / "digits.pt")
    seconds = {}
    for world in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": str(2 // world), "GLOO_SOCKET_IFNAME": "lo"}
        command = [sys.executable, "-m", "torchvis", "audit", str(root / "images"), "--model",
                   str(root / "digits.pt"), "--out", str(root / f"out{world}"), "--metrics", "none",
                   "--shard-size", "128", "--batch-size", "128", "--no-progress"]
        began = time.perf_counter()
        procs = [subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                  stdout=subprocess.DEVNULL) for r in range(world)]
        if any(p.wait() != 0 for p in procs):
            raise RuntimeError(f"torchvis audit failed with {world} processes")
        seconds[world] = time.perf_counter() - began
    shutil.rmtree(root, ignore_errors=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scaling", type=int, default=0, metavar="N",
                        help="also time the command on N digits with 1 and 2 processes")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cpu-clock", action="store_true",
                        help="time the process's CPU seconds, not wall seconds (with --threads 1: "
                             "a figure that other jobs on a shared machine move little)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = "CPU" if args.cpu_clock else "wall"
    print(f"{args.threads} thread(s), {clock} clock, load {os.getloadavg()[0]:.2f}")
    print("| model | audit img/s | floor img/s | audit / floor throughput (median, min..max, repeats) "
          "| merge + report, once |")
    print("|---|---|---|---|---|")
    for case in args.cases:
        r = measure(case, args.repeats, args.cpu_clock)
        print(f"| {case} | {r['audit_ips']:.1f} | {r['floor_ips']:.1f} | "
              f"{r['ratio']:.2f} ({r['low']:.2f}..{r['high']:.2f}, {r['repeats']:.0f}) "
              f"| {r['fixed']:.1f} s |", flush=True)
    if args.scaling:
        seconds = scaling(args.scaling)
        print(f"\nscaling on {args.scaling} digits (wall, process start and torch import included): "
              + ", ".join(f"{w} process{'es' * (w > 1)}: {s:.1f} s ({args.scaling / s:.0f} img/s)"
                          for w, s in seconds.items()))
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
