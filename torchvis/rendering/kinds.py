"""What kind of input a map explains, and how each kind is drawn.

=========  ===================  ==================================================================
kind       input                drawn as
=========  ===================  ==================================================================
tabular    ``[B,N]``            a bar chart of the map's :data:`~torchvis.rendering.plots.TOP` (10)
                                strongest features by ``|value|``, named (``feature_names``) and
                                with the input's value; the input itself as grey bars
signal     ``[B,C,L]``          the signal, one line per channel, with the map as a heat strip under
                                it (channels reduced as for images; the strip is resized linearly to
                                ``L`` if the map is coarser, e.g. a CAM with ``upsample=None``)
image      ``[B,C,H,W]``        as always (:func:`torchvis.rendering.image.render_map`); C is 1 or 3
volume     ``[B,C,D,H,W]``      its three central slices side by side (``D/2``: ``[H,W]``, ``H/2``:
                                ``[D,W]``, ``W/2``: ``[D,H]``), each drawn as an image; the map is
                                scaled once per volume, so the slices share one scale
=========  ===================  ==================================================================

A tuple input is drawn one panel per input; a map that is one tensor for a tuple input (the CAMs)
belongs to the first input. Anything else (a 6-D input, a map whose shape does not match its input)
cannot be drawn: the caller says so once with :class:`UndrawableWarning`.

A kind's pictures are either a tensor ``[B,3,H,W]`` in [0, 1] (images, volumes) or one
:data:`~torchvis.rendering.plots.Plot` per example (tables, signals).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor

from torchvis.methods.spec import Look
from torchvis.rendering import image, plots

__all__ = [
    "HEAT",
    "NEGATIVE",
    "POSITIVE",
    "Kind",
    "Pictures",
    "UndrawableWarning",
    "central_slices",
    "display",
    "bar_colours",
    "feature_names_per_input",
    "heat_strip",
    "input_pictures",
    "kind_of",
    "map_pictures",
    "paired",
    "undrawable",
]

Pictures = Tensor | list[plots.Plot]


class Kind(Enum):
    """The kinds of input torchvis draws, by rank."""

    TABULAR = "tabular"  # [B,N]
    SIGNAL = "signal"  # [B,C,L]
    IMAGE = "image"  # [B,C,H,W]
    VOLUME = "volume"  # [B,C,D,H,W]


_BY_RANK = {2: Kind.TABULAR, 3: Kind.SIGNAL, 4: Kind.IMAGE, 5: Kind.VOLUME}


class UndrawableWarning(UserWarning):
    """An input or map torchvis cannot draw (it is left out of the pictures; the rest is drawn)."""


def kind_of(x: Tensor) -> Kind | None:
    """The kind of an input ``[B, ...]`` by its rank; ``None`` when it cannot be drawn."""
    return _BY_RANK.get(x.dim())


def undrawable(x: Tensor, attr: Tensor | None = None) -> str | None:
    """Why the input ``x`` (or the map ``attr`` over it) cannot be drawn; ``None`` when it can."""
    kind = kind_of(x)
    if kind is None:
        return (f"a {x.dim()}-D input of shape {list(x.shape)}; torchvis draws tables [B,N], signals "
                "[B,C,L], images [B,C,H,W] and volumes [B,C,D,H,W]")
    if kind is Kind.IMAGE and x.shape[1] not in (1, 3):
        return f"an image input of shape {list(x.shape)} with {x.shape[1]} channels; images need 1 or 3"
    if attr is None:
        return None
    same_rank = attr.dim() == x.dim() and attr.shape[0] == x.shape[0]
    if not same_rank or (kind is Kind.TABULAR and attr.shape != x.shape):
        return f"a map of shape {list(attr.shape)} over an input of shape {list(x.shape)}"
    return None


def paired(inputs: Sequence[Tensor], value: Tensor | Sequence[Tensor]) -> list[tuple[int, Tensor]]:
    """The maps of one method with the index of the input each explains: a tuple of maps one per
    input, or one map for the first input."""
    if isinstance(value, Tensor):
        return [(0, value)]
    if len(value) != len(inputs):
        raise ValueError(f"a method returned {len(value)} maps for {len(inputs)} inputs")
    return list(enumerate(value))


def feature_names_per_input(
    feature_names: Sequence[str] | Sequence[Sequence[str] | None] | None, inputs: Sequence[Tensor]
) -> list[Sequence[str] | None]:
    """``feature_names`` as one entry per input: one list of names (for the one tabular input), or one
    entry per input (``None`` for inputs that are not tables). Checked against the inputs."""
    if feature_names is None:
        return [None] * len(inputs)
    if isinstance(feature_names, str):
        raise TypeError("feature_names is a list of names, one per feature, not a string")
    entries = list(feature_names)
    tables = [i for i, t in enumerate(inputs) if kind_of(t) is Kind.TABULAR]
    if all(isinstance(n, str) for n in entries):
        if len(tables) != 1:
            raise ValueError(f"one list of feature_names fits one tabular input [B,N]; the inputs have "
                             f"{len(tables)}: pass one entry per input (None for the others)")
        per_input: list[Sequence[str] | None] = [None] * len(inputs)
        per_input[tables[0]] = [str(n) for n in entries]
    else:
        if len(entries) != len(inputs):
            raise ValueError(f"feature_names has {len(entries)} entries for {len(inputs)} inputs")
        per_input = [None if n is None else list(n) for n in entries]
    for i, names in enumerate(per_input):
        if names is None:
            continue
        if i not in tables:
            raise ValueError(f"feature_names for input {i} of shape {list(inputs[i].shape)}: names go with "
                             "tabular inputs [B,N]")
        plots.feature_names_for(inputs[i].shape[1], names)
    return per_input


# --- the inputs as they are shown ----------------------------------------------------------------


def display(x: Tensor, mean: float | Sequence[float] | None, std: float | Sequence[float] | None) -> Tensor:
    """An input as it is shown: images denormalised with ``mean``/``std`` (else as they are, in
    [0, 1]); volumes the same, or scaled to [0, 1] per example when outside it without ``mean``/
    ``std``, then grey (channel mean) unless they have 3 channels; tables and signals as they are."""
    kind = kind_of(x)
    if kind is Kind.IMAGE:
        if mean is None or std is None:
            return x
        c = x.shape[1]
        return image.denormalize(x, image.per_channel(mean, c, "mean"), image.per_channel(std, c, "std"))
    if kind is not Kind.VOLUME:
        return x
    b, c = x.shape[:2]
    flat = x.reshape(b, c, x.shape[2], -1)
    if mean is not None and std is not None:
        flat = image.denormalize(flat, image.per_channel(mean, c, "mean"), image.per_channel(std, c, "std"))
    elif not bool(((flat >= 0) & (flat <= 1)).all()):
        low = flat.flatten(1).amin(dim=1).view(-1, 1, 1, 1)
        span = (flat.flatten(1).amax(dim=1).view(-1, 1, 1, 1) - low).clamp_min(torch.finfo(flat.dtype).tiny)
        flat = (flat - low) / span
    v = flat.reshape(x.shape)
    return v if c == 3 else v.mean(dim=1, keepdim=True)


def central_slices(v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The central slices of volumes ``[B,C,D,H,W]``: ``[B,C,H,W]`` at ``D//2``, ``[B,C,D,W]`` at
    ``H//2`` and ``[B,C,D,H]`` at ``W//2``."""
    d, h, w = v.shape[2:]
    return v[:, :, d // 2], v[:, :, :, h // 2], v[:, :, :, :, w // 2]


def _side_by_side(pictures: Sequence[Tensor], gap: int = 2) -> Tensor:
    """``[B,3,h_i,w_i]`` pictures in one row, top-aligned, ``gap`` white columns between them."""
    height = max(p.shape[2] for p in pictures)
    parts: list[Tensor] = []
    for k, p in enumerate(pictures):
        if k:
            parts.append(torch.ones(p.shape[0], 3, height, gap, dtype=p.dtype, device=p.device))
        parts.append(F.pad(p, (0, 0, 0, height - p.shape[2]), value=1.0))
    return torch.cat(parts, dim=3)


def input_pictures(shown: Tensor, names: Sequence[str] | None = None) -> Pictures:
    """The pictures of an input as :func:`display` shows it (images: the display itself)."""
    kind = kind_of(shown)
    if kind is Kind.IMAGE:
        return shown
    if kind is Kind.VOLUME:
        return _side_by_side([image.to_rgb(s) for s in central_slices(shown)])
    if kind is Kind.SIGNAL:
        return [functools.partial(plots.draw_signal, signal=s, strip=None) for s in shown]
    assert kind is Kind.TABULAR
    labels = plots.feature_names_for(shown.shape[1], names)
    return [functools.partial(plots.draw_values, values=row, names=labels) for row in shown]


def map_pictures(attr: Tensor, shown: Tensor, look: Look, names: Sequence[str] | None = None) -> Pictures:
    """The pictures of a raw map over its input (``shown``: :func:`display`), drawn in ``look``."""
    kind = kind_of(shown)
    attr = attr.detach().float()
    if kind is Kind.IMAGE:
        return image.render_map(attr, shown, look)
    if kind is Kind.VOLUME:
        return _volume_map(attr, shown, look)
    if kind is Kind.SIGNAL:
        strips = heat_strip(attr, look, shown.shape[-1])
        return [functools.partial(plots.draw_signal, signal=s, strip=c)
                for s, c in zip(shown, strips, strict=True)]
    assert kind is Kind.TABULAR
    labels = plots.feature_names_for(shown.shape[1], names)
    colours = bar_colours(attr, look)
    return [functools.partial(plots.draw_bars, values=a, names=labels, colours=c, inputs=x)
            for a, c, x in zip(attr, colours, shown, strict=True)]


def _signed(look: Look) -> bool:
    return look is not Look.HEAT_OVERLAY


def heat_strip(attr: Tensor, look: Look, length: int) -> Tensor:
    """The heat strip of signal maps ``[B,C|1,l]``: ``[B,3,length]`` colours, normalised and coloured
    as an image map would be (:func:`torchvis.rendering.image.normalize`, then ``colorize``)."""
    signed = _signed(look)
    norm = image.normalize(attr[:, :, None, :], signed=signed)  # [B,1,1,l]
    if norm.shape[-1] != length:
        norm = F.interpolate(norm[:, :, 0], size=length, mode="linear", align_corners=False)[:, :, None]
    return image.colorize(norm, signed=signed)[:, :, 0]


POSITIVE, NEGATIVE = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)  # the ends of "bwr": red raises, blue lowers
HEAT = (0.87, 0.32, 0.23)  # a middle colour of "inferno", for magnitude maps


def bar_colours(attr: Tensor, look: Look) -> list[list[tuple[float, float, float]]]:
    """One colour per feature of tabular maps ``[B,N]``: red for positive and blue for negative values
    of signed maps, one warm colour for magnitude maps."""
    if not _signed(look):
        return [[HEAT] * attr.shape[1] for _ in range(attr.shape[0])]
    return [[POSITIVE if v >= 0 else NEGATIVE for v in row] for row in attr.tolist()]


def _volume_map(attr: Tensor, shown: Tensor, look: Look) -> Tensor:
    if attr.shape[2:] != shown.shape[2:]:
        attr = F.interpolate(attr, size=shown.shape[2:], mode="trilinear", align_corners=False)
    b, c = attr.shape[:2]
    flat = attr.reshape(b, c, attr.shape[2], -1)  # one scale per volume
    if look is Look.RGB and c == 3:
        return _side_by_side(central_slices(image.normalize_rgb(flat).reshape(attr.shape)))
    signed = _signed(look)
    norm = image.normalize(flat, signed=signed).reshape(b, 1, *attr.shape[2:])
    pictures = []
    for heat, under in zip(central_slices(norm), central_slices(shown), strict=True):
        colours = image.colorize(heat, signed=signed)
        pictures.append(colours if look is Look.SIGNED or look is Look.RGB else image.overlay(colours, under))
    return _side_by_side(pictures)
