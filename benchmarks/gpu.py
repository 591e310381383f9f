"""One prepared GPU run: every method on the benchmark models, timed with CUDA events, into RESULTS.md.

    bash benchmarks/gpu.sh                      # on a CUDA machine: < 8 minutes, appends to RESULTS.md
    bash benchmarks/gpu.sh --dry-run --results /tmp/R.md   # on the CPU: tiny sizes, 2 iterations

Grid: resnet18, resnet50, vgg16 and ViT-B/16 at batch 1 and 64; fp32, bf16 autocast, and bf16 with
the model and input in channels-last; every registered method (``torchvis.METHODS``)
and ``explain``; occlusion both naive and incremental; then the Monitor's logging step on the digits
CNN. Each cell: median of ``--repeats`` calls after one warm-up, timed by ``benchmarks.timing``
(CUDA events, the host waiting only after the end event), and the peak of
``torch.cuda.max_memory_allocated`` above what was live before. A method that cannot run on a model
is recorded as ``n/a (reason)``, never a crash; cells left
when the wall budget runs out are ``n/a (time budget)``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.timing import peak_bytes, synchronize, time_once

RESULTS = Path(__file__).with_name("RESULTS.md")


@dataclass(frozen=True)
class GpuModel:
    """A model to build (random weights), its input size, its Grad-CAM layer and how that layer's
    output reads as a feature map (``reshape``: ``"auto"`` for a ViT's tokens)."""

    build: Callable[[], nn.Module]
    size: int
    layer: str
    reshape: str | None = None


def _torchvision(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kwargs)

    return build


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )


def _tiny_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16
    )


FULL: dict[str, GpuModel] = {
    "resnet18": GpuModel(_torchvision("resnet18"), 224, "layer4"),
    "resnet50": GpuModel(_torchvision("resnet50"), 224, "layer4"),
    "vgg16": GpuModel(_torchvision("vgg16"), 224, "features.29"),
    "vit_b_16": GpuModel(_torchvision("vit_b_16"), 224, "encoder.layers.encoder_layer_11.ln_1", "auto"),
}
# The dry run: the same code paths on models small enough for the CPU in seconds.
DRY: dict[str, GpuModel] = {
    "cnn_tiny": GpuModel(_tiny_cnn, 32, "4"),
    "vit_tiny": GpuModel(_tiny_vit, 32, "encoder.layers.encoder_layer_0.ln_1", "auto"),
}
PRECISIONS = (
    ("fp32", None, False),
    ("bf16", torch.bfloat16, False),
    ("bf16 channels-last", torch.bfloat16, True),
)


@dataclass
class Cell:
    model: str
    batch: int
    precision: str
    method: str
    ms: float | None = None
    peak_mb: float | None = None
    note: str = ""


def method_runs(
    model: nn.Module, x: Tensor, layer: str, window: int, stride: int, reshape: str | None = None
) -> dict[str, Callable[[], object]]:
    """Every registered method (options it needs filled in), explain, and occlusion naive/incremental."""
    from torchvis.methods import METHODS, SPECS, explain

    def options(name: str) -> dict[str, Any]:
        """What each registered method needs, from its spec: the layer, occlusion's window."""
        spec = SPECS[name]
        kw: dict[str, Any] = {"layer": layer} if spec.takes_layer else {}
        if reshape is not None and "reshape" in spec.options:
            kw["reshape"] = reshape
        if "window" in spec.options:
            kw.update(window=window, stride=stride)
        if "incremental" in spec.options:
            kw["incremental"] = True
        return kw

    def call(method: Callable[..., Tensor], kw: dict[str, Any]) -> Callable[[], object]:
        return lambda: method(model, x, **kw)

    runs: dict[str, Callable[[], object]] = {}
    for name, method in METHODS.items():
        label = "occlusion incremental" if name == "occlusion" else name
        runs[label] = call(method, options(name))
    runs["occlusion naive"] = lambda: METHODS["occlusion"](
        model, x, window=window, stride=stride, incremental=False
    )
    shape = {} if reshape is None else {"reshape": reshape}
    runs["explain saliency+grad_cam"] = lambda: explain(
        model, x, methods=["saliency", "grad_cam"], layer=layer, **shape
    )
    return runs


def measure(run: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float | None]:
    """Median milliseconds over ``repeats`` calls after one warm-up, and peak MB (CUDA only)."""
    run()
    synchronize(device)
    seconds = [time_once(run, device) for _ in range(repeats)]
    peak = peak_bytes(run, device) / 2**20 if device.type == "cuda" else None
    return statistics.median(seconds) * 1e3, peak


def _autocast(
    dtype: torch.dtype | None, device: torch.device, run: Callable[[], object]
) -> Callable[[], object]:
    if dtype is None:
        return run

    def under() -> object:
        with torch.autocast(device.type, dtype=dtype):
            return run()

    return under


def run_grid(args: argparse.Namespace, device: torch.device, log: Callable[[str], None]) -> list[Cell]:
    models = DRY if args.dry_run else FULL
    chosen = {name: spec for name, spec in models.items() if not args.models or name in args.models}
    deadline = time.monotonic() + args.budget
    cells: list[Cell] = []
    for name, spec in chosen.items():
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            base = spec.build().eval().to(device)
        for batch in args.batch:
            generator = torch.Generator().manual_seed(1)
            x0 = torch.randn(batch, 3, spec.size, spec.size, generator=generator).to(device)
            for precision, dtype, channels_last in PRECISIONS:
                model, x = base, x0
                if channels_last:
                    model = base.to(memory_format=torch.channels_last)
                    x = x0.contiguous(memory_format=torch.channels_last)
                # Occlusion at batch 64 runs 64 images per window: a coarser grid keeps it in budget.
                window, stride = (16, 8) if batch == 1 else (spec.size // 4, spec.size // 8)
                if args.dry_run:
                    window, stride = 16, 8
                for method, run in method_runs(model, x, spec.layer, window, stride, spec.reshape).items():
                    cell = Cell(name, batch, precision, method)
                    if time.monotonic() > deadline:
                        cell.note = "n/a (time budget)"
                    else:
                        occluding = method.startswith("occlusion")
                        repeats = max(1, args.repeats // 2) if occluding else args.repeats
                        try:
                            cell.ms, cell.peak_mb = measure(_autocast(dtype, device, run), device, repeats)
                        except Exception as error:  # a method that cannot run on this model is a cell
                            cell.note = f"n/a ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
                    cells.append(cell)
                    log(format_cell(cell))
                if channels_last:
                    base = base.to(memory_format=torch.contiguous_format)
        del base
    cells += monitor_cells(args, device, deadline, log)
    return cells


def monitor_cells(
    args: argparse.Namespace, device: torch.device, deadline: float, log: Callable[[str], None]
) -> list[Cell]:
    """The Monitor's logging and non-logging step on a digits training step (benchmarks.training)."""
    from benchmarks.training import measure_training

    if time.monotonic() > deadline:
        return [Cell("digits training", 64, "fp32", "Monitor", note="n/a (time budget)")]
    try:
        small = {"batch": 8, "probe": 2} if args.dry_run else {}
        results = measure_training(device, repeats=args.repeats * 4, warmup=1, **small)
    except Exception as error:
        return [Cell("digits training", 64, "fp32", "Monitor", note=f"n/a ({type(error).__name__}: {error})")]
    cells = []
    for result in results:
        cell = Cell("digits training", result.batch, "fp32", result.name, ms=result.timing.median * 1e3)
        cell.note = f"{result.timing.ratio:.3f}× a plain train step"
        cells.append(cell)
        log(format_cell(cell))
    return cells


def format_cell(cell: Cell) -> str:
    ms = "-" if cell.ms is None else f"{cell.ms:.3f}"
    peak = "-" if cell.peak_mb is None else f"{cell.peak_mb:.0f}"
    return f"| {cell.model} | {cell.batch} | {cell.precision} | {cell.method} | {ms} | {peak} | {cell.note} |"


def section(cells: Sequence[Cell], device: torch.device, args: argparse.Namespace, wall: float) -> str:
    """A dated Markdown section for RESULTS.md."""
    card = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU dry run ({platform.machine()})"
    )
    clock = "CUDA-event timing" if device.type == "cuda" else "host clock, one thread"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "bash benchmarks/gpu.sh " + " ".join(args.argv)
    lines = [
        f"## GPU run: {card}, {now}",
        "",
        f"- Command: `{command.strip()}`; wall {wall:.0f} s; torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}; median of {args.repeats} calls after one warm-up (occlusion: "
        f"{max(1, args.repeats // 2)}), {clock}; peak = `torch.cuda.max_memory_allocated` above the "
        "memory live before the call.",
        "- Occlusion: window 16 stride 8 at batch 1, window size/4 stride size/8 at batch 64.",
        "",
        "| model | batch | precision | method | ms | peak MB | note |",
        "|---|---|---|---|---|---|---|",
        *[format_cell(cell) for cell in cells],
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bash benchmarks/gpu.sh", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models, 2 calls per cell")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file to append to")
    parser.add_argument("--models", nargs="+", help="a subset of the models")
    parser.add_argument("--batch", nargs="+", type=int, help="batch sizes (default 1 64; dry run 1 2)")
    parser.add_argument("--repeats", type=int, help="timed calls per cell (default 5; dry run 1)")
    parser.add_argument("--budget", type=float, help="wall seconds before the remaining cells are skipped")
    args = parser.parse_args(argv)
    args.batch = args.batch or ([1, 2] if args.dry_run else [1, 64])
    args.repeats = args.repeats or (1 if args.dry_run else 5)
    args.budget = args.budget or (60.0 if args.dry_run else 400.0)
    args.argv = list(argv) if argv is not None else []
    return args


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    threads = torch.get_num_threads()
    if args.dry_run:
        torch.set_num_threads(1)  # tiny tensors: a thread pool only adds waiting
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run for the CPU rehearsal")
    began = time.monotonic()
    cells = run_grid(args, device, lambda line: print(line, flush=True))
    text = section(cells, device, args, time.monotonic() - began)
    torch.set_num_threads(threads)
    with open(args.results, "a") as out:
        out.write("\n" + text)
    print(f"appended to {args.results}")
    return text


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
