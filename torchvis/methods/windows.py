"""Occlusion windows over inputs of any shape: what ``window=`` and ``stride=`` mean, where the
windows sit, and how per-window values spread back onto the input.

An input ``[B, d_1, ..., d_r]`` is occluded by a box that slides over its dimensions. ``window`` is
either **full**, ``r`` sizes, one per non-batch dimension (Captum's ``sliding_window_shapes``; the map
has the input's shape), or **spatial**, ``r - 1`` sizes for every dimension after the first, which
is then taken as channels and covered whole (the map has one channel, ``[B, 1, d_2, ..., d_r]``).
An ``int`` ``k`` is spatial for inputs with channels — ``k x k`` pixels over all channels for an
image ``[B,C,H,W]`` (torchvis's meaning since the first version), ``k`` time steps over all channels
for a signal ``[B,C,L]``, a ``k^3`` cube for a volume ``[B,C,D,H,W]`` — and ``k`` consecutive
features for a row of features ``[B,N]`` (full: the map is ``[B,N]``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from torch import Tensor

__all__ = ["Grid", "grids", "spread", "window_starts"]

_SPATIAL_NAMES = {1: "length", 2: "height, width", 3: "depth, height, width"}


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets along one axis: from 0 in steps of ``stride`` until a window reaches the far
    edge; the last window may be cut off at the border, so every element is covered."""
    starts = [0]
    while starts[-1] + window < size:
        starts.append(starts[-1] + stride)
    return starts


@dataclass(frozen=True)
class Grid:
    """The windows of one input ``[B, *shape]``.

    ``lead`` leading non-batch dimensions are covered whole (1 for a spatial window, 0 for a full
    one); ``size``, ``window``, ``stride`` and ``starts`` describe the dimensions after them, where
    the windows slide; ``positions`` lists every window's start, in row-major order.
    """

    shape: tuple[int, ...]
    lead: int
    size: tuple[int, ...]
    window: tuple[int, ...]
    stride: tuple[int, ...]

    @cached_property
    def starts(self) -> tuple[list[int], ...]:
        steps = zip(self.size, self.window, self.stride, strict=True)
        return tuple(window_starts(n, w, s) for n, w, s in steps)

    @cached_property
    def positions(self) -> list[tuple[int, ...]]:
        return list(itertools.product(*self.starts))

    def box(self, start: Sequence[int]) -> tuple[slice, ...]:
        """The index of the window at ``start`` over the non-batch dimensions (cut off at the border
        by slicing)."""
        boxed = [slice(None)] * self.lead
        boxed += [slice(s, s + w) for s, w in zip(start, self.window, strict=True)]
        return tuple(boxed)

    @cached_property
    def boxes(self) -> list[tuple[slice, ...]]:
        """:meth:`box` of every window, in the order of :attr:`positions`."""
        return [self.box(start) for start in self.positions]


def _name(index: int | None) -> str:
    return "x" if index is None else f"x[{index}]"


def _forms(rank: int) -> str:
    """What a window may be for an input of ``rank`` non-batch dimensions, for error messages."""
    if rank == 1:
        return "an int or a tuple of 1 int (consecutive features)"
    spatial = "a pair of ints" if rank == 3 else f"a tuple of {rank - 1} ints"
    names = _SPATIAL_NAMES.get(rank - 1, "the dimensions after the first")
    return f"an int or {spatial} ({names}: all channels), or {rank} ints (one per dimension)"


def _ints(value: Any) -> tuple[int, ...] | None:
    """``value`` as a tuple of ints, or None if it is not an int or a tuple/list of ints."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return None
    return values


def _grid(shape: tuple[int, ...], window: Any, stride: Any, index: int | None) -> Grid:
    rank = len(shape)
    name = _name(index)
    sizes = _ints(window)
    lengths = (1,) if rank == 1 else (rank - 1, rank)
    if sizes is None or (len(sizes) not in lengths and not isinstance(window, int)):
        raise TypeError(
            f"window{'' if index is None else f'[{index}]'} must be {_forms(rank)} for {name} of shape "
            f"[B, {', '.join(map(str, shape))}]; got {window!r}"
        )
    spatial = rank > 1 and (isinstance(window, int) or len(sizes) == rank - 1)
    lead = 1 if spatial else 0
    size = shape[lead:]
    if isinstance(window, int):
        sizes = (window,) * len(size)
    image = rank == 3 and spatial
    where = f"the image {size}" if image else f"{name} {size}"
    if not all(0 < w <= n for w, n in zip(sizes, size, strict=True)):
        raise ValueError(f"window {sizes} must be positive and fit {where}")
    if stride is None:
        steps = tuple(max(1, w // 2) for w in sizes)
    else:
        given = _ints(stride)
        if given is None or (len(given) != len(sizes) and not isinstance(stride, int)):
            what = "a pair of ints" if len(sizes) == 2 else f"a tuple of {len(sizes)} ints"
            raise TypeError(
                f"stride{'' if index is None else f'[{index}]'} must be an int or {what}, like the window "
                f"{sizes}; got {stride!r}"
            )
        steps = (stride,) * len(sizes) if isinstance(stride, int) else given
    if any(s <= 0 for s in steps):
        raise ValueError(f"stride must be positive; got {steps}")
    # A window that covers its dimension runs once whatever the stride.
    if any(s > w and w < n for s, w, n in zip(steps, sizes, size, strict=True)):
        raise ValueError(f"stride {steps} larger than the window {sizes} would skip elements of {name}")
    return Grid(shape, lead, size, sizes, steps)


def _per_input(value: Any, count: int, what: str) -> list[Any]:
    """One ``value`` per input: for a tuple ``x``, ``value`` is a tuple with one entry per input (an
    ``int`` or ``None`` is the same for all)."""
    if value is None or isinstance(value, int):
        return [value] * count
    if not isinstance(value, (tuple, list)) or len(value) != count:
        got = f"{len(value)} entries" if isinstance(value, (tuple, list)) else repr(value)
        raise TypeError(
            f"x is a tuple of {count} inputs, so {what} must be one per input (a tuple of {count}, "
            f"e.g. {what}=((2, 2), 3)) or an int for all; got {got}"
        )
    return list(value)


def grids(shapes: Sequence[tuple[int, ...]], was_tuple: bool, window: Any, stride: Any) -> list[Grid]:
    """The windows of each input (non-batch ``shapes``), checked before any work."""
    if not was_tuple:
        return [_grid(shapes[0], window, stride, None)]
    windows = _per_input(window, len(shapes), "window")
    strides = _per_input(stride, len(shapes), "stride")
    each = zip(shapes, windows, strides, strict=True)
    return [_grid(shape, w, s, i) for i, (shape, w, s) in enumerate(each)]


def spread(values: Tensor, grid: Grid) -> Tensor:
    """Sum, at every element, the values ``[windows, M]`` of the windows covering it: ``[M, *map_shape]``.

    A window is a product of intervals, so the sum is separable: along the last dimension for every
    line of windows at once, then along the one before, and so on — one slice addition per window
    start and dimension rather than one per window.
    """
    starts = grid.starts
    heat = values.t().reshape(-1, *(len(s) for s in starts))  # [M, windows along each dimension]
    for dim in reversed(range(len(starts))):
        axis = dim + 1
        shape = list(heat.shape)
        shape[axis] = grid.size[dim]
        out = heat.new_zeros(shape)
        before = (slice(None),) * axis
        for k, s in enumerate(starts[dim]):
            out[before + (slice(s, s + grid.window[dim]),)] += heat[before + (slice(k, k + 1),)]
        heat = out
    return heat.unsqueeze(1) if grid.lead else heat

