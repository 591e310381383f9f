"""Loading what the command line names: models (torchvision, TorchScript, the digits checkpoint),
their weights, image files and class names.

Every failure a user can cause raises :class:`InputError` with a one-line message that names the
file and what to do. Nothing here downloads anything: torchvision models are built with
``weights=None`` and weights come only from files, read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import difflib
import enum
import os
import pickle
import warnings
import zipfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor, nn

__all__ = [
    "IMAGE_SUFFIXES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFile",
    "InputError",
    "LoadedModel",
    "ModelKind",
    "Preprocess",
    "build_torchvision",
    "check_state_dict",
    "find_images",
    "is_torchscript",
    "load_model",
    "load_state_dict",
    "open_image",
    "read_class_names",
    "read_image",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


class InputError(ValueError):
    """A bad file, model or option: the command prints the message and exits with status 2."""


class ModelKind(enum.Enum):
    TORCHVISION = "torchvision"
    TORCHSCRIPT = "torchscript"
    DIGITS = "digits"


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``size``, centre-crop ``size x size``, then ``(x - mean) / std``;
    ``len(mean)`` channels (1: grey, 3: RGB)."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.size < 1:
            raise InputError(f"--size must be positive, got {self.size}")
        if len(self.mean) not in (1, 3) or len(self.std) != len(self.mean):
            raise InputError(
                f"--mean and --std need 1 (grey) or 3 (RGB) values each, got {len(self.mean)} and "
                f"{len(self.std)}"
            )
        if not all(s > 0 for s in self.std):
            raise InputError(f"--std values must be positive, got {self.std}")

    @property
    def channels(self) -> int:
        return len(self.mean)


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode with the preprocessing it expects and, if known, its class names."""

    model: nn.Module
    kind: ModelKind
    preprocess: Preprocess
    class_names: tuple[str, ...] | None


@dataclass(frozen=True)
class ImageFile:
    """An input image and the path of its figure relative to the output folder."""

    path: Path
    output: Path


# --- models -----------------------------------------------------------------------------------


def load_model(
    spec: str,
    *,
    weights: str | None = None,
    num_classes: int | None = None,
    device: torch.device | str = "cpu",
) -> LoadedModel:
    """Load a model by torchvision architecture name (with ``weights``), TorchScript file or digits
    checkpoint, in eval mode on ``device``."""
    path = Path(spec)
    if path.is_file():
        if weights is not None or num_classes is not None:
            raise InputError(
                f"--weights and --num-classes go with an architecture name, not with the model file {spec!r}"
            )
        return _load_model_file(path, torch.device(device))
    if path.exists():
        raise InputError(f"--model {spec!r} is not a file")
    if path.suffix in (".pt", ".pth", ".ts", ".ptl", ".pt2") or os.sep in spec:
        raise InputError(f"model file {spec!r} not found")
    if weights is None:
        raise InputError(
            f"--model {spec} needs --weights FILE (a state dict); torchvis never downloads weights"
        )
    classes = 1000 if num_classes is None else num_classes
    model = build_torchvision(spec, classes)
    state = load_state_dict(weights)
    check_state_dict(model, state, weights)
    model.load_state_dict(state)
    names = _imagenet_categories(spec) if classes == 1000 else None
    return LoadedModel(
        model.to(device).eval(), ModelKind.TORCHVISION, Preprocess(224, IMAGENET_MEAN, IMAGENET_STD), names
    )


def _load_model_file(path: Path, device: torch.device) -> LoadedModel:
    if is_torchscript(path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
                model = torch.jit.load(str(path), map_location=device)
        except Exception as err:
            raise InputError(f"{str(path)!r} is not a loadable TorchScript file: {err}") from err
        preprocess = Preprocess(224, IMAGENET_MEAN, IMAGENET_STD)
        return LoadedModel(model.eval(), ModelKind.TORCHSCRIPT, preprocess, None)
    from torchvis.apps import digits

    content = _torch_load(path)
    if isinstance(content, dict) and content.get("format") == digits.CHECKPOINT_FORMAT:
        try:
            model = digits.load_digits_model(path, map_location=device)
        except ValueError as err:
            raise InputError(str(err)) from err
        preprocess = Preprocess(28, (digits.MNIST_MEAN,), (digits.MNIST_STD,))
        return LoadedModel(model, ModelKind.DIGITS, preprocess, digits.CLASS_NAMES)
    raise InputError(
        f"{str(path)!r} holds weights but no architecture; pass the architecture and the weights: "
        f"--model resnet18 --weights {path}"
    )


def is_torchscript(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``) rather than a ``torch.save`` file."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/__torch__/" in name for name in archive.namelist())


def build_torchvision(name: str, num_classes: int) -> nn.Module:
    """A torchvision classification architecture with random weights (``weights=None``)."""
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = difflib.get_close_matches(name.lower(), known, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see torchvision.models.list_models()"
        raise InputError(f"unknown architecture {name!r}; {hint}")
    if num_classes < 1:
        raise InputError(f"--num-classes must be positive, got {num_classes}")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def _imagenet_categories(name: str) -> tuple[str, ...] | None:
    """The ImageNet class names torchvision ships with the architecture's weight enum (no download)."""
    import torchvision

    try:
        for entry in torchvision.models.get_model_weights(name):
            categories = entry.meta.get("categories")
            if categories is not None and len(categories) == 1000:
                return tuple(categories)
    except (KeyError, ValueError):
        pass
    return None


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise InputError(f"weights file {str(path)!r} not found") from err
    except OSError as err:
        raise InputError(f"cannot read {str(path)!r}: {err.strerror or err}") from err
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise InputError(f"{str(path)!r} is not a torch file: {_first_line(err)}") from err
        raise InputError(
            f"{str(path)!r} holds pickled Python objects (a whole model saved with torch.save(model)?), "
            "which torchvis does not run; save and pass model.state_dict() instead"
        ) from err
    except Exception as err:
        # KeyError, EOFError (not a torch file), RuntimeError (a truncated zip), ...
        raise InputError(f"{str(path)!r} is not a torch file, or is damaged: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state dict saved bare or under ``"state_dict"`` / ``"model"``; a ``"module."`` prefix
    (DistributedDataParallel) is dropped."""
    content = _torch_load(Path(path))
    if isinstance(content, dict):
        for key in ("state_dict", "model"):
            if isinstance(content.get(key), dict):
                content = content[key]
                break
    if not isinstance(content, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in content.items()
    ):
        raise InputError(
            f"{os.fspath(path)!r} does not hold a state dict (a dict of tensors, bare or under "
            "'state_dict' or 'model')"
        )
    if content and all(k.startswith("module.") for k in content):
        content = {k.removeprefix("module."): v for k, v in content.items()}
    return content


def check_state_dict(model: nn.Module, state: Mapping[str, Tensor], source: str | os.PathLike[str]) -> None:
    """Raise :class:`InputError` naming the missing and unexpected keys, or the first shape that
    differs, if ``state`` does not fit ``model`` exactly."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    where = f"weights {os.fspath(source)!r} do not match {type(model).__name__}"
    if missing or unexpected:
        pairs = (("missing", missing), ("unexpected", unexpected))
        parts = [f"{label} keys {_few(keys)}" for label, keys in pairs if keys]
        raise InputError(f"{where}: {'; '.join(parts)}")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            hint = ""
            if tensor.dim() >= 1 and key == _last_weight(expected) and state[key].dim() == tensor.dim():
                hint = f" (pass --num-classes {state[key].shape[0]}?)"
            raise InputError(
                f"{where}: {key} has shape {list(state[key].shape)} in the file but "
                f"{list(tensor.shape)} in the model{hint}"
            )


def _last_weight(state: Mapping[str, Tensor]) -> str | None:
    weights = [k for k in state if k.endswith(".weight")]
    return weights[-1] if weights else None


def _few(keys: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown} (+{len(keys) - n} more)" if len(keys) > n else shown


def read_class_names(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """One class name per line; blank lines at the end are ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read the class names file {os.fspath(path)!r}: {err}") from err
    names = tuple(line.strip() for line in text.rstrip().splitlines())
    if not names:
        raise InputError(f"the class names file {os.fspath(path)!r} is empty")
    return names


# --- images -----------------------------------------------------------------------------------


def find_images(inputs: Sequence[str | os.PathLike[str]], *, exclude: Path | None = None) -> list[ImageFile]:
    """The image files named or found (recursively, by suffix) in folders, sorted, each with its
    figure's relative output path: ``<name>.png`` for a file, the path inside the folder for a folder.

    Files under ``exclude`` (the output folder) are skipped; a named file is taken whatever its suffix.
    Two inputs whose figures would have the same path keep their suffix (``cat.jpg.png``).
    """
    found: list[tuple[Path, Path]] = []
    skip = exclude.resolve() if exclude is not None else None
    missing = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend((p, p.relative_to(path)) for p in _walk(path, skip))
        elif path.exists():
            found.append((path, Path(path.name)))
        else:
            missing.append(f"input {os.fspath(item)!r} not found")
    if missing:
        raise InputError("\n".join(missing))
    if not found:
        raise InputError(
            f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {', '.join(map(str, inputs))}"
        )
    found = sorted(set(found))
    stems = Counter(rel.with_suffix(".png") for _, rel in found)
    files = [
        ImageFile(path, figure if stems[figure] == 1 else Path(f"{rel}.png"))
        for path, rel in found
        for figure in [rel.with_suffix(".png")]
    ]
    outputs = Counter(f.output for f in files)
    clash = [f for f in files if outputs[f.output] > 1]
    if clash:
        raise InputError(
            f"{clash[0].path} and {clash[1].path} would both be explained in {clash[0].output}; "
            "run them separately (with different --out) or rename one"
        )
    return files


def _walk(folder: Path, skip: Path | None) -> list[Path]:
    images: list[Path] = []
    for root, dirs, names in os.walk(folder):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() != skip)
        images.extend(
            here / n for n in sorted(names)
            if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_SUFFIXES
        )
    return images


def open_image(path: str | os.PathLike[str], channels: int) -> Image.Image:
    """Decode the whole file (so a truncated one fails here) as grey (1) or RGB (3), upright per EXIF.

    A high-bit-depth grey image (16-bit PNG or TIFF, 32-bit float TIFF) comes back as a float ("F")
    image in [0, 1], scaled by the range of its format, for any ``channels``; values outside that
    range are an :class:`InputError`. PIL itself reads 16-bit RGB PNGs as 8-bit RGB (their high bytes).
    """
    where = repr(os.fspath(path))
    try:
        with Image.open(path) as image:
            image.load()
            upright = ImageOps.exif_transpose(image)
            if upright.mode in _HIGH_DEPTH:
                return _as_unit_float(upright, where)
            return upright.convert("L" if channels == 1 else "RGB")
    except FileNotFoundError as err:
        raise InputError(f"image {where} not found") from err
    except UnidentifiedImageError as err:
        raise InputError(f"{where} is not an image file PIL can read") from err
    except Image.DecompressionBombError as err:
        raise InputError(f"image {where} is too large: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:
        # PermissionError, "image file is truncated", broken PNG chunks (SyntaxError in PIL).
        raise InputError(f"cannot read image {where}: {getattr(err, 'strerror', None) or err}") from err


# Grey modes of more than 8 bits, and the largest value of each: PIL's convert("L") would clip them.
_HIGH_DEPTH = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1}


def _as_unit_float(image: Image.Image, where: str) -> Image.Image:
    """A high-bit-depth grey image as a float ("F") image in [0, 1]: 16-bit integers divided by
    65535 (the range of the format, as torchvision scales uint16), floats taken as they are. Values
    outside the format's range are refused, never clipped."""
    values = np.asarray(image, dtype=np.float64)
    top = _HIGH_DEPTH[image.mode]
    low, high = float(values.min()), float(values.max())
    if not np.isfinite(values).all() or low < 0 or high > top:
        kind = "float image" if image.mode == "F" else f"{image.mode} image"
        raise InputError(
            f"{kind} {where} holds values in [{low:g}, {high:g}], outside [0, {top}]; torchvis scales "
            f"{'float images as they are' if top == 1 else f'{image.mode} images by {top}'} — convert it "
            "to 8 or 16 bits per channel first"
        )
    return Image.fromarray((values / top).astype(np.float32))


def read_image(path: str | os.PathLike[str], preprocess: Preprocess) -> Tensor:
    """The image as the model sees it: ``[1,C,size,size]`` float32, normalised.

    The shorter side is resized to ``size`` (PIL's antialiased bilinear filter), then the centre
    ``size x size`` is cropped, as torchvision's ``Resize(size)`` + ``CenterCrop(size)`` on a PIL image.
    8-bit images are divided by 255; 16-bit grey images by 65535 and float (TIFF) images taken as
    they are (see :func:`open_image`); a grey image given to an RGB model fills the three channels.
    """
    image = open_image(path, preprocess.channels)
    size, (width, height) = preprocess.size, image.size
    scale = size / min(width, height)
    shape = (max(size, round(width * scale)), max(size, round(height * scale)))
    if shape != image.size:
        image = image.resize(shape, Image.Resampling.BILINEAR)
    left, top = round((shape[0] - size) / 2), round((shape[1] - size) / 2)
    image = image.crop((left, top, left + size, top + size))
    if image.mode == "F":  # a high-bit-depth grey image, already in [0, 1]
        grey = np.asarray(image, dtype=np.float32)[:, :, None]
        values = np.repeat(grey, preprocess.channels, axis=2)
    else:
        values = np.asarray(image, dtype=np.float32) / np.float32(255)
    pixels = torch.from_numpy(np.ascontiguousarray(values)).reshape(size, size, -1)
    mean = torch.tensor(preprocess.mean).view(-1, 1, 1)
    std = torch.tensor(preprocess.std).view(-1, 1, 1)
    return ((pixels.permute(2, 0, 1) - mean) / std).unsqueeze(0)
