"""``torchvis sanity``: does each method's map change when the model is randomised?

Takes the inputs and model options of ``torchvis explain`` (checked by the same code, before anything
is written), runs :func:`torchvis.sanity_check` on all inputs as one batch, and writes to ``--out``:
one figure per input (the same relative name as ``torchvis explain``'s, maps per method and
randomisation stage), ``sanity.txt`` (the table) and ``sanity.csv`` (one row per method and stage).
Exit status 2, with nothing written, for bad input.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import sys
from typing import IO, Any

import torch
from PIL import Image

from torchvis.apps.explain_cli import World, _device, add_input_options, prepare
from torchvis.apps.files import write_atomic
from torchvis.apps.loading import InputError, ModelKind, read_image
from torchvis.core.hooks import resolve_layer
from torchvis.methods.spec import SPECS
from torchvis.metrics.sanity import SanityResult, SanityRow, sanity_check
from torchvis.rendering.figure import figure_rgb
from torchvis.rendering.sanity_figure import sanity_figure

TABLE, CSV = "sanity.txt", "sanity.csv"
CSV_COLUMNS = tuple(SanityRow.__dataclass_fields__)


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``torchvis sanity``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  torchvis sanity digits/ --model runs/demo/model.pt --layer relu2\n"
        "  torchvis sanity cat.jpg --model resnet18 --weights w.pt --methods saliency,grad_cam "
        "--layers fc,layer4,layer3\n"
        "\nAdebayo et al., 'Sanity Checks for Saliency Maps', NeurIPS 2018 (cascading randomisation)."
    )
    add_input_options(parser, out_default="sanity", out_help="the figures, sanity.txt and sanity.csv")
    parser.add_argument("--layers", metavar="L[,L...]",
                        help="layers to re-initialise, in order (default: every layer with parameters, "
                             "the output's first)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the re-initialisation (default 0)")


def run(args: argparse.Namespace) -> int:
    """Check everything, compute, write; 0 on success, 2 for bad input (nothing written)."""
    device = _device(args.device, World(rank=0, size=1, local_rank=0))
    try:
        job = prepare(args, device)
        if job.loaded.kind is ModelKind.TORCHSCRIPT:
            raise InputError("a sanity check re-initialises the model's layers, which needs a Python "
                             "module, not TorchScript")
        layers = _layers(job.loaded.model, args.layers)
        for name in (TABLE, CSV):
            if (job.out / name).resolve() in {f.path.resolve() for f in job.files}:
                raise InputError(f"writing {job.out / name} would overwrite an input; choose another --out")
    except InputError as err:
        print(f"torchvis sanity: error: {err}", file=sys.stderr)
        return 2
    x = torch.cat([read_image(f.path, job.preprocess) for f in job.files]).to(device)
    takes_window = any("window" in SPECS[m].options for m in job.methods)
    options: dict[str, Any] = {"window": job.window} if takes_window else {}
    if any(SPECS[m].takes_layer for m in job.methods):
        options["layer"] = job.layer
    result = sanity_check(job.loaded.model, x, job.methods, job.target, layers=layers, seed=args.seed,
                          **options)
    pre = job.preprocess
    for i, item in enumerate(job.files):
        picture = Image.fromarray(figure_rgb(sanity_figure(result, example=i, mean=pre.mean, std=pre.std)))
        write_atomic(job.out / item.output, functools.partial(picture.save, format="PNG"))
    write_atomic(job.out / TABLE, lambda fh: _write_text(fh, str(result) + "\n"))
    write_atomic(job.out / CSV, lambda fh: _write_csv(fh, result))
    print(result)
    print(f"wrote {len(job.files)} figure{'s' * (len(job.files) != 1)}, {TABLE} and {CSV} into {job.out}/")
    return 0


def _layers(model: torch.nn.Module, text: str | None) -> list[str] | None:
    """The ``--layers`` list, each a module of the model that has parameters."""
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise InputError("--layers is empty")
    for name in names:
        try:
            resolve_layer(model, name)
        except ValueError as err:
            raise InputError(f"--layers: {err}") from err
        if not any(True for _ in model.get_submodule(name).parameters()):
            raise InputError(f"--layers: {name!r} has no parameters to re-initialise")
    if len(set(names)) != len(names):
        raise InputError(f"--layers names a layer twice: {names}")
    return names


def _write_text(fh: IO[bytes], text: str) -> None:
    fh.write(text.encode("utf-8"))


def _write_csv(fh: IO[bytes], result: SanityResult) -> None:
    text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
    table = csv.DictWriter(text, fieldnames=CSV_COLUMNS)
    table.writeheader()
    for row in result.to_dict()["rows"]:
        table.writerow({k: "" if v is None else v for k, v in row.items()})
    text.flush()
    text.detach()
