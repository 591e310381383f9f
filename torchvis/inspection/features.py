"""Feature maps: a layer's activations for an input, and a picture with one tile per channel.

Rendering scales every tile on its own (min to black, max to white, per example and channel), so each
channel's pattern is visible; brightness is therefore not comparable between tiles — compare the raw
values from :func:`feature_maps` for that. A constant tile is black.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from matplotlib.colors import Colormap
from torch import Tensor, nn

from torchvis.core.forward import check_input, guarded
from torchvis.core.hooks import LayerRef, capture, forward_hooks, resolve_layer
from torchvis.inspection.conv_filters import ImagesWriter, checked_indices, upscale
from torchvis.rendering.image import colorize, grid, grid_columns, to_uint8

__all__ = ["feature_grid", "feature_maps", "log_feature_maps", "top_channels"]


def top_channels(maps: Tensor, k: int) -> Tensor:
    """Per example, the ``k`` channels of ``maps`` [B,K,h,w] with the largest spatial mean, largest
    first (ties: lower index first). Returns [B,k] int64."""
    if maps.dim() != 4:
        raise ValueError(f"maps must be [B,K,h,w], got shape {list(maps.shape)}")
    if not 1 <= k <= maps.shape[1]:
        raise ValueError(f"top_k must be between 1 and the layer's {maps.shape[1]} channels, got {k}")
    means = maps.mean(dim=(2, 3))
    return means.sort(dim=1, descending=True, stable=True).indices[:, :k]


def feature_maps(
    model: nn.Module,
    x: Tensor,
    layer: LayerRef,
    *,
    channels: Sequence[int] | None = None,
    top_k: int | None = None,
) -> Tensor:
    """The activations of ``layer`` for ``x`` [B,C,H,W]. Returns [B,K,h,w], detached.

    All channels by default; ``channels`` picks some (in that order); ``top_k`` picks, per example,
    the ``k`` most active (:func:`top_channels`). The forward runs in eval mode under ``no_grad``;
    modes and global RNG are restored. A module called several times yields its last call.
    """
    check_input(x)
    if channels is not None and top_k is not None:
        raise ValueError("give channels or top_k, not both")
    name, _ = resolve_layer(model, layer)
    spatial: dict[str, None] = {}  # names of layers with 4-D outputs, in order, for the error message

    def note(layer_name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if isinstance(output, Tensor) and output.dim() == 4:
                spatial[layer_name] = None

        return hook

    named = [(m, note(n)) for n, m in model.named_modules() if n]
    with guarded(model, x, grad=False), torch.no_grad(), capture(model, [name]) as rec, forward_hooks(named):
        model(x)
    out = rec.output(name).detach()
    if out.dim() != 4:
        listed = ", ".join(repr(n) for n in list(spatial)[-12:]) or "none"
        raise ValueError(f"layer {name!r} outputs shape {list(out.shape)}, not a feature map [B,K,h,w]; "
                         f"layers with feature maps (last 12): {listed}")
    if channels is not None:
        return out[:, checked_indices(out.shape[1], channels, "channel", f"layer {name!r}")]
    if top_k is not None:
        index_t = top_channels(out, top_k)
        return out.gather(1, index_t[:, :, None, None].expand(-1, -1, *out.shape[2:]))
    return out


def feature_grid(
    maps: Tensor, *, nrow: int | None = None, tile: int = 32, cmap: str | Colormap | None = None
) -> Tensor:
    """One grid per example of ``maps`` [B,K,h,w], a tile per channel. Returns [B,3,H',W'] in [0, 1].

    Tiles are min-max scaled on their own, enlarged (nearest) to about ``tile`` pixels and laid out
    ``nrow`` per row (default :func:`~torchvis.image.grid_columns`: rows as full as possible, 32
    channels as 8 x 4); grey, or through colour map ``cmap``.
    """
    if maps.dim() != 4 or not maps.is_floating_point() or maps.numel() == 0:
        raise ValueError(f"maps must be a non-empty floating [B,K,h,w] tensor, got {maps.dtype} "
                         f"{list(maps.shape)}")
    if not bool(torch.isfinite(maps).all()):
        raise ValueError("maps hold NaN or inf values; a picture of them would be misleading")
    b, k, h, w = maps.shape
    low = maps.amin(dim=(2, 3), keepdim=True)
    span = maps.amax(dim=(2, 3), keepdim=True) - low
    norm = torch.where(span > 0, (maps - low) / span.clamp_min(torch.finfo(maps.dtype).tiny), 0.0).clamp(0, 1)
    tiles = norm.reshape(b * k, 1, h, w)
    if cmap is not None:
        tiles = colorize(tiles, cmap)
    tiles = upscale(tiles, tile).unflatten(0, (b, k))
    per_row = nrow or grid_columns(k)
    return torch.stack([grid(t, nrow=per_row, padding=1, pad_value=1.0) for t in tiles])


def log_feature_maps(
    writer: ImagesWriter,
    model: nn.Module,
    x: Tensor,
    layer: LayerRef,
    *,
    step: int = 0,
    tag: str | None = None,
    channels: Sequence[int] | None = None,
    top_k: int | None = None,
    cmap: str | Colormap | None = None,
    tile: int = 32,
) -> None:
    """Write :func:`feature_grid` of :func:`feature_maps` (tiles of about ``tile`` pixels): example ``b``
    as a uint8 ``[1,3,H,W]`` image tagged ``<tag>/<b>``, ``tag`` being ``features/<layer>`` by default
    (one picture per example: ``add_images`` would tile a batch of grids into one picture, with no
    visible border between them)."""
    name, _ = resolve_layer(model, layer)
    maps = feature_maps(model, x, name, channels=channels, top_k=top_k)
    for b, image in enumerate(to_uint8(feature_grid(maps.float(), cmap=cmap, tile=tile))):
        writer.add_images(f"{tag or f'features/{name}'}/{b}", image[None], global_step=step)
