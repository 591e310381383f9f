"""Time every attribution method against its floor and its peers, in one run.

    python -m benchmarks.attribution                       # quick preset, a few minutes on 2 cores
    python -m benchmarks.attribution --preset targets --json targets.json
    python -m benchmarks.attribution --models resnet50 vgg16 --batch 1 64 --device cuda --amp bf16

Each row times a method and its floor interleaved (see :mod:`benchmarks.timing`) and reports the
median time, the median of the paired ratios, images per second and peak tensor memory. Peers
(Captum, pytorch-grad-cam, torchcam) run beside our methods when installed, with the largest
difference between their maps and ours.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import platform
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks import floors
from benchmarks.peers import PEERS, PeerCase, PeerRun, Skip, max_difference
from benchmarks.timing import Run, Timing, paired, peak_bytes
from benchmarks.training import measure_training
from torchvis.core.hooks import resolve_layer
from torchvis.methods.cam import grad_cam, guided_grad_cam
from torchvis.methods.combine import explain
from torchvis.methods.gradient import guided_backprop, saliency
from torchvis.methods.perturbation import default_batch_size, occlusion, window_starts

METHODS = ("saliency", "guided_backprop", "grad_cam", "guided_grad_cam", "explain", "occlusion")


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: how to build it (random weights), its input, and its Grad-CAM layers (the
    first is the Grad-CAM layer, both go to ``explain``)."""

    build: Callable[[], nn.Module]
    channels: int
    size: int
    layers: tuple[str, str]


def _digits() -> nn.Module:
    from torchvis.apps.digits import DigitsCNN

    return DigitsCNN()


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None)

    return build


MODELS: dict[str, ModelSpec] = {
    "digits": ModelSpec(_digits, 1, 28, ("conv2", "conv1")),
    "resnet18": ModelSpec(_torchvision("resnet18"), 3, 224, ("layer4", "layer3")),
    "resnet50": ModelSpec(_torchvision("resnet50"), 3, 224, ("layer4", "layer3")),
    "vgg16": ModelSpec(_torchvision("vgg16"), 3, 224, ("features.29", "features.22")),
}


@dataclass(frozen=True)
class Case:
    """One model at one input size and batch size, and the methods to time on it."""

    model: str
    batch: int
    size: int | None = None  # None: the model's own input size
    methods: tuple[str, ...] = METHODS


PRESETS: dict[str, tuple[Case, ...]] = {
    "quick": (Case("digits", 1), Case("digits", 16), Case("resnet18", 1)),
    # resnet18 at batch 64 pushes 3,136 occluded images per call: at 224² that is a minute a call on
    # 2 cores, at 64² (the same 49 windows per image) a few seconds.
    "targets": (
        Case("resnet18", 1),
        Case("resnet18", 64, 64, ("occlusion",)),
        Case("digits", 1),
        Case("digits", 64),
    ),
    "full": tuple(Case(m, b) for m in MODELS for b in (1, 64)),
}


@dataclass
class Row:
    """One line of the table (and one record of the JSON)."""

    model: str
    size: int
    batch: int
    device: str
    name: str
    floor: str
    ms: float | None = None
    floor_ms: float | None = None
    ratio: float | None = None
    min_ratio: float | None = None  # the spread of the paired ratios
    max_ratio: float | None = None
    images_per_s: float | None = None
    peak_mb: float | None = None
    floor_peak_mb: float | None = None
    max_diff: float | None = None
    rel_diff: float | None = None
    repeats: int = 0
    call_us: float | None = None  # the Monitor rows: one non-logging Monitor.step call alone
    note: str = ""

    def take(self, timing: Timing) -> None:
        """Fill the timed fields from ``timing``: medians, the median ratio and its spread, the
        throughput and the number of pairs."""
        self.ms, self.floor_ms, self.ratio = timing.median * 1e3, timing.floor_median * 1e3, timing.ratio
        self.min_ratio, self.max_ratio = min(timing.ratios), max(timing.ratios)
        self.images_per_s, self.repeats = self.batch / timing.median, len(timing.seconds)


@dataclass(frozen=True)
class Settings:
    """How every row is measured."""

    device: torch.device
    repeats: int = 10
    warmup: int = 1
    budget: float = 20.0
    memory: bool = True
    peers: bool = True
    amp: torch.dtype | None = None
    channels_last: bool = False
    window: int | None = None
    stride: int | None = None
    max_images: int = 256
    batch_candidates: tuple[int, ...] = (8, 16, 32, 64, 128)
    layer_none: bool = True
    cpu_clock: bool = False
    training_repeats: int = 100
    log: Callable[[str], None] = field(default=lambda line: None)


@dataclass(frozen=True)
class Inputs:
    """A built model and batch, and what the rows share."""

    model: nn.Module
    x: Tensor
    target: Tensor
    layers: tuple[str, str]
    window: tuple[int, int]
    stride: tuple[int, int]


@dataclass(frozen=True)
class OcclusionPlan:
    """The occlusion floor of a case: ``total`` occluded images in batches of ``best``."""

    windows: int
    total: int
    best: int
    floor: Run

    @property
    def label(self) -> str:
        return f"{self.total} fwd images, batch {self.best}"


def plan_occlusion(inputs: Inputs, settings: Settings) -> OcclusionPlan:
    """Count the windows and pick the floor's batch size (the fastest candidate, timed now)."""
    model, x, window, stride = inputs.model, inputs.x, inputs.window, inputs.stride
    height, width = x.shape[-2:]
    windows = len(window_starts(height, window[0], stride[0])) * len(
        window_starts(width, window[1], stride[1])
    )
    total = windows * x.shape[0]
    candidates = [c for c in settings.batch_candidates if c <= settings.max_images] or [1]
    best, throughput = floors.best_batch(model, x, total, window, stride, candidates)
    settings.log(
        f"  occlusion floor: {total} images; images/s by batch size: "
        + ", ".join(f"{b}: {v:.1f}" for b, v in throughput.items())
        + f" -> {best}"
    )
    floor = _autocast(settings, floors.occlusion_floor(model, x, total, best, window, stride))
    return OcclusionPlan(windows, total, best, floor)


def seeded_model(name: str) -> nn.Module:
    """``MODELS[name]`` with weights drawn from seed 0, without moving the caller's global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return MODELS[name].build().eval()


def make_inputs(case: Case, settings: Settings) -> Inputs:
    spec = MODELS[case.model]
    size = case.size or spec.size
    model = seeded_model(case.model).to(settings.device)
    x = torch.randn(case.batch, spec.channels, size, size, generator=torch.Generator().manual_seed(1))
    x = x.to(settings.device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        target = model(x).argmax(dim=1)
    window = settings.window or max(1, size // 4)
    stride = settings.stride or max(1, window // 2)
    return Inputs(model, x, target.clone(), spec.layers, (window, window), (stride, stride))


def _autocast(settings: Settings, run: Run) -> Run:
    """``run`` under ``torch.autocast`` when ``--amp`` asks for it (occlusion rows only)."""
    if settings.amp is None:
        return run
    device_type, dtype = settings.device.type, settings.amp

    def under() -> object:
        with torch.autocast(device_type, dtype=dtype):
            return run()

    return under


def measure(row: Row, run: Run, floor: Run, settings: Settings) -> Row:
    """Fill ``row`` with the paired timing of ``run`` against ``floor`` and their peak memory."""
    timing: Timing = paired(
        run,
        floor,
        settings.device,
        repeats=settings.repeats,
        warmup=settings.warmup,
        budget=settings.budget,
        cpu_clock=settings.cpu_clock,
    )
    row.take(timing)
    if settings.memory:
        row.peak_mb = peak_bytes(run, settings.device) / 2**20
        row.floor_peak_mb = peak_bytes(floor, settings.device) / 2**20
    return row


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # layer=None warns on every call by design; the table says which layer it took.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def method_rows(
    case: Case, inputs: Inputs, settings: Settings, plan: Callable[[], OcclusionPlan]
) -> Iterator[tuple[Row, Run, Run]]:
    """Our methods and their floors, as (row, run, floor) triples, lazily (each builds its floor)."""
    model, x, (layer, second), device = inputs.model, inputs.x, inputs.layers, settings.device
    module = resolve_layer(model, layer)[1]
    size = x.shape[-1]

    def row(name: str, floor: str, note: str = "") -> Row:
        return Row(case.model, size, case.batch, device.type, name, floor, note=note)

    to_input = floors.input_floor(model, x)
    to_layer = floors.layer_floor(model, x, module)
    if "saliency" in case.methods:
        yield row("saliency", "fwd+bwd to input"), lambda: saliency(model, x), to_input
    if "guided_backprop" in case.methods:
        yield row("guided_backprop", "fwd+bwd to input"), lambda: guided_backprop(model, x), to_input
    if "grad_cam" in case.methods:
        explicit = row(f"grad_cam layer={layer}", "fwd+bwd to layer")
        yield explicit, lambda: grad_cam(model, x, layer=layer), to_layer
        if settings.layer_none:
            yield row("grad_cam layer=None", "fwd+bwd to layer"), lambda: grad_cam(model, x), to_layer
    if "guided_grad_cam" in case.methods:
        yield (
            row(f"guided_grad_cam layer={layer}", "to layer + to input"),
            lambda: guided_grad_cam(model, x, layer=layer),
            floors.both_floors(model, x, module),
        )
    if "explain" in case.methods:

        def one_saliency() -> Tensor:
            return saliency(model, x)

        yield (
            row(f"explain saliency+grad_cam@{layer},{second}", "saliency call"),
            lambda: explain(model, x, methods=["saliency", "grad_cam"], layer=[layer, second]),
            one_saliency,
        )

        def separately() -> tuple[Tensor, ...]:
            return saliency(model, x), grad_cam(model, x, layer=layer), grad_cam(model, x, layer=second)

        yield row("the three called separately", "saliency call"), separately, one_saliency
    if "occlusion" in case.methods:
        yield from occlusion_rows(inputs, plan(), settings, row)


def occlusion_rows(
    inputs: Inputs, plan: OcclusionPlan, settings: Settings, row: Callable[..., Row]
) -> Iterator[tuple[Row, Run, Run]]:
    """Our occlusion with its default batch size, and with the floor's if that differs."""
    model, x, window, stride = inputs.model, inputs.x, inputs.window, inputs.stride
    default = default_batch_size(x)
    what = f"window {window[0]} stride {stride[0]}, {plan.windows} windows"
    for batch_size in dict.fromkeys((default, plan.best)):

        def run(batch_size: int | None = None if batch_size == default else batch_size) -> Tensor:
            return occlusion(model, x, window=window, stride=stride, batch_size=batch_size)

        name = "occlusion" if batch_size == default else f"occlusion batch_size={batch_size}"
        note = f"{what}; default batch_size {default}" if batch_size == default else what
        yield row(name, plan.label, note), _autocast(settings, run), plan.floor


def peer_rows(
    case: Case, inputs: Inputs, settings: Settings, plan: Callable[[], OcclusionPlan]
) -> Iterator[tuple[Row, Run, Run, PeerRun | None]]:
    """Peer rows for the methods of ``case``: (row, run, floor, the built peer or None if it is not)."""
    model, x, (layer, _), device = inputs.model, inputs.x, inputs.layers, settings.device
    module = resolve_layer(model, layer)[1]
    peer_case = PeerCase(model, x, inputs.target, layer, inputs.window, inputs.stride, settings.max_images)
    floor_of: dict[str, Callable[[], Run]] = {
        "input": lambda: floors.input_floor(model, x),
        "layer": lambda: floors.layer_floor(model, x, module),
        "both": lambda: floors.both_floors(model, x, module),
    }
    for peer in PEERS:
        if peer.method not in case.methods:
            continue
        row = Row(case.model, x.shape[-1], case.batch, device.type, peer.name, "")
        try:
            built = peer.build(peer_case)
        except ImportError as error:
            row.note = f"not installed ({error.name})"
            yield row, _nothing, _nothing, None
            continue
        except Skip as skip:
            row.note = f"skipped: {skip}"
            yield row, _nothing, _nothing, None
            continue
        except Exception as error:  # a broken peer must not stop the run
            row.note = f"error: {type(error).__name__}: {error}"
            yield row, _nothing, _nothing, None
            continue
        if peer.floor == "occlusion":
            row.floor = plan().label
            yield row, _autocast(settings, built.run), plan().floor, built
        else:
            row.floor = FLOOR_LABELS[peer.floor]
            yield row, built.run, floor_of[peer.floor](), built


FLOOR_LABELS = {"input": "fwd+bwd to input", "layer": "fwd+bwd to layer", "both": "to layer + to input"}


def _nothing() -> None:
    return None


def run_case(case: Case, settings: Settings) -> list[Row]:
    """Every row of one case: our methods, then the peers."""
    inputs = make_inputs(case, settings)
    rows: list[Row] = []
    settings.log(f"{case.model} {inputs.x.shape[-1]}² batch {case.batch} on {settings.device}")
    plan = functools.cache(lambda: plan_occlusion(inputs, settings))
    with _quiet():
        for row, run, floor in method_rows(case, inputs, settings, plan):
            rows.append(_guarded_measure(row, run, floor, settings))
        if settings.peers:
            for row, run, floor, built in peer_rows(case, inputs, settings, plan):
                if built is not None:
                    _guarded_measure(row, run, floor, settings)
                    if not row.note:
                        try:
                            row.max_diff, row.rel_diff = max_difference(built)
                        except Exception as error:
                            row.note = f"error comparing maps: {type(error).__name__}: {error}"
                rows.append(row)
                settings.log(format_row(row))
    return rows


def _guarded_measure(row: Row, run: Run, floor: Run, settings: Settings) -> Row:
    try:
        measure(row, run, floor, settings)
    except Exception as error:  # one failing row (a peer, an out-of-memory) must not stop the run
        row.note = f"error: {type(error).__name__}: {error}"
    if not row.name.startswith(("captum", "pytorch-grad-cam", "torchcam")):
        settings.log(format_row(row))
    return row


def training_rows(settings: Settings) -> list[Row]:
    """The monitor's overhead on a digits training step (a row says so if the monitor is missing)."""
    rows = []
    try:
        results = measure_training(
            settings.device,
            repeats=settings.training_repeats,
            warmup=settings.warmup,
            budget=settings.budget,
            cpu_clock=settings.cpu_clock,
        )
    except Exception as error:  # the monitor is young; a failure is a row, not the end of the run
        row = Row("digits training", 28, 64, settings.device.type, "Monitor", "train step")
        row.note = f"error: {type(error).__name__}: {error}"
        settings.log(format_row(row))
        return [row]
    for result in results:
        row = Row("digits training", 28, result.batch, settings.device.type, result.name, "train step")
        timing = result.timing
        row.take(timing)
        if result.call_us is not None:
            row.call_us = result.call_us
            what = "the weight snapshot" if "background" in result.name else "Monitor.step alone"
            row.note = f"{what}: {result.call_us:.2f} µs a call"
        settings.log(format_row(row))
        rows.append(row)
    return rows


# --- output --------------------------------------------------------------------------------------

HEADER = (
    f"{'method':<44} {'ms':>9} {'floor ms':>9} {'×floor':>7} {'spread':>13} {'n':>3} {'img/s':>8} "
    f"{'peak MB':>8} {'floor MB':>8} {'max|Δ|':>8} {'rel Δ':>8}  floor / note"
)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_row(row: Row) -> str:
    tail = "; ".join(part for part in (row.floor, row.note) if part)
    spread = "-" if row.min_ratio is None else f"{row.min_ratio:.3f}-{row.max_ratio:.3f}"
    return (
        f"{row.name:<44} {_num(row.ms, '9.2f')} {_num(row.floor_ms, '9.2f')} {_num(row.ratio, '7.3f')} "
        f"{spread:>13} {row.repeats or '-':>3} {_num(row.images_per_s, '8.1f')} "
        f"{_num(row.peak_mb, '8.1f')} {_num(row.floor_peak_mb, '8.1f')} "
        f"{_num(row.max_diff, '8.1e')} {_num(row.rel_diff, '8.1e')}  {tail}"
    )


def format_table(rows: Sequence[Row]) -> str:
    """The rows grouped by model, size, batch and device, one header per group."""
    lines: list[str] = []
    group: tuple[Any, ...] | None = None
    for row in rows:
        key = (row.model, row.size, row.batch, row.device)
        if key != group:
            group = key
            lines += ["", f"## {row.model} {row.size}² batch {row.batch} on {row.device}", HEADER]
        lines.append(format_row(row))
    return "\n".join(lines[1:])


TARGETS = (
    ("train step + Monitor.step, not logging", None, 1.01),
    ("train step + Monitor.step, logging, background", None, 1.05),
    ("saliency", None, 1.05),
    ("guided_backprop", None, 1.05),
    ("grad_cam layer=", "grad_cam layer=None", 1.05),
    ("explain", None, 1.15),
    ("occlusion", None, 1.10),
)


def check_targets(rows: Sequence[Row]) -> list[str]:
    """One line per measured row that has a target: the ratio, the limit, and whether it holds."""
    lines = []
    for row in rows:
        for prefix, exclude, limit in TARGETS:
            if row.ratio is None or not row.name.startswith(prefix) or row.name == exclude:
                continue
            if row.name.startswith("occlusion batch_size"):
                continue
            verdict = "holds" if row.ratio <= limit else "MISSED"
            line = f"{row.model} {row.size}² b{row.batch} {row.name}: {row.ratio:.3f} (≤ {limit}) {verdict}"
            if prefix == "occlusion":
                line += _against_captum(row, rows)
            if row.call_us is not None and row.floor_ms:
                share = row.call_us / (row.floor_ms * 1e3)
                line += f"; the call alone costs {row.call_us:.2f} µs, {share:.1e} of a step"
            lines.append(line)
    return lines


def _against_captum(ours: Row, rows: Sequence[Row]) -> str:
    captum = [
        r for r in rows
        if r.name.startswith("captum Occlusion") and r.ratio is not None
        and (r.model, r.size, r.batch, r.device) == (ours.model, ours.size, ours.batch, ours.device)
    ]
    if not captum or ours.ratio is None:
        return "; Captum not measured"
    best = min(captum, key=lambda r: r.ratio or 0.0)
    faster = "faster" if ours.ratio < (best.ratio or 0.0) else "NOT faster"
    return f"; {faster} than Captum's best ({best.name}: {best.ratio:.3f})"


def machine(argv: Sequence[str], clock: str) -> dict[str, Any]:
    """What the figures were measured on, and the command that measured them."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "clock": clock,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "command": " ".join(["python -m benchmarks.attribution", *argv]),
    }


# --- command line ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.attribution", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="which cases")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="replace the preset's models")
    parser.add_argument("--batch", nargs="+", type=int, help="batch sizes (with --models; default 1)")
    parser.add_argument("--size", type=int, help="input size (default: the model's own, 28 or 224)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=10, help="paired repeats per row (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per row after 3 repeats")
    parser.add_argument("--window", type=int, help="occlusion window (default: size // 4)")
    parser.add_argument("--stride", type=int, help="occlusion stride (default: window // 2)")
    parser.add_argument("--max-images", type=int, default=256, help="cap on images per forward pass")
    parser.add_argument("--amp", choices=["bf16", "fp16"], help="occlusion under torch.autocast")
    parser.add_argument("--channels-last", action="store_true", help="model and input in channels_last")
    parser.add_argument("--no-peers", action="store_true", help="skip Captum, pytorch-grad-cam, torchcam")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--no-layer-none", action="store_true", help="skip the grad_cam layer=None row")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="cpu: process CPU time, for a shared machine (with --threads 1)",
    )
    parser.add_argument(
        "--training", action=argparse.BooleanOptionalAction,
        help="time the monitor on a training step (default: with a preset, not with --models)",
    )
    parser.add_argument("--training-repeats", type=int, default=100, help="paired train-step repeats")
    parser.add_argument("--json", help="also write the rows and the machine to this file")
    return parser.parse_args(argv)


def cases_from(args: argparse.Namespace) -> list[Case]:
    methods = tuple(args.methods)
    if args.models:
        return [Case(m, b, args.size, methods) for m in args.models for b in (args.batch or [1])]
    chosen = []
    for case in PRESETS[args.preset]:
        kept = tuple(m for m in case.methods if m in methods)
        if kept and (not args.batch or case.batch in args.batch):
            chosen.append(replace(case, size=args.size or case.size, methods=kept))
    return chosen


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings = Settings(
        device=device,
        repeats=args.repeats,
        warmup=args.warmup,
        budget=args.budget,
        memory=not args.no_memory,
        peers=not args.no_peers,
        amp={"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.amp],
        channels_last=args.channels_last,
        window=args.window,
        stride=args.stride,
        max_images=args.max_images,
        batch_candidates=(8, 16, 32, 64, 128) if device.type == "cpu" else (16, 32, 64, 128, 256, 512),
        layer_none=not args.no_layer_none,
        cpu_clock=args.clock == "cpu",
        training_repeats=args.training_repeats,
        log=lambda line: print(line, flush=True),
    )
    meta = machine(sys.argv[1:] if argv is None else argv, args.clock)
    print(f"# {meta['command']}\n# {meta['date']}  torch {meta['torch']}  {meta['cpu']}  "
          f"{meta['threads']} threads  {args.clock} clock  device {device}", flush=True)
    rows = [row for case in cases_from(args) for row in run_case(case, settings)]
    if args.training or (args.training is None and not args.models):
        settings.log("training step with and without the monitor")
        rows += training_rows(settings)
    print("\n" + format_table(rows))
    targets = check_targets(rows)
    if targets:
        print("\nTargets:\n" + "\n".join(targets))
    result = {"meta": meta, "rows": [asdict(row) for row in rows], "targets": targets}
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)
    return result


if __name__ == "__main__":
    main()
