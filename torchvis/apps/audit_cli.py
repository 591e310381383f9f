"""``torchvis audit``: explain a labelled image folder and report where each class looks.

Every input is checked before anything is written (exit 2 on bad input: no class subfolders, an
unreadable image, an unknown method or layer, an output that cannot be written); under ``torchrun``
each rank computes its shards and rank 0 merges them (see :mod:`torchvis.apps.audit`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path
from typing import Any

import torch

from torchvis.apps.audit import FolderData, audit
from torchvis.apps.files import check_output_folder
from torchvis.apps.loading import InputError, ModelKind, load_model, read_class_names
from torchvis.apps.model_options import add_model_options, chosen_methods, import_plugin, preprocess_for
from torchvis.methods.spec import SPECS
from torchvis.metrics.faithfulness import METRICS, check_metrics

DEFAULT_METHODS = ("saliency", "grad_cam")


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``torchvis audit``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  torchvis audit digits/ --model runs/demo/model.pt --out audit\n"
        "  torchrun --nproc_per_node=2 -m torchvis audit photos/ --model resnet18 --weights w.pt\n"
    )
    parser.add_argument("data", metavar="FOLDER", help="a folder with one subfolder of images per class")
    add_model_options(parser, default_methods=DEFAULT_METHODS)
    add = parser.add_argument
    add("--out", default="audit", metavar="DIR", help="folder for shards, index, figures and report")
    add("--metrics", default=",".join(METRICS), metavar="M[,M]",
        help="faithfulness scores per map: deletion, insertion, or none (default: both)")
    add("--steps", type=int, default=25, metavar="N", help="points per deletion/insertion curve (default 25)")
    add("--batch-size", type=int, default=32, metavar="N", help="images per batch (default 32)")
    add("--shard-size", type=int, default=512, metavar="N", help="images per shard file (default 512)")
    add("--tensorboard", metavar="DIR", help="also log the class-mean figures to a TensorBoard run in DIR")
    add("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Audit the folder; 0 on success, 2 for bad input (nothing written)."""
    rank, size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    default = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(args.device) if args.device else default
    if size > 1:
        import torch.distributed as dist

        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=12))
    try:
        try:
            job = _prepare(args, device)
        except InputError as err:
            if rank == 0:
                print(f"torchvis audit: error: {err}", file=sys.stderr)
            return 2
        report = audit(job["model"], job["data"], args.out, methods=job["methods"], layer=args.layer,
                       class_names=job["names"], metrics=job["metrics"], steps=args.steps,
                       batch_size=args.batch_size, shard_size=args.shard_size, device=device,
                       progress=not args.no_progress, rank=rank, world_size=size,
                       barrier=_barrier if size > 1 else None, **job["options"])
        if report is not None:
            if args.tensorboard is not None:
                _log_figures(Path(args.out), args.tensorboard)
            print(f"audited {len(job['data'])} images into {args.out}/ (report: {report})")
        return 0
    finally:
        if size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _prepare(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Check every input, in the order a user fixes them; raise InputError naming the first problem."""
    for plugin in args.imports:
        import_plugin(plugin)
    methods = chosen_methods(args.methods, DEFAULT_METHODS)
    metrics = () if args.metrics == "none" else tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    try:
        check_metrics(metrics)
    except ValueError as err:
        raise InputError(f"--metrics: {err}, or none") from err
    for name, value in (("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--shard-size", args.shard_size)):
        if value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    for option, folder in (("--out", args.out), ("--tensorboard", args.tensorboard)):
        if folder is not None:
            check_output_folder(Path(folder), option)
    loaded = load_model(args.model, weights=args.weights, num_classes=args.num_classes, device=device)
    preprocess = preprocess_for(loaded, args)
    data = FolderData.scan(args.data, preprocess)
    data.check()
    probe = data[0].x[None].to(device)
    with torch.no_grad():
        classes = int(loaded.model(probe).shape[-1])
    if len(data.classes) > classes:
        raise InputError(
            f"{args.data!r} has {len(data.classes)} class folders; the model has {classes} classes"
        )
    names = read_class_names(args.classes) if args.classes is not None else None
    if names is not None and len(names) != classes:
        raise InputError(
            f"--classes {args.classes!r} has {len(names)} names; the model has {classes} classes"
        )
    blind = [m for m in methods if SPECS[m].needs_hooks and loaded.kind is ModelKind.TORCHSCRIPT]
    if blind:
        raise InputError(f"{', '.join(blind)} need module hooks, which TorchScript models do not support")
    options: dict[str, Any] = {}
    if any("window" in SPECS[m].options for m in methods):
        options["window"] = args.window if args.window is not None else max(1, preprocess.size // 7)
    if names is None:
        names = tuple(data.classes) + tuple(str(c) for c in range(len(data.classes), classes))
    return {"model": loaded.model, "data": data, "methods": methods, "metrics": metrics,
            "names": names, "options": options}


def _log_figures(out: Path, logdir: str) -> None:
    import numpy as np
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(logdir) as writer:
        for grouping in ("true", "predicted"):
            pixels = np.asarray(Image.open(out / f"class_means_{grouping}.png").convert("RGB"))
            writer.add_image(f"audit/class_means_by_{grouping}_class", pixels, 0, dataformats="HWC")
