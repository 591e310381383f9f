"""``torchvis explain``: explain image files with every method, one tutorial figure per image.

Everything is checked before anything is written: the options, the model and its weights, every
input image (decoded in full), the Grad-CAM layer and the target class (by running the model once on
a blank input). Then each figure is written to a temporary name and renamed, so a crash never leaves
a truncated PNG, and ``index.csv`` (file, predicted class, score, figure) is written last.

Launched under ``torchrun --nproc_per_node=N`` (``WORLD_SIZE > 1``), every rank takes
``sorted(files)[rank::N]`` on its own device (``cuda:LOCAL_RANK`` if there is CUDA, with the nccl
backend; else the CPU with gloo); ranks agree that every input is valid before any of them writes,
and rank 0 gathers the results and writes the index.

TorchScript models run outside Python, where no hook can reach: their guided backprop, Grad-CAM and
guided Grad-CAM panels read "n/a for TorchScript"; saliency and occlusion are computed as usual.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import io
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from torchvis.apps.files import check_output_folder, write_atomic
from torchvis.apps.loading import (
    ImageFile,
    InputError,
    LoadedModel,
    ModelKind,
    Preprocess,
    find_images,
    load_model,
    open_image,
    read_class_names,
    read_image,
)
from torchvis.apps.model_options import add_model_options, chosen_methods, import_plugin, preprocess_for
from torchvis.core.forward import checked_logits, guarded
from torchvis.core.passes import gradient_pass
from torchvis.methods.combine import explain
from torchvis.methods.spec import SPECS
from torchvis.rendering.figure import explanation_figure, figure_rgb
from torchvis.rendering.image import denormalize

# The classic five, one panel each: cheap enough for a figure per image. Any registered method can be
# asked for with --methods (SmoothGrad, integrated gradients and Score-CAM cost tens of passes each).
DEFAULT_METHODS = ("saliency", "guided_backprop", "grad_cam", "guided_grad_cam", "occlusion")
TORCHSCRIPT_NOTE = "n/a for TorchScript"
INDEX = "index.csv"
INDEX_COLUMNS = ("file", "predicted", "class", "score", "target", "figure")


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``torchvis explain``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  torchvis explain cat.jpg --model resnet18 --weights resnet18.pt\n"
        "  torchvis explain photos/ --model model.ts --size 224 --out figures --tensorboard runs/explain\n"
        "  torchvis explain digits/ --model digits.pt\n"
        "  torchrun --nproc_per_node=4 -m torchvis explain photos/ --model resnet50 --weights w.pt\n"
        "\nTorchScript models get no guided backprop or Grad-CAM panels (no hooks reach inside them)."
    )
    add_input_options(parser, out_default="explanations", out_help="the figures and index.csv")
    parser.add_argument("--tensorboard", metavar="DIR",
                        help="also log each figure to a TensorBoard run in DIR")


def add_input_options(parser: argparse.ArgumentParser, *, out_default: str, out_help: str) -> None:
    """The inputs, model, method and preprocessing options of ``torchvis explain``, which ``torchvis
    sanity`` shares; :func:`prepare` checks them all."""
    add = parser.add_argument
    add("inputs", nargs="+", metavar="INPUT", help="image files, or folders searched recursively for images")
    add_model_options(parser, default_methods=DEFAULT_METHODS)
    add("--target", type=int, metavar="N", help="class to explain (default: the predicted class)")
    add("--out", default=out_default, metavar="DIR",
        help=f"folder for {out_help} (default: {out_default})")
    add("--no-progress", action="store_true", help="no progress bar")


@dataclass(frozen=True)
class World:
    """This process's place in a ``torchrun`` launch (``size == 1`` when launched alone)."""

    rank: int
    size: int
    local_rank: int


@dataclass(frozen=True)
class Job:
    """What every rank checked before writing anything."""

    loaded: LoadedModel
    preprocess: Preprocess
    files: list[ImageFile]
    out: Path
    device: torch.device
    layer: str | None
    target: int | None
    window: int
    class_names: tuple[str, ...]
    methods: tuple[str, ...]


def run(args: argparse.Namespace) -> int:
    """Explain every input; 0 on success, 2 for bad input (nothing written), 1 if explaining failed."""
    world = World(
        rank=int(os.environ.get("RANK", 0)),
        size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )
    device = _device(args.device, world)
    if world.size > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        # A rank that finishes (or fails) early waits at the final gather for the slowest one; on a
        # folder of thousands of images that can exceed the default 10-30 minute collective timeout.
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=12)
        )
        try:
            return _run(args, world, device)
        finally:
            dist.destroy_process_group()
    return _run(args, world, device)


def _device(requested: str | None, world: World) -> torch.device:
    if requested is None:
        return torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise SystemExit(f"torchvis explain: error: --device {requested!r}: {err}") from err
    if device.type == "cuda" and device.index is None and world.size > 1:
        return torch.device("cuda", world.local_rank)
    return device


def _run(args: argparse.Namespace, world: World, device: torch.device) -> int:
    job: Job | None = None
    problem: tuple[int, str] | None = None
    try:
        job = _prepare(args, world, device)
    except InputError as err:
        problem = (2, str(err))
    except Exception as err:  # a bug or a broken device: every rank must still reach the gather
        traceback.print_exc()
        problem = (1, f"{type(err).__name__}: {err}")
    problems = [p for p in _gather(problem, world) if p is not None]
    if problems:
        _report([message for _, message in problems], world)
        return max(code for code, _ in problems)
    assert job is not None
    rows, failure = _explain_files(job, args, world)
    results = _gather((rows, failure), world)
    failures = [f for _, f in results if f is not None]
    if failures:
        _report(failures, world)
        return 1
    if world.rank == 0:
        everything = sorted((row for part, _ in results for row in part), key=lambda row: Path(row["file"]))
        write_atomic(job.out / INDEX, lambda fh: _write_index(fh, everything))
        n = len(everything)
        print(f"explained {n} image{'s' * (n != 1)} into {job.out}/ (index: {job.out / INDEX})")
    return 0


def _gather(obj: Any, world: World) -> list[Any]:
    if world.size == 1:
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, obj)
    return gathered


def _report(messages: Sequence[str], world: World) -> None:
    if world.rank == 0:
        lines = [line for message in messages for line in message.splitlines()]
        for line in dict.fromkeys(lines):  # every rank reports the same bad model once
            print(f"torchvis explain: error: {line}", file=sys.stderr)


# --- checking everything before writing anything ---------------------------------------------


def prepare(args: argparse.Namespace, device: torch.device) -> Job:
    """Check every option and input of one process (no ``torchrun``); ``InputError`` if one is bad.
    Writes nothing."""
    return _prepare(args, World(rank=0, size=1, local_rank=0), device)


def _prepare(args: argparse.Namespace, world: World, device: torch.device) -> Job:
    """Check everything; every problem found is reported at once (one :class:`InputError`, a line
    each), except those that need a model when the model itself could not be loaded."""
    out = Path(args.out)
    problems: list[str] = []

    def attempt(check: Callable[[], Any]) -> Any:
        try:
            return check()
        except InputError as err:
            problems.append(str(err))
            return None

    for plugin in args.imports:
        attempt(functools.partial(import_plugin, plugin))
    methods = attempt(lambda: chosen_methods(args.methods, DEFAULT_METHODS))
    attempt(lambda: check_output_folder(out, "--out"))
    if getattr(args, "tensorboard", None) is not None:
        attempt(lambda: check_output_folder(Path(args.tensorboard), "--tensorboard"))
    names_file = attempt(lambda: read_class_names(args.classes)) if args.classes is not None else None
    loaded = attempt(lambda: load_model(args.model, weights=args.weights, num_classes=args.num_classes,
                                        device=device))
    preprocess = attempt(lambda: preprocess_for(loaded, args)) if loaded is not None else None
    if loaded is not None and loaded.kind is ModelKind.TORCHSCRIPT and args.layer is not None:
        problems.append("--layer needs module hooks, which TorchScript models do not support")
    mine = attempt(lambda: _check_inputs(args.inputs, out, world, preprocess))
    if problems or loaded is None or preprocess is None or mine is None or methods is None:
        raise InputError("\n".join(problems))
    probe = torch.zeros(1, preprocess.channels, preprocess.size, preprocess.size, device=device)
    try:
        classes = _logits(loaded.model, probe).shape[1]
    except Exception as err:
        lines = str(err).strip().splitlines() or [""]
        raise InputError(
            f"the model cannot take a {list(probe.shape)} input (see --size, --mean, --std): "
            f"{type(err).__name__}: {lines[-1]}"
        ) from err
    if args.target is not None and not 0 <= args.target < classes:
        raise InputError(
            f"--target {args.target} is out of range: the model has {classes} classes (0..{classes - 1})"
        )
    if names_file is not None and len(names_file) != classes:
        raise InputError(
            f"--classes {args.classes!r} has {len(names_file)} names; the model has {classes} classes"
        )
    names = names_file or loaded.class_names
    if names is None or len(names) != classes:
        names = tuple(str(i) for i in range(classes))
    window = args.window if args.window is not None else max(1, preprocess.size // 7)
    if not 0 < window <= preprocess.size:
        raise InputError(f"--window {window} must be between 1 and the input size {preprocess.size}")
    layer = None if loaded.kind is ModelKind.TORCHSCRIPT else _check_layer(loaded.model, probe, args.layer)
    return Job(loaded, preprocess, mine, out, device, layer, args.target, window, names, methods)


def _check_inputs(
    inputs: Sequence[str], out: Path, world: World, preprocess: Preprocess | None
) -> list[ImageFile]:
    """This rank's input files, every one decoded (with ``preprocess``'s channels, when known); all
    unreadable files are listed in one error."""
    if any(Path(p).is_dir() and Path(p).resolve() == out.resolve() for p in inputs):
        raise InputError(f"--out {str(out)!r} is also an input folder; choose another output folder")
    files = find_images(inputs, exclude=out)
    paths = {f.path.resolve() for f in files}
    for target_path in [out / f.output for f in files] + [out / INDEX]:
        if target_path.resolve() in paths:
            raise InputError(f"writing {target_path} would overwrite an input; choose another --out")
    mine = files[world.rank :: world.size]
    bad = []
    for f in mine:
        try:
            open_image(f.path, preprocess.channels if preprocess is not None else 3)
        except InputError as err:
            bad.append(str(err))
    if bad:
        raise InputError("\n".join(bad))
    return mine


def _check_layer(model: nn.Module, probe: Tensor, layer: str | None) -> str:
    """The Grad-CAM layer's name (``None``: the last spatial one), checked on a blank input."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "layer=None: using ..." — we print our own note
            result = gradient_pass(model, probe, 0, layers=[layer])
    except (ValueError, TypeError, RuntimeError) as err:
        raise InputError(f"--layer: {err}") from err
    (name,) = result.layer_names
    shape = list(result.activations[name].shape)
    if len(shape) != 4:
        raise InputError(
            f"--layer {name!r} outputs {shape}; Grad-CAM needs a spatial feature map [B,K,h,w] "
            "(a convolution, its activation, or a pooling layer before flattening)"
        )
    return name


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    with guarded(model, x, grad=False), torch.no_grad():
        return checked_logits(model(x), x.shape[0])


# --- explaining and writing ---------------------------------------------------------------------


def _explain_files(
    job: Job, args: argparse.Namespace, world: World
) -> tuple[list[dict[str, Any]], str | None]:
    """Explain this rank's files; returns the index rows and the first failure (which stops the rank)."""
    if world.rank == 0 and job.layer is not None:
        print(f"torchvis explain: Grad-CAM at layer {job.layer!r}", file=sys.stderr)
    blind = [SPECS[m].title for m in job.methods if SPECS[m].needs_hooks]
    if world.rank == 0 and job.loaded.kind is ModelKind.TORCHSCRIPT and blind:
        print(
            f"torchvis explain: note: TorchScript model: {', '.join(blind)} need hooks that cannot reach "
            f"inside it; those panels read {TORCHSCRIPT_NOTE!r}",
            file=sys.stderr,
        )
    job.out.mkdir(parents=True, exist_ok=True)
    writer = None
    if args.tensorboard is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(args.tensorboard)
    rows: list[dict[str, Any]] = []
    progress = tqdm(job.files, desc="explain", unit="image", disable=args.no_progress or world.rank != 0)
    current = None
    try:
        for current in progress:
            rows.append(_explain_file(job, current, writer))
    except Exception as err:
        if not isinstance(err, InputError):
            traceback.print_exc()
        where = current.path if current is not None else "?"
        return rows, f"{where}: {type(err).__name__}: {err}"
    finally:
        progress.close()
        if writer is not None:
            writer.close()
    return rows, None


def _explain_file(job: Job, item: ImageFile, writer: Any) -> dict[str, Any]:
    pre, model = job.preprocess, job.loaded.model
    x = read_image(item.path, pre).to(job.device)
    probs = _logits(model, x).float().softmax(dim=1)[0]
    predicted = int(probs.argmax())
    target = predicted if job.target is None else job.target
    hooks = job.loaded.kind is not ModelKind.TORCHSCRIPT
    methods = [m for m in job.methods if hooks or not SPECS[m].needs_hooks]
    takes_window = any("window" in SPECS[m].options for m in methods)
    options: dict[str, Any] = {"window": job.window} if takes_window else {}
    maps = explain(model, x, target, methods=methods, layer=job.layer, **options) if methods else {}
    panels: dict[str, Tensor | str] = {m: maps[m].cpu() if m in maps else TORCHSCRIPT_NOTE
                                       for m in job.methods}
    names = job.class_names
    title = f"pred: {names[predicted]} ({float(probs[predicted]):.3f})"
    if target != predicted:
        title += f"   explaining: {names[target]} ({float(probs[target]):.3f})"
    labels = {"occlusion": f"occlusion ({job.window} px)"}
    if job.layer is not None:
        labels.update({m: f"{SPECS[m].title} ({job.layer})" for m in job.methods if SPECS[m].takes_layer})
    image = denormalize(x, pre.mean, pre.std).cpu()
    rgb = figure_rgb(explanation_figure(image, panels, title=title, labels=labels))
    figure = job.out / item.output
    write_atomic(figure, lambda fh: Image.fromarray(rgb).save(fh, format="PNG"))
    if writer is not None:
        writer.add_image(f"explain/{item.output.with_suffix('').as_posix()}", rgb, 0, dataformats="HWC")
    return {
        "file": str(item.path),
        "predicted": predicted,
        "class": names[predicted],
        "score": round(float(probs[predicted]), 6),
        "target": target,
        "figure": str(figure),
    }


def _write_index(fh: IO[bytes], rows: Sequence[dict[str, Any]]) -> None:
    text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
    table = csv.DictWriter(text, fieldnames=INDEX_COLUMNS)
    table.writeheader()
    table.writerows(rows)
    text.flush()
    text.detach()
