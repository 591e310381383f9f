"""Command-line options shared by the commands that load a model and explain images
(``torchvis explain``, ``torchvis audit``): the model, its preprocessing, the methods and the layer."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
from pathlib import Path

from torchvis.apps.loading import InputError, LoadedModel, ModelKind, Preprocess
from torchvis.methods.spec import SPECS


def add_model_options(parser: argparse.ArgumentParser, *, default_methods: tuple[str, ...]) -> None:
    """``--model``, ``--weights``, ``--num-classes``, ``--methods``, ``--import``, ``--layer``,
    ``--window``, ``--size``, ``--mean``, ``--std``, ``--classes``, ``--device``."""
    add = parser.add_argument
    add("--model", required=True, metavar="MODEL",
        help="a torchvision architecture name (e.g. resnet18; needs --weights), a TorchScript file, "
             "or a checkpoint written by `torchvis demo`")
    add("--weights", metavar="FILE", help="state dict for the architecture (read with weights_only=True)")
    add("--num-classes", type=int, metavar="N", help="outputs of the architecture (default 1000)")
    add("--methods", metavar="M[,M...]",
        help=f"comma-separated registered methods (default: {','.join(default_methods)})")
    add("--import", dest="imports", action="append", default=[], metavar="MODULE",
        help="a Python file or module to import first, e.g. one that calls torchvis.register (repeatable)")
    add("--layer", metavar="NAME",
        help="layer of Grad-CAM and the other layer methods, a dotted module name "
             "(default: the last spatial one)")
    add("--window", type=int, metavar="N", help="occlusion window in pixels (default: size // 7)")
    add("--size", type=int, metavar="N", help="input side after resize and centre crop (default 224)")
    add("--mean", type=floats, metavar="M[,M,M]", help="per-channel input mean (default: ImageNet's)")
    add("--std", type=floats, metavar="S[,S,S]", help="per-channel input std (default: ImageNet's)")
    add("--classes", metavar="FILE", help="class names, one per line")
    add("--device", help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def preprocess_for(loaded: LoadedModel, args: argparse.Namespace) -> Preprocess:
    """The model's preprocessing with ``--size``, ``--mean`` and ``--std`` applied."""
    default = loaded.preprocess
    if loaded.kind is ModelKind.DIGITS and args.size not in (None, default.size):
        raise InputError(f"the digits model takes {default.size}x{default.size} inputs; drop --size")
    mean = default.mean if args.mean is None else tuple(args.mean)
    std = default.std if args.std is None else tuple(args.std)
    return Preprocess(default.size if args.size is None else args.size, mean, std)


def import_plugin(name: str) -> None:
    """Import a ``.py`` file or a module by name (where users register their own methods)."""
    try:
        if name.endswith(".py") or os.sep in name:
            spec = importlib.util.spec_from_file_location(f"torchvis_plugin_{Path(name).stem}", name)
            if spec is None or spec.loader is None or not Path(name).is_file():
                raise FileNotFoundError(f"no such file: {name}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            importlib.import_module(name)
    except Exception as err:
        raise InputError(f"--import {name!r}: {type(err).__name__}: {err}") from err


def chosen_methods(text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    """The ``--methods`` list, each a registered name; ``default`` when not given."""
    if text is None:
        return default
    methods = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in methods if m not in SPECS]
    if unknown or not methods:
        raise InputError(f"--methods: unknown method(s) {unknown}; known: {', '.join(SPECS)}")
    return methods
