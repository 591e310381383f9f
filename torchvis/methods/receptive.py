"""Receptive-field arithmetic for incremental occlusion: where a change can reach, and patches.

A window's change to the input reaches, in each layer, a rectangle of that layer's output: its
receptive-field projection. :func:`project` carries the rectangles of all windows through one
sliding-window layer (convolution, pooling); :func:`union` merges them where branches meet.
:func:`place` gives every window a patch of one fixed size per layer that covers its rectangle,
shifted inwards at the borders, so that the patches of many windows stack into one batch;
:func:`gather` and :func:`paste` move between patches and full activations.

Nakandala, Kumar & Papakonstantinou, "Incremental and Approximate Inference for Faster Occlusion-based
Deep CNN Explanations" (Krypton), SIGMOD 2019.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Region:
    """Per window, the half-open rows ``[top, bottom)`` and columns ``[left, right)`` of a layer's
    output that may differ from the clean activation (int64 ``[windows]`` on the CPU). A window
    whose change does not reach the layer (a strided 1x1 convolution can skip it) is empty."""

    top: Tensor
    bottom: Tensor
    left: Tensor
    right: Tensor

    def empty(self) -> Tensor:
        return (self.bottom <= self.top) | (self.right <= self.left)


@dataclass(frozen=True)
class Sliding:
    """A sliding-window layer, per axis (rows, columns): output ``o`` reads inputs
    ``o*stride - padding + j*dilation`` for ``j < kernel``."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    def span(self, size: tuple[int, int]) -> tuple[int, int]:
        """Input rows and columns that an output patch of ``size`` reads."""
        return (
            (size[0] - 1) * self.stride[0] + (self.kernel[0] - 1) * self.dilation[0] + 1,
            (size[1] - 1) * self.stride[1] + (self.kernel[1] - 1) * self.dilation[1] + 1,
        )


def _project_axis(lo: Tensor, hi: Tensor, axis: int, op: Sliding, size: int) -> tuple[Tensor, Tensor]:
    k, s, p, d = op.kernel[axis], op.stride[axis], op.padding[axis], op.dilation[axis]
    first = -torch.div(-(lo + p - (k - 1) * d), s, rounding_mode="floor")  # ceil division
    last = torch.div(hi - 1 + p, s, rounding_mode="floor")
    return first.clamp(min=0), (last + 1).clamp(max=size)


def project(region: Region, op: Sliding, size: tuple[int, int]) -> Region:
    """The output rectangles that ``op`` computes from the input rectangles ``region``; ``size`` is
    the output's height and width."""
    top, bottom = _project_axis(region.top, region.bottom, 0, op, size[0])
    left, right = _project_axis(region.left, region.right, 1, op, size[1])
    empty = region.empty() | (bottom <= top) | (right <= left)
    return Region(top, torch.where(empty, top, bottom), left, torch.where(empty, left, right))


def union(regions: list[Region]) -> Region:
    """Per window, the smallest rectangle holding every non-empty rectangle of ``regions``."""
    empty = torch.stack([r.empty() for r in regions])
    big = torch.iinfo(torch.int64).max

    def lowest(values: list[Tensor]) -> Tensor:
        return torch.stack(values).masked_fill(empty, big).amin(0)

    def highest(values: list[Tensor]) -> Tensor:
        return torch.stack(values).masked_fill(empty, -1).amax(0)

    top, left = lowest([r.top for r in regions]), lowest([r.left for r in regions])
    bottom, right = highest([r.bottom for r in regions]), highest([r.right for r in regions])
    none = empty.all(0)
    zero = torch.zeros_like(top)
    return Region(
        torch.where(none, zero, top), torch.where(none, zero, bottom),
        torch.where(none, zero, left), torch.where(none, zero, right),
    )


@dataclass(frozen=True)
class Placement:
    """Patches of one ``size`` for every window, at ``top``/``left`` (int64 ``[windows]``, CPU)."""

    size: tuple[int, int]
    top: Tensor
    left: Tensor


def place(region: Region, full: tuple[int, int]) -> Placement:
    """The smallest common patch size that holds every window's rectangle, each patch starting at
    its rectangle and moved inwards where it would cross the far border of the ``full`` map."""
    heights = (region.bottom - region.top).clamp(min=0)
    widths = (region.right - region.left).clamp(min=0)
    size = (
        min(full[0], max(1, int(heights.max()))),
        min(full[1], max(1, int(widths.max()))),
    )
    top = region.top.clamp(max=full[0] - size[0]).clamp(min=0)
    left = region.left.clamp(max=full[1] - size[1]).clamp(min=0)
    return Placement(size, top, left)


@dataclass(frozen=True)
class Patch:
    """One patch per item: ``values`` ``[N,C,h,w]`` of the occluded activation, whose top-left
    corners sit at ``top``/``left`` (int64 ``[N]`` on the values' device)."""

    values: Tensor
    top: Tensor
    left: Tensor


def gather(
    clean: Tensor,
    examples: Tensor,
    start: tuple[Tensor, Tensor],
    size: tuple[int, int],
    patch: Patch | None = None,
    offset: tuple[int, int] = (0, 0),
) -> Tensor:
    """Rows ``start[0][n] ...`` and columns ``start[1][n] ...`` (``size`` of each) of item ``n``'s
    activation: ``patch`` where it covers them, the clean activation ``clean[examples[n]]`` elsewhere.
    ``clean`` may be padded by ``offset`` rows and columns at the top and left (and enough at the
    far sides): then starts may be negative. Returns ``[N,C,size]`` (channels-last in memory)."""
    device = clean.device
    rows = start[0][:, None] + torch.arange(size[0], device=device)
    cols = start[1][:, None] + torch.arange(size[1], device=device)
    out = clean[examples[:, None, None], :, (rows + offset[0])[:, :, None], (cols + offset[1])[:, None, :]]
    if patch is not None:  # [N, h, w, C] so far
        values, (ph, pw) = patch.values, patch.values.shape[-2:]
        pr, pc = rows - patch.top[:, None], cols - patch.left[:, None]
        inside = ((pr >= 0) & (pr < ph))[:, :, None] & ((pc >= 0) & (pc < pw))[:, None, :]
        items = torch.arange(values.shape[0], device=device)
        from_patch = values[
            items[:, None, None], :, pr.clamp(0, ph - 1)[:, :, None], pc.clamp(0, pw - 1)[:, None, :]
        ]
        out = torch.where(inside[..., None], from_patch.to(out.dtype), out)
    return out.permute(0, 3, 1, 2)


def paste(clean: Tensor, examples: Tensor, patch: Patch) -> Tensor:
    """Full activations ``[N,C,H,W]``: a copy of ``clean[examples]`` with each item's patch pasted in
    (a patch always lies inside the map)."""
    out = clean.index_select(0, examples)
    values = patch.values
    ph, pw = values.shape[-2:]
    device = values.device
    rows = patch.top[:, None] + torch.arange(ph, device=device)
    cols = patch.left[:, None] + torch.arange(pw, device=device)
    items = torch.arange(values.shape[0], device=device)
    rows, cols = rows[:, :, None], cols[:, None, :]
    out[items[:, None, None], :, rows, cols] = values.permute(0, 2, 3, 1).to(out.dtype)
    return out
