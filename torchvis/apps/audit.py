"""Audit a labelled data set: every image's maps, their faithfulness, and where each class looks.

One map of one image rarely shows that a model learned the wrong cue (the tank detector that learned
cloudy skies); the mean map of a class over a whole data set does. :func:`audit` explains a data set
in batches with chosen methods and writes, under ``out``:

- ``shards/shard-00000.npz``, one NumPy archive per ``shard_size`` images (readable with ``numpy.load``
  alone): ``name``, ``label``, ``predicted``, ``probability``, and per method key ``map:<key>`` (the raw
  maps, float16 unless a value overflows it, then float32), ``deletion:<key>``, ``insertion:<key>``
  (RISE AUCs, :mod:`torchvis.metrics.faithfulness`) and, when the data give regions, ``inside:<key>``
  (the share of attribution mass inside the region);
- ``index.csv``: one row per image, in data order, with those scalars and the image's shard and row;
- ``class_means.npz``: per method and class, the mean attribution *mass* map (see :func:`mass`) over the
  images of the class, grouped by true and by predicted class, with counts;
- ``report.md`` with ``class_means_true.png`` and ``class_means_predicted.png`` (see
  :mod:`torchvis.apps.audit_report`).

Maps explain each image's predicted class (the evidence behind the decision). A shard is written
atomically and skipped when it already exists, so an interrupted run resumes where it stopped; under
``torchrun`` rank ``r`` computes shards ``r, r + world, ...`` and rank 0 merges.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from torchvis.apps.files import write_atomic
from torchvis.apps.loading import InputError, Preprocess, find_images, open_image, read_image
from torchvis.core.forward import checked_logits, guarded
from torchvis.methods.combine import explain_batch, unique_specs
from torchvis.metrics.faithfulness import METRICS, check_metrics, deletion_insertion, importance
from torchvis.tracking.tensorboard import model_device

SHARDS = "shards"
INDEX = "index.csv"
CLASS_MEANS = "class_means.npz"
GROUPINGS = {"true": "label", "predicted": "predicted"}  # class-mean name -> the array it groups by
FLOAT16_MAX = 65504.0


class Example(NamedTuple):
    """One image of an audited data set: ``x`` ``[C,H,W]`` (the model's input), its class, a name, and
    optionally a region ``[H,W]`` (non-zero inside) where the evidence should be."""

    x: Tensor
    label: int
    name: str
    region: Tensor | None = None


class AuditData(Protocol):
    """What :func:`audit` reads: a sized, indexable collection of :class:`Example`."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...


@dataclass(frozen=True)
class TensorData:
    """Images ``x`` ``[N,C,H,W]`` with labels ``y`` ``[N]``, optional ``regions`` ``[N,H,W]`` and names."""

    x: Tensor
    y: Tensor
    regions: Tensor | None = None
    names: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if self.x.dim() != 4 or self.y.shape != (self.x.shape[0],):
            raise ValueError(
                f"x must be [N,C,H,W] and y [N]; got {list(self.x.shape)} and {list(self.y.shape)}"
            )
        if self.regions is not None and self.regions.shape != (self.x.shape[0], *self.x.shape[-2:]):
            raise ValueError(f"regions must be [N,H,W]; got {list(self.regions.shape)}")
        if self.names is not None and len(self.names) != self.x.shape[0]:
            raise ValueError(f"names has {len(self.names)} entries for {self.x.shape[0]} images")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, index: int) -> Example:
        name = self.names[index] if self.names is not None else str(index)
        region = self.regions[index] if self.regions is not None else None
        return Example(self.x[index], int(self.y[index]), name, region)


@dataclass(frozen=True)
class FolderData:
    """An image folder in the ``ImageFolder`` layout: one subfolder per class (classes in sorted order
    of their names, labels 0, 1, ...), images found recursively inside each; names are paths relative
    to ``root``. Images are read and preprocessed when indexed."""

    root: Path
    preprocess: Preprocess
    classes: tuple[str, ...]
    files: tuple[tuple[Path, int], ...]

    @classmethod
    def scan(cls, root: str | os.PathLike[str], preprocess: Preprocess) -> FolderData:
        """Find the classes and images; an empty folder or one without class subfolders is an
        :class:`~torchvis.apps.loading.InputError`."""
        base = Path(root)
        if not base.is_dir():
            raise InputError(f"{str(root)!r} is not a folder")
        classes = tuple(sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")))
        if not classes:
            raise InputError(f"{str(root)!r} has no class subfolders (the layout is <root>/<class>/<image>)")
        files: list[tuple[Path, int]] = []
        for label, name in enumerate(classes):
            try:
                found = find_images([base / name])
            except InputError:
                found = []
            files += [(f.path, label) for f in found]
        if not files:
            raise InputError(f"no images found in the class subfolders of {str(root)!r}")
        return cls(base, preprocess, classes, tuple(files))

    def check(self) -> None:
        """Open every image once; the first unreadable one is an InputError (before any work)."""
        for path, _ in self.files:
            open_image(path, self.preprocess.channels)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Example:
        path, label = self.files[index]
        return Example(read_image(path, self.preprocess)[0], label, path.relative_to(self.root).as_posix())


def mass(maps: Tensor, x: Tensor) -> Tensor:
    """Attribution mass ``[B,H,W]``: the sum over channels of ``|map|`` (upsampled to ``x``'s size for a
    coarse CAM), divided by its total per image, so each image weighs the same in a class mean. An
    all-zero map stays zero (and is counted as empty by :func:`audit`)."""
    weights = importance(maps, x).view(x.shape[0], *x.shape[-2:]).float()
    total = weights.sum(dim=(1, 2), keepdim=True)
    return torch.where(total > 0, weights / total.clamp_min(torch.finfo(weights.dtype).tiny), weights)


def audit(
    model: nn.Module,
    data: AuditData,
    out: str | os.PathLike[str],
    *,
    methods: Sequence[str | Callable[..., Tensor]] = ("saliency", "grad_cam"),
    layer: Any = None,
    class_names: Sequence[str] | None = None,
    metrics: Sequence[str] = METRICS,
    steps: int = 25,
    batch_size: int = 32,
    shard_size: int = 512,
    device: torch.device | str | None = None,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    **options: Any,
) -> Path | None:
    """Explain every image of ``data`` and write the audit into ``out``; returns the report's path on
    rank 0 (``None`` on other ranks).

    ``metrics``: which of ``"deletion"`` and ``"insertion"`` to score each map with, ``steps`` points
    per curve (``pixels_per_step = ceil(H*W / steps)``; 25 keeps an audit of thousands of images cheap;
    the RISE protocol of :func:`torchvis.deletion` otherwise). ``options`` go to the methods (``window``
    for occlusion, ...). ``barrier`` is called after this rank's shards (``torch.distributed.barrier``
    under ``torchrun``) before rank 0 merges.
    """
    metrics = check_metrics(metrics)
    if batch_size < 1 or shard_size < 1 or steps < 1:
        raise ValueError("batch_size, shard_size and steps must be at least 1")
    if len(data) == 0:
        raise ValueError("the data set is empty")
    unique_specs(methods)  # unknown methods fail before any work
    out = Path(out)
    (out / SHARDS).mkdir(parents=True, exist_ok=True)
    shards = math.ceil(len(data) / shard_size)
    mine = [k for k in range(shards) if k % world_size == rank and not shard_path(out, k).exists()]
    first = data[0]
    total = sum(min(shard_size, len(data) - k * shard_size) for k in mine)
    bar = tqdm(total=total, desc="audit", unit="image", disable=not progress or rank != 0)
    run = ShardRun(model, methods, layer, metrics, math.ceil(first.x[0].numel() / steps), options,
                   torch.device(device) if device is not None else model_device(model) or first.x.device)
    try:
        for k in mine:
            indices = range(k * shard_size, min(len(data), (k + 1) * shard_size))
            arrays = run.shard(data, indices, batch_size, bar)
            write_npz_atomic(shard_path(out, k), arrays)
    finally:
        bar.close()
    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    from torchvis.apps.audit_report import write_report

    return write_report(out, merge(out, shards, class_names), class_names)


@dataclass
class ShardRun:
    """Computes one shard's arrays: maps, predictions and scores, batch by batch."""

    model: nn.Module
    methods: Sequence[str | Callable[..., Tensor]]
    layer: Any
    metrics: Sequence[str]
    pixels_per_step: int
    options: dict[str, Any]
    device: torch.device

    def shard(self, data: AuditData, indices: range, batch_size: int, bar: Any) -> dict[str, np.ndarray]:
        """The arrays of the examples ``data[i]`` for ``i`` in ``indices``, computed in batches."""
        columns: dict[str, list[np.ndarray]] = {}
        names: list[str] = []
        for lo in range(indices.start, indices.stop, batch_size):
            batch = _examples(data, range(lo, min(indices.stop, lo + batch_size)))
            for key, value in self.batch(batch).items():
                columns.setdefault(key, []).append(value)
            names += batch.names
            bar.update(len(batch.labels))
        arrays = {key: np.concatenate(parts) for key, parts in columns.items()}
        arrays["classes"] = arrays["classes"][:1].reshape(())
        arrays["name"] = np.asarray(names, dtype=str)
        return arrays

    def batch(self, batch: Batch) -> dict[str, np.ndarray]:
        x = batch.x.to(self.device)
        result = explain_batch(self.model, x, methods=self.methods, layer=self.layer, **self.options)
        logits = result.logits
        if logits is None:  # no shared pass ran (occlusion alone, say): one forward for the predictions
            with guarded(self.model, x, grad=False), torch.no_grad():
                logits = checked_logits(self.model(x), x.shape[0])
        probs = logits.float().softmax(dim=1)
        predicted = probs.argmax(dim=1)
        columns: dict[str, np.ndarray] = {
            "label": np.asarray(batch.labels, dtype=np.int64),
            "predicted": predicted.cpu().numpy(),
            "probability": probs.gather(1, predicted[:, None])[:, 0].cpu().numpy(),
            "classes": np.full(len(batch.labels), probs.shape[1], dtype=np.int64),
        }
        for key, maps in result.maps.items():
            columns[f"map:{key}"] = _compact(maps)
            if self.metrics:  # one ranking and one target pass for both (each as its function alone)
                aucs = deletion_insertion(self.model, x, maps, predicted, metrics=self.metrics,
                                          pixels_per_step=self.pixels_per_step)
                for metric in self.metrics:
                    columns[f"{metric}:{key}"] = aucs[metric].float().cpu().numpy()
            if batch.regions is not None:
                share = (mass(maps, x) * (batch.regions.to(self.device) != 0)).sum(dim=(1, 2))
                columns[f"inside:{key}"] = share.cpu().numpy()
        return columns


class Batch(NamedTuple):
    """Consecutive examples stacked: ``x`` ``[b,C,H,W]``, their labels and names, and their regions
    ``[b,H,W]`` when every one has a region."""

    x: Tensor
    labels: list[int]
    names: list[str]
    regions: Tensor | None


def _examples(data: AuditData, indices: range) -> Batch:
    if isinstance(data, TensorData):  # slices, not one tensor per example
        regions = data.regions[indices.start : indices.stop] if data.regions is not None else None
        names = [data.names[i] for i in indices] if data.names is not None else [str(i) for i in indices]
        return Batch(data.x[indices.start : indices.stop], data.y[indices.start : indices.stop].tolist(),
                     names, regions)
    examples = [data[i] for i in indices]
    with_regions = all(e.region is not None for e in examples)
    return Batch(torch.stack([e.x for e in examples]), [e.label for e in examples],
                 [e.name for e in examples],
                 torch.stack([e.region for e in examples]) if with_regions else None)  # type: ignore[misc]


def _compact(maps: Tensor) -> np.ndarray:
    """float16 when every value fits it (half the bytes of float32), else float32."""
    values = maps.detach().float().cpu()
    if values.numel() == 0:
        return values.numpy()
    low, high = torch.aminmax(values)
    fits = max(-float(low), float(high)) <= FLOAT16_MAX
    return values.half().numpy() if fits else values.numpy()


def shard_path(out: Path, k: int) -> Path:
    return out / SHARDS / f"shard-{k:05d}.npz"


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an ``.npz`` atomically (:func:`~torchvis.apps.files.write_atomic`)."""
    write_atomic(path, lambda fh: np.savez(fh, **arrays))  # type: ignore[arg-type]


def read_shards(out: Path, shards: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Each shard's arrays, in order; a missing shard is an error naming it."""
    for k in range(shards):
        path = shard_path(out, k)
        if not path.exists():
            raise FileNotFoundError(f"shard {path} is missing; rerun the audit to compute it")
        with np.load(path) as archive:
            yield k, {key: archive[key] for key in archive.files}


@dataclass
class Merged:
    """What rank 0 gathered from the shards: the index rows and the class-mean mass maps
    ``means[(method key, "true" | "predicted")]`` ``[classes, H, W]`` with ``counts`` ``[classes]`` and the
    number of empty maps per method key."""

    rows: list[dict[str, Any]]
    keys: list[str]
    means: dict[tuple[str, str], np.ndarray]
    counts: dict[str, np.ndarray]
    empty: dict[str, int]


def merge(out: Path, shards: int, class_names: Sequence[str] | None) -> Merged:
    """Read every shard, write ``index.csv`` and ``class_means.npz``; returns what the report needs."""
    rows: list[dict[str, Any]] = []
    sums: dict[tuple[str, str], np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    empty: dict[str, int] = {}
    keys: list[str] = []
    for k, arrays in read_shards(out, shards):
        classes = int(arrays["classes"])
        keys = keys or [key.split(":", 1)[1] for key in arrays if key.startswith("map:")]
        for row in range(len(arrays["name"])):
            record: dict[str, Any] = {"file": str(arrays["name"][row]), "label": int(arrays["label"][row]),
                                      "predicted": int(arrays["predicted"][row]),
                                      "probability": round(float(arrays["probability"][row]), 6),
                                      "shard": k, "row": row}
            for key in arrays:
                if ":" in key and not key.startswith("map:"):
                    record[key] = round(float(arrays[key][row]), 6)
            rows.append(record)
        size = _image_size(arrays, keys)
        for key in keys:
            maps = torch.from_numpy(arrays[f"map:{key}"].astype(np.float32))
            weights = mass(maps, torch.empty(maps.shape[0], 1, *size)).numpy()
            empty[key] = empty.get(key, 0) + int((weights.sum(axis=(1, 2)) == 0).sum())
            for name, grouping in GROUPINGS.items():
                total = sums.setdefault((key, name), np.zeros((classes, *size), dtype=np.float32))
                np.add.at(total, arrays[grouping], weights.astype(np.float32))
        for name, grouping in GROUPINGS.items():
            counts[name] = counts.get(name, 0) + np.bincount(arrays[grouping], minlength=classes)
    means = {(key, name): total / np.maximum(counts[name], 1)[:, None, None]
             for (key, name), total in sums.items()}
    _write_index(out / INDEX, rows)
    write_npz_atomic(out / CLASS_MEANS, {
        **{f"{name}:{key}": mean.astype(np.float32) for (key, name), mean in means.items()},
        **{f"count:{name}": count for name, count in counts.items()},
    })
    return Merged(rows, keys, means, counts, empty)


def _image_size(arrays: dict[str, np.ndarray], keys: list[str]) -> tuple[int, int]:
    """The input's ``H, W``: the largest map size among the methods (CAMs may be coarser)."""
    sizes = [arrays[f"map:{key}"].shape[-2:] for key in keys]
    return max(s[0] for s in sizes), max(s[1] for s in sizes)


def _write_index(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(rows[0]) if rows else ["file", "label", "predicted", "probability", "shard", "row"]
    text = io.StringIO()
    table = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    table.writeheader()
    table.writerows(rows)
    write_atomic(path, lambda fh: fh.write(text.getvalue().encode("utf-8")))
