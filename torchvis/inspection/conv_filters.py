"""Convolution filters as pictures.

Normalisation is one scale per layer, symmetric around zero: a weight ``w`` is drawn at
``0.5 + 0.5 * w / max|W|`` with ``W`` the whole layer's weight, so zero is mid-grey, the largest
magnitude in the layer reaches black or white, and tiles are comparable across filters (a filter with
twice the weights sits twice as far from grey). Layouts (weights ``[out, in, kh, kw]``):

- ``in == 3`` and no ``in_channel``: one colour tile per filter (a first layer on RGB input; the
  channel order is the model's);
- ``in_channel=c``: one grey tile per filter, its slice for input channel ``c``;
- otherwise: one grey tile per (filter, input channel) pair, filter-major; the grid gives each filter
  a row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter

from torchvis.core.hooks import LayerRef, resolve_layer
from torchvis.rendering.image import grid, grid_columns, to_uint8

__all__ = [
    "MAX_TILES",
    "ImagesWriter",
    "conv_layers",
    "filter_grid",
    "filters",
    "log_filters",
    "upscale",
]

#: filter_grid refuses more tiles than this (a 512x512 layer would be 262,144); pick channels instead.
MAX_TILES = 4096


class ImagesWriter(Protocol):
    """Anything with ``add_images``: ``SummaryWriter``, Lightning's ``logger.experiment``, ``PNGWriter``."""

    def add_images(self, tag: str, img_tensor: Any, global_step: int | None = None) -> None: ...


def conv_layers(model: nn.Module) -> list[str]:
    """The dotted names of the model's ``nn.Conv2d`` layers, in definition order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


def _conv(model: nn.Module, layer: LayerRef | None) -> tuple[str, nn.Conv2d]:
    convs = conv_layers(model)
    if layer is None:
        if not convs:
            raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer to show filters of")
        layer = convs[0]
    name, module = resolve_layer(model, layer)
    if not isinstance(module, nn.Conv2d):
        listed = ", ".join(repr(n) for n in convs[:12]) or "none"
        if len(convs) > 12:
            listed += f", ... ({len(convs)} in all)"
        weighted = isinstance(getattr(module, "weight", None), Tensor)
        problem = "is not an nn.Conv2d" if weighted else "has no weights"
        raise ValueError(f"layer {name!r} ({type(module).__name__}) {problem}; Conv2d layers: {listed}")
    if isinstance(module.weight, UninitializedParameter):
        raise ValueError(f"layer {name!r} is a lazy layer not yet initialised; run one forward pass first")
    return name, module


def checked_indices(count: int, index: Sequence[int], what: str, where: str) -> list[int]:
    """``index`` as a list, each in ``0..count-1``, else a ValueError naming the first bad one."""
    picked = [int(i) for i in index]
    if not picked:
        raise ValueError(f"no {what}s chosen; {where} has {count}")
    bad = [i for i in picked if not 0 <= i < count]
    if bad:
        raise ValueError(f"{what} {bad[0]} is out of range: {where} has {count} {what}s (0..{count - 1})")
    return picked


def filters(
    model: nn.Module,
    layer: LayerRef | None = None,
    *,
    in_channel: int | None = None,
    out_channels: Sequence[int] | None = None,
) -> Tensor:
    """The weights of a conv layer as images in [0, 1]; float32 on the weight's device.

    ``model`` may be the conv layer itself; ``layer=None`` takes the first ``nn.Conv2d``. Returns
    ``[N,3,kh,kw]`` (colour) or ``[N,1,kh,kw]`` (grey) laid out as the module docstring says, with
    ``N`` counting the chosen ``out_channels`` (default all).
    """
    name, conv = _conv(model, layer)
    w = conv.weight.detach().float()
    scale = w.abs().amax()
    where = f"layer {name!r}" if name else "the layer"
    if out_channels is not None:
        w = w[checked_indices(w.shape[0], out_channels, "out channel", where)]
    if in_channel is not None:
        w = w[:, checked_indices(w.shape[1], [in_channel], "in channel", where)]
    elif w.shape[1] != 3:
        w = w.flatten(0, 1).unsqueeze(1)
    if scale == 0:
        return torch.full_like(w, 0.5)
    return 0.5 + 0.5 * w / scale


def upscale(images: Tensor, size: int) -> Tensor:
    """Enlarge ``[B,C,h,w]`` by the largest whole factor keeping ``max(h, w) <= size`` (at least 1),
    repeating pixels (nearest neighbour), so each weight or activation stays a sharp square."""
    factor = max(1, size // max(images.shape[-2:]))
    return images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def filter_grid(
    model: nn.Module,
    layer: LayerRef | None = None,
    *,
    in_channel: int | None = None,
    out_channels: Sequence[int] | None = None,
    tile: int = 24,
) -> Tensor:
    """The tiles of :func:`filters`, each enlarged to about ``tile`` pixels, in one grid. Returns [3,H,W].

    Pairs layout: one row per filter, one column per input channel; otherwise
    :func:`~torchvis.image.grid_columns` columns (32 filters: 8 x 4).
    Raises ``ValueError`` above ``MAX_TILES`` tiles.
    """
    tiles = filters(model, layer, in_channel=in_channel, out_channels=out_channels)
    _, conv = _conv(model, layer)
    pairs = in_channel is None and conv.weight.shape[1] not in (1, 3)
    if tiles.shape[0] > MAX_TILES:
        raise ValueError(f"{tiles.shape[0]} tiles is more than {MAX_TILES}; choose in_channel= or fewer "
                         "out_channels=")
    nrow = conv.weight.shape[1] if pairs else grid_columns(tiles.shape[0])
    return grid(upscale(tiles, tile), nrow=nrow, padding=1, pad_value=1.0)


def log_filters(
    writer: ImagesWriter,
    model: nn.Module,
    layer: LayerRef | None = None,
    *,
    step: int = 0,
    tag: str | None = None,
    in_channel: int | None = None,
    out_channels: Sequence[int] | None = None,
) -> None:
    """Write :func:`filter_grid` as one uint8 ``[1,3,H,W]`` image, tagged ``filters/<layer>`` by default."""
    name, _ = _conv(model, layer)
    image = filter_grid(model, name, in_channel=in_channel, out_channels=out_channels)
    tag = tag or (f"filters/{name}" if name else "filters")
    writer.add_images(tag, to_uint8(image)[None], global_step=step)
