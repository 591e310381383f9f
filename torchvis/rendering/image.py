"""Turn raw attribution tensors into images in [0, 1].

Pure tensor functions: no hooks, no model, no I/O. Results stay on the input's device and dtype.

- ``normalize(attr, *, signed=False, percentile=99.5)``: ``[B,C,H,W]`` raw map -> ``[B,1,H,W]``,
  in [0, 1] (magnitude) or [-1, 1] (signed, zero stays exactly zero).
- ``normalize_rgb(attr, *, percentile=99.5)``: ``[B,C,H,W]`` -> ``[B,C,H,W]`` in [0, 1], zero at
  0.5 and colour kept (guided-backprop style "RGB gradient" pictures).
- ``colorize(norm, cmap=None, *, signed=False)``: ``[B,1,H,W]`` -> ``[B,3,H,W]`` through a
  matplotlib colour map.
- ``overlay(heat, image, *, alpha=0.5)``: blend ``[B,3,h,w]`` colours over ``[B,1|3,H,W]`` images.
- ``denormalize(x, mean, std)``: undo ``(x - mean) / std`` per channel, clamped to [0, 1].
- ``to_rgb(images)``: ``[B,1|3,H,W]`` -> ``[B,3,H,W]`` (grey is repeated).
- ``grid(images, *, nrow=8, padding=2, pad_value=0.0)``: tile ``[B,1|3,H,W]`` -> ``[3,H',W']``;
  ``grid_columns(count)`` picks ``nrow`` so the rows come out even (10 tiles: 5 + 5, not 8 + 2).
- ``enlarge(images)``: repeat pixels (nearest neighbour) of images under :data:`LEGIBLE` (96) px on
  the short side by a whole factor, for display (a 28 px digit becomes 112 px).
- ``panel(inputs, maps, *, padding=2, pad_value=1.0)``: rows = examples, columns = input + maps.
- ``render(attr, image=None, *, signed=False, cmap=None, alpha=0.5, percentile=99.5)``: the
  common case, ``normalize`` -> ``colorize`` -> ``overlay``, returning ``[B,3,H,W]``.

Policies. Channels are reduced by max of ``|v|`` for magnitude maps (Simonyan et al., 2014) and by
sum for signed maps (keeps the sign, and a pixel's total contribution for gradient x input or
integrated gradients). Scales use the per-image nearest-rank 99.5th percentile of ``|v|`` so a few
hot pixels cannot wash out the rest. A map that is constant (within float rounding) maps to 0 —
white in the diverging map — instead of dividing by zero. NaN or inf anywhere raises ValueError,
as does every wrong shape, dtype, range or name: a wrong picture is worse than no picture.
Default colour maps: "inferno" (perceptually uniform, monotone lightness, so it survives greyscale
printing and colour blindness without the false edges of "jet") and "bwr" (exactly white at zero,
red = positive evidence as in Captum and LRP papers).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import Colormap
from torch import Tensor
from torchvision.utils import make_grid

from torchvis.methods.spec import SPECS, Look

__all__ = [
    "Look",
    "look_of",
    "render_map",
    "colorize",
    "denormalize",
    "display_factor",
    "enlarge",
    "grid",
    "grid_columns",
    "normalize",
    "normalize_rgb",
    "overlay",
    "panel",
    "per_channel",
    "render",
    "to_rgb",
    "to_uint8",
]

SEQUENTIAL = "inferno"
DIVERGING = "bwr"


def _check_batch(x: Tensor, name: str, channels: tuple[int, ...] = ()) -> None:
    if x.dim() != 4:
        hint = " (one image: x.unsqueeze(0); a [B,H,W] map: x.unsqueeze(1))" if x.dim() == 3 else ""
        raise ValueError(f"{name} must be 4-D [B,C,H,W], got shape {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    if channels and x.shape[1] not in channels:
        raise ValueError(f"{name} must have {' or '.join(map(str, channels))} channels, "
                         f"got shape {tuple(x.shape)}")


def _check_finite(x: Tensor, name: str) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        images = bad.flatten(1).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"{name} has {int(bad.sum())} NaN/inf values (in images {images[:8]}); "
                         "fix the method or replace them explicitly, e.g. torch.nan_to_num")


def _check_range(x: Tensor, name: str, low: float, hint: str) -> None:
    # Written as a negated conjunction so NaN fails too.
    if not bool(((x >= low) & (x <= 1)).all()):
        raise ValueError(f"{name} must lie in [{low:g}, 1], found values in "
                         f"[{x.min().item():.4g}, {x.max().item():.4g}]; {hint}")


def _check_percentile(percentile: float) -> None:
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")


def _span(a: Tensor, low: Tensor, percentile: float) -> Tensor:
    """Per-image scale of ``a`` [B,N] (>= 0) above ``low`` [B]: the percentile minus ``low``.

    Returns [B]. Infinite for a flat image, so dividing by it gives 0 instead of NaN.
    """
    n = a.shape[1]
    k = min(max(math.ceil(percentile / 100 * n), 1), n)  # nearest rank: hi is a value of the map
    hi = a.kthvalue(k, dim=1).values
    top = a.amax(dim=1)
    tol = torch.finfo(a.dtype).eps * top
    # A sparse map (more than 100 - percentile % at its minimum) would otherwise scale to all 0.
    hi = torch.where(hi - low > tol, hi, top)
    span = hi - low
    return torch.where(span > tol, span, torch.full_like(span, math.inf))


def normalize(attr: Tensor, *, signed: bool = False, percentile: float = 99.5) -> Tensor:
    """Scale a raw attribution map per image, clipping at ``percentile`` of ``|value|``.

    ``attr`` is [B,C,H,W]; C > 1 is reduced by max of ``|v|`` (magnitude) or by sum (signed).
    Returns [B,1,H,W]: magnitude in [0, 1] with the image's minimum ``|v|`` at 0 and its
    percentile at 1; signed in [-1, 1] with zero kept exactly at 0 and the percentile of ``|v|``
    at +-1. A constant magnitude map, or an all-zero signed map, gives 0. Raises ValueError on
    NaN/inf.
    """
    _check_batch(attr, "attr")
    _check_finite(attr, "attr")
    _check_percentile(percentile)
    if signed:
        m = attr.sum(dim=1, keepdim=True)
        low = torch.zeros(m.shape[0], dtype=m.dtype, device=m.device)
    else:
        m = attr.abs().amax(dim=1, keepdim=True)
        low = m.flatten(1).amin(dim=1)
    span = _span(m.abs().flatten(1), low, percentile).view(-1, 1, 1, 1)
    if signed:
        return (m / span).clamp(-1, 1)
    return ((m - low.view(-1, 1, 1, 1)) / span).clamp(0, 1)


def normalize_rgb(attr: Tensor, *, percentile: float = 99.5) -> Tensor:
    """Keep the channels of a signed map (guided backprop of an RGB input) as a picture.

    ``attr`` is [B,C,H,W]. Returns [B,C,H,W] in [0, 1]: 0.5 + 0.5 * v / p, where p is the
    image's percentile of ``|v|`` over all channels, so zero is mid-grey and the channel balance
    is kept. An all-zero image gives 0.5.
    """
    _check_batch(attr, "attr")
    _check_finite(attr, "attr")
    _check_percentile(percentile)
    a = attr.abs().flatten(1)
    span = _span(a, torch.zeros_like(a[:, 0]), percentile).view(-1, 1, 1, 1)
    return (0.5 + 0.5 * attr / span).clamp(0, 1)


def _colormap(cmap: str | Colormap) -> Colormap:
    if isinstance(cmap, Colormap):
        return cmap
    try:
        return matplotlib.colormaps[cmap]
    except KeyError:
        close = difflib.get_close_matches(cmap, list(matplotlib.colormaps), n=5, cutoff=0.5)
        raise ValueError(f"unknown colour map {cmap!r}; close matches: {close}; "
                         "any name in matplotlib.colormaps works") from None


def colorize(norm: Tensor, cmap: str | Colormap | None = None, *, signed: bool = False) -> Tensor:
    """Map a normalised [B,1,H,W] map through a matplotlib colour map. Returns [B,3,H,W].

    Magnitude maps (``signed=False``, values in [0, 1], default "inferno") get exactly
    ``cmap(v)``. Signed maps (values in [-1, 1], default "bwr") get ``cmap(0.5 + v / 2)`` on a
    table resampled to an odd size, so 0 hits the colour map's exact centre (white for "bwr") and
    +v, -v get mirrored entries. The alpha channel of the colour map is dropped.
    """
    _check_batch(norm, "norm", (1,))
    low = -1.0 if signed else 0.0
    _check_range(norm, "norm", low, "pass the map through normalize() first")
    cm = _colormap(cmap if cmap is not None else DIVERGING if signed else SEQUENTIAL)
    n = cm.N | 1 if signed else cm.N  # an odd table has an entry at exactly 0.5
    table = cm if n == cm.N else cm.resampled(n)
    lut = torch.from_numpy(np.asarray(table(np.arange(n)))[:, :3])
    lut = lut.to(device=norm.device, dtype=norm.dtype)
    t = (norm[:, 0] + 1) / 2 if signed else norm[:, 0]
    # matplotlib's own indexing (floor(t * N), t = 1 -> last entry) so results equal cmap(t).
    index = (t * n).floor().long().clamp(0, n - 1)
    return lut[index].permute(0, 3, 1, 2).contiguous()


def to_rgb(images: Tensor) -> Tensor:
    """Repeat grey [B,1,H,W] images to [B,3,H,W]; [B,3,H,W] is returned as is."""
    _check_batch(images, "images", (1, 3))
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images


def per_channel(values: float | Sequence[float], channels: int, what: str) -> tuple[float, ...]:
    """A normalisation statistic given as one float (every channel) or one value per channel, as a
    tuple of ``channels`` floats — the form :func:`denormalize` takes."""
    if isinstance(values, (int, float)):
        return (float(values),) * channels
    out = tuple(float(v) for v in values)
    if len(out) == 1:
        return out * channels
    if len(out) != channels:
        raise ValueError(f"{what} needs one value per input channel ({channels}); got {len(out)}")
    return out


def denormalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Undo ``(image - mean) / std`` per channel and clamp to [0, 1]. Returns [B,C,H,W].

    Example: ``denormalize(x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))`` for ImageNet.
    """
    _check_batch(x, "x")
    c = x.shape[1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean and std need one entry per channel ({c}), "
                         f"got {len(mean)} and {len(std)}")
    if not all(s > 0 for s in std):
        raise ValueError(f"std entries must be positive, got {tuple(std)}")
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
    return (x * s + m).clamp(0, 1)


def overlay(heat: Tensor, image: Tensor, *, alpha: float = 0.5) -> Tensor:
    """Blend ``(1 - alpha) * image + alpha * heat``. Returns [B,3,H,W] at the image's size.

    ``heat`` is [B,1|3,h,w] in [0, 1] (usually from ``colorize``), resized bilinearly to the
    image's H, W if they differ. ``image`` is [B,1|3,H,W] in [0, 1] (see ``denormalize``).
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    _check_batch(heat, "heat", (1, 3))
    _check_batch(image, "image", (1, 3))
    if heat.shape[0] != image.shape[0]:
        raise ValueError(f"heat and image batch sizes differ: {tuple(heat.shape)} vs "
                         f"{tuple(image.shape)}")
    _check_range(heat, "heat", 0, "colorize() a normalised map first")
    _check_range(image, "image", 0, "undo input normalisation with denormalize() first")
    size = image.shape[-2:]
    if heat.shape[-2:] != size:
        heat = F.interpolate(heat, size=size, mode="bilinear", align_corners=False)
    return (1 - alpha) * to_rgb(image) + alpha * to_rgb(heat)


def to_uint8(picture: Tensor) -> Tensor:
    """Pictures in [0, 1] (any shape) as uint8 on the CPU, rounded: what image sinks store, so they
    need not guess a scale (one device-to-host copy)."""
    return (picture * 255).round_().to(torch.uint8).cpu()


def grid(images: Tensor, *, nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> Tensor:
    """Tile [B,1|3,H,W] images in [0, 1], ``nrow`` per row (torchvision's ``make_grid``, checked).

    Returns [3, R * (H + padding) + padding, n * (W + padding) + padding] with R rows and
    n = min(nrow, B) columns; tile k starts at row ``padding + (k // n) * (H + padding)`` and
    column ``padding + (k % n) * (W + padding)``. Unlike ``make_grid``, one image is padded too.
    """
    _check_batch(images, "images", (1, 3))
    _check_range(images, "images", 0, "denormalize() inputs or colorize() maps first")
    if nrow < 1 or padding < 0 or not 0 <= pad_value <= 1:
        raise ValueError(f"need nrow >= 1, padding >= 0, pad_value in [0, 1]; "
                         f"got {nrow}, {padding}, {pad_value}")
    x = to_rgb(images)
    if x.shape[0] == 1:  # make_grid returns a lone image as it is, without its border
        return F.pad(x[0], (padding,) * 4, value=pad_value)
    return make_grid(x, nrow=nrow, padding=padding, pad_value=pad_value)


def grid_columns(count: int, *, widest: int = 8) -> int:
    """Columns for a grid of ``count`` tiles: at least as wide as tall, rows as full as possible.

    Among 1..max(``widest``, ceil(sqrt(count))) columns, take a grid with no more rows than columns
    (screens are wide), then the fewest empty cells in the last row, then the squarest: 10 tiles ->
    5 (5 + 5, not 8 + 2), 12 -> 4 (4 x 3), 7 -> 7 (a prime: one full row), 11 -> 4 (4 + 4 + 3), 64 -> 8.
    """
    if count < 1:
        raise ValueError(f"a grid needs at least one tile, got {count}")
    most = max(widest, math.isqrt(count - 1) + 1)

    def badness(cols: int) -> tuple[bool, int, int]:
        rows = math.ceil(count / cols)
        return cols < rows, rows * cols - count, abs(cols - rows)

    return min(range(1, min(most, count) + 1), key=badness)


LEGIBLE = 96
"""Short side, in pixels, below which :func:`enlarge` repeats pixels for display."""


def display_factor(height: int, width: int, *, legible: int = LEGIBLE) -> int:
    """The whole factor that brings an image's short side to at least ``legible`` pixels (1 if it is
    already there): 28 -> 4 (112 px), 32 -> 3 (96 px), 64 -> 2, 96 and up -> 1."""
    short = min(height, width)
    if short < 1 or legible < 1:
        raise ValueError(f"need a positive image size and legible size, got {height}x{width}, {legible}")
    return max(1, math.ceil(legible / short))


def enlarge(images: Tensor, *, legible: int = LEGIBLE) -> Tensor:
    """Repeat each pixel of ``[B,C,H,W]`` :func:`display_factor` times along both axes (nearest
    neighbour, so a pixel stays a sharp square). Returns ``[B,C,f*H,f*W]``; as is when f is 1."""
    _check_batch(images, "images")
    factor = display_factor(*images.shape[-2:], legible=legible)
    if factor == 1:
        return images
    return images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def panel(inputs: Tensor, maps: Sequence[Tensor], *, padding: int = 2,
          pad_value: float = 1.0) -> Tensor:
    """Summary figure: row b holds ``inputs[b]`` then ``maps[0][b]``, ``maps[1][b]``, ...

    ``inputs`` and every map are [B,1|3,H,W] in [0, 1] with the same B, H, W (e.g. ``render``
    outputs with ``image=inputs``). Returns [3,H',W'] as ``grid`` with ``nrow = 1 + len(maps)``.
    """
    columns = [to_rgb(inputs), *(to_rgb(m) for m in maps)]
    for i, col in enumerate(columns[1:]):
        if col.shape != columns[0].shape:
            raise ValueError(f"maps[{i}] has shape {tuple(maps[i].shape)}, inputs have "
                             f"{tuple(inputs.shape)}; B, H and W must match (render(..., image=))")
    tiles = torch.stack(columns, dim=1).flatten(0, 1)  # example-major: input, then its maps
    return grid(tiles, nrow=len(columns), padding=padding, pad_value=pad_value)


def render(attr: Tensor, image: Tensor | None = None, *, signed: bool = False,
           cmap: str | Colormap | None = None, alpha: float = 0.5,
           percentile: float = 99.5) -> Tensor:
    """``normalize`` -> ``colorize`` -> ``overlay`` on ``image`` if given. Returns [B,3,H,W].

    ``attr`` is a raw [B,C,h,w] map; ``image`` is [B,1|3,H,W] in [0, 1]. The output has the
    image's H, W, else the map's.
    """
    norm = normalize(attr, signed=signed, percentile=percentile)
    if image is None:
        return colorize(norm, cmap, signed=signed)
    _check_batch(image, "image", (1, 3))
    if norm.shape[-2:] != image.shape[-2:]:
        # Resize the scalar map, not its colours: blending two entries of a colour map gives a
        # colour off the map (blue + red = purple, where "bwr" says white).
        norm = F.interpolate(norm, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return overlay(colorize(norm, cmap, signed=signed), image, alpha=alpha)


# --- a look per method ------------------------------------------------------------------------

def look_of(key: str, overrides: Mapping[str, Look] | None = None) -> Look:
    """The look of a map keyed by method name (``"grad_cam/layer4"`` counts as ``"grad_cam"``): the
    override if given, else the registered method's (:class:`torchvis.methods.spec.MethodSpec`), else
    ``Look.SIGNED``."""
    method = key.split("/")[0]
    if overrides and method in overrides:
        return overrides[method]
    return SPECS[method].look if method in SPECS else Look.SIGNED


def render_map(attr: Tensor, display: Tensor, look: Look) -> Tensor:
    """A raw map ``[B,C,h,w]`` drawn in ``look``: pictures ``[B,3,H,W]`` in [0, 1], where ``display``
    ``[B,1|3,H,W]`` in [0, 1] is the input (for overlays)."""
    if look is Look.RGB and attr.shape[1] == 3:
        return normalize_rgb(attr)
    if look is Look.HEAT_OVERLAY:
        return render(attr, display)
    if look is Look.SIGNED_OVERLAY:
        return render(attr, display, signed=True)
    return render(attr, signed=True)
