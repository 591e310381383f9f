"""Incremental occlusion against the naive floor, interleaved, in one run.

    python -m benchmarks.incremental     # resnet18, vgg16, resnet50 at 224², window 16 stride 8
    python -m benchmarks.incremental --models resnet18 --repeats 5 --json out.json

Per model: the naive floor (every occluded image through plain ``model(chunk)`` forwards at batch
``--floor-batch``, building the images not counted; see :mod:`benchmarks.floors`) and
``occlusion(..., incremental=True)`` are timed in alternating order (:func:`benchmarks.timing.paired`);
the row reports both medians, the median and the smallest of the paired speed-ups (floor / ours),
the largest difference between the incremental and the naive map (one naive ``occlusion`` call, not
timed unless ``--naive``), and peak tensor memory (``torch.profiler`` allocation events on the CPU,
``torch.cuda.max_memory_allocated`` on CUDA): the incremental call whole, the floor for one batch
(its peak does not grow with the number of batches).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from benchmarks import floors
from benchmarks.attribution import MODELS, machine, seeded_model
from benchmarks.timing import paired, peak_bytes
from torchvis.methods import incremental_occlusion as inc
from torchvis.methods.perturbation import default_batch_size, occlusion, window_starts


@dataclass
class IncrementalRow:
    model: str
    size: int
    batch: int
    windows: int
    work: float  # the engine's estimate: multiply-adds as a share of the naive path's
    ms: float
    floor_ms: float
    speedup: float  # median over repeats of floor / incremental within each pair
    min_speedup: float
    max_speedup: float
    repeats: int
    naive_ms: float | None = None
    rel_diff: float | None = None  # max |incremental - naive| / max |naive|
    score_rel_diff: float | None = None  # max |incremental - naive| / max |clean logit|
    peak_mb: float | None = None
    floor_peak_mb: float | None = None


def run_model(name: str, args: argparse.Namespace, log: Any) -> IncrementalRow:
    spec = MODELS[name]
    size = args.size or spec.size
    device = torch.device(args.device)
    model = seeded_model(name).to(device)
    x = torch.randn(args.batch, spec.channels, size, size, generator=torch.Generator().manual_seed(1))
    x = x.to(device)
    window, stride = (args.window, args.window), (args.stride, args.stride)
    starts = window_starts(size, args.window, args.stride)
    windows = len(starts) ** 2
    total = windows * args.batch
    floor_batch = args.floor_batch or default_batch_size(x)
    floor = floors.occlusion_floor(model, x, total, floor_batch, window, stride)

    def ours() -> torch.Tensor:
        return occlusion(model, x, window=window, stride=stride, incremental=True)

    with torch.inference_mode():
        grid = [(i, j) for i in starts for j in starts]
        engine = inc.build(model, x, torch.zeros(()).expand_as(x), grid, window)
    work = engine.work if isinstance(engine, inc.Engine) else float("nan")
    log(f"{name} {size}² b{args.batch}: {windows} windows, {total} images; estimated work {work:.3f}")
    if args.sample:
        return sample_model(name, args, log, model, x, engine, (total, floor_batch, window, stride))
    timing = paired(ours, floor, device, repeats=args.repeats, warmup=args.warmup, budget=args.budget)
    speedups = [f / s for s, f in zip(timing.seconds, timing.floor, strict=True)]
    row = IncrementalRow(
        name, size, args.batch, windows, work, timing.median * 1e3, timing.floor_median * 1e3,
        statistics.median(speedups), min(speedups), max(speedups), len(speedups),
    )
    pairs = [(round(a, 2), round(b, 2)) for a, b in zip(timing.seconds, timing.floor, strict=True)]
    log(f"  pairs (ours s, floor s): {pairs}")
    if args.compare:
        fast = ours()
        began = time.perf_counter()
        naive = occlusion(model, x, window=window, stride=stride, incremental=False)
        row.naive_ms = (time.perf_counter() - began) * 1e3
        row.rel_diff = float((fast - naive).abs().max() / naive.abs().max())
        with torch.inference_mode():
            scale = model(x).abs().max()
        row.score_rel_diff = float((fast - naive).abs().max() / scale)
    if args.memory:
        row.peak_mb = peak_bytes(ours, device) / 2**20
        one_batch = floors.occlusion_floor(model, x, floor_batch, floor_batch, window, stride)
        row.floor_peak_mb = peak_bytes(one_batch, device) / 2**20
    log(format_row(row))
    return row


def sample_model(
    name: str, args: argparse.Namespace, log: Any, model: torch.nn.Module, x: torch.Tensor,
    engine: inc.Engine | str, plan: tuple[int, int, tuple[int, int], tuple[int, int]],
) -> IncrementalRow:
    """``--sample``: time one chunk of windows against the floor over as many images, interleaved,
    and project both whole calls. Every chunk of the same size costs the same (each layer's patch
    size is fixed for all windows), so a whole call is the engine's build (trace, clean run, plan;
    timed) plus its chunks; the floor is ``total / floor_batch`` batches."""
    assert isinstance(engine, inc.Engine), engine
    total, floor_batch, window, stride = plan
    device = x.device
    default = list(inc.chunks(engine, total, default_batch_size(x)))
    size = min(args.sample_size, default[0][1])  # not above the chunks a call would use
    ranges = [(lo, min(lo + size, total)) for lo in range(0, total, size)]
    lo, hi = ranges[len(ranges) // 2]
    grid = [(i, j) for i in window_starts(x.shape[-2], window[0], stride[0])
            for j in window_starts(x.shape[-1], window[1], stride[1])]

    def build() -> object:
        with torch.inference_mode():
            return inc.build(model, x, torch.zeros(()).expand_as(x), grid, window)

    def chunk() -> object:
        with torch.inference_mode():
            return inc.occluded_logits(engine, lo, hi)

    floor = floors.occlusion_floor(model, x, hi - lo, floor_batch, window, stride)
    timing = paired(chunk, floor, device, repeats=args.repeats, warmup=args.warmup, budget=args.budget)
    built = paired(build, lambda: None, device, repeats=1, warmup=0).median
    ratios = [f / s for s, f in zip(timing.seconds, timing.floor, strict=True)]
    ours_ms = (built + len(ranges) * timing.median) * 1e3
    floor_ms = timing.floor_median * total / (hi - lo) * 1e3
    row = IncrementalRow(
        name, x.shape[-1], x.shape[0], len(grid), engine.work, ours_ms, floor_ms, floor_ms / ours_ms,
        min(ratios), max(ratios), len(ratios),
    )
    pairs = [(round(a, 2), round(b, 2)) for a, b in zip(timing.seconds, timing.floor, strict=True)]
    log(f"  sampled chunk {lo}..{hi} of {total} ({len(ranges)} chunks); pairs (chunk s, floor s): {pairs}; "
        f"build {built:.2f} s; per-chunk speed-up median {statistics.median(ratios):.2f}")
    if args.memory:
        row.peak_mb = peak_bytes(chunk, device) / 2**20
        one_batch = floors.occlusion_floor(model, x, floor_batch, floor_batch, window, stride)
        row.floor_peak_mb = peak_bytes(one_batch, device) / 2**20
    log(format_row(row))
    return row


def format_row(row: IncrementalRow) -> str:
    def num(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    return (
        f"{row.model:<9} {row.size:>4}² b{row.batch:<3} {row.windows:>5} win  work {row.work:.2f}  "
        f"ours {row.ms:10.1f} ms  floor {row.floor_ms:10.1f} ms  speed-up {row.speedup:.2f}× "
        f"(min {row.min_speedup:.2f}, max {row.max_speedup:.2f}, {row.repeats} pairs)  "
        f"naive {num(row.naive_ms, '.1f')} ms  rel Δ {num(row.rel_diff, '.1e')} "
        f"(of logits {num(row.score_rel_diff, '.1e')})  "
        f"peak MB {num(row.peak_mb, '.0f')} vs floor batch {num(row.floor_peak_mb, '.0f')}"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.incremental", description=__doc__)
    parser.add_argument(
        "--models", nargs="+", choices=sorted(MODELS), default=["resnet18", "vgg16", "resnet50"]
    )
    parser.add_argument("--size", type=int, help="input size (default: the model's own)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--floor-batch", type=int, help="images per floor forward (default: occlusion's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--budget", type=float, default=float("inf"), help="seconds per model after 3 pairs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--no-compare", dest="compare", action="store_false",
                        help="skip the naive map (one naive occlusion call per model, timed once)")
    parser.add_argument("--memory", action="store_true", help="peak memory (one more incremental call)")
    parser.add_argument("--sample", action="store_true",
                        help="time one chunk against the floor on as many images and project both calls")
    parser.add_argument("--sample-size", type=int, default=64, help="windows in the sampled chunk")
    parser.add_argument("--json", help="write the rows and the machine here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("torchvis").setLevel(logging.WARNING)

    def log(line: str) -> None:
        print(line, flush=True)

    meta = machine(sys.argv[1:] if argv is None else argv, "wall")
    meta["command"] = meta["command"].replace("benchmarks.attribution", "benchmarks.incremental")
    log(f"# {meta['command']}\n# {meta['date']}  torch {meta['torch']}  {meta['cpu']}  "
        f"{meta['threads']} threads")
    rows = [run_model(name, args, log) for name in args.models]
    result = {"meta": meta, "rows": [asdict(row) for row in rows]}
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)
    return result


if __name__ == "__main__":
    main()
