"""Deletion and insertion: does removing (adding) the top-ranked pixels first change the score fastest?

Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box Models", BMVC
2018. Pixels are ranked per example by the map, descending; curve point ``k = 0..N`` replaces the
first ``min(k * pixels_per_step, H*W)`` ranked pixels (all channels) and scores the image by the
softmax probability of the target class; the AUC is the trapezoid rule over the fraction of pixels,
``(sum_k s_k - (s_0 + s_N) / 2) / N``. Deletion replaces pixels by a baseline (lower AUC is better);
insertion puts the pixels of ``x`` back into a start image, by default a blur of ``x`` (higher is
better). All ``(N+1)*B`` images go through the model in bounded batches, forward passes only.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, NamedTuple, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.functional import gaussian_blur

from torchvis.core.forward import (
    Target,
    check_finite,
    check_input,
    checked_logits,
    guarded,
    resolve_target,
)
from torchvis.methods.cam import EmptyMapWarning

__all__ = ["Curves", "deletion", "importance", "insertion", "ranks", "steps"]

# The RISE code's substrate for insertion: a Gaussian blur with an 11-pixel kernel and sigma 5.
BLUR_KERNEL, BLUR_SIGMA = 11, 5.0

# Images per forward pass when none is given, on a CPU: as for occlusion, as many as hold about 1.2
# million input values (8 images of 3x224x224), at most 128, where the digits CNN's throughput peaks
# (benchmarks/metrics.py: 512 a batch cost 1.7x the forwards at 128, single thread); larger batches
# overflow the caches with their activations, and memory grows with them.
_CPU_BATCH_VALUES = 8 * 3 * 224 * 224


class Curves(NamedTuple):
    """Deletion or insertion curves: ``auc`` ``[B]``, ``scores`` ``[B, N+1]`` (the target's softmax
    probability at each point) and ``fraction`` ``[N+1]`` (the fraction of pixels replaced)."""

    auc: Tensor
    scores: Tensor
    fraction: Tensor


def importance(attributions: Tensor, x: Tensor) -> Tensor:
    """Per-pixel importance ``[B, H*W]``: the sum over channels of ``|attributions|``.

    A ``[B,1,h,w]`` map at another resolution (a CAM at its layer's size) is first upsampled
    bilinearly to ``x``'s ``H, W``.
    """
    if not isinstance(attributions, Tensor):
        raise TypeError(f"attributions must be a tensor, not {type(attributions).__name__}")
    batch, _, height, width = x.shape
    if attributions.dim() != 4 or attributions.shape[0] != batch:
        raise ValueError(
            f"attributions must be [B,C,H,W] or [B,1,h,w] with B={batch}; got {list(attributions.shape)}"
        )
    if not attributions.is_floating_point():
        raise ValueError(f"attributions must be a floating tensor; got {attributions.dtype}")
    a = attributions.detach().to(x.device)
    if a.shape[-2:] != (height, width):
        if a.shape[1] != 1:
            raise ValueError(
                f"a map at another resolution than x ({height}x{width}) must have one channel to be "
                f"upsampled; got {list(a.shape)}"
            )
        a = F.interpolate(a.float() if a.dtype == torch.float16 else a, size=(height, width),
                          mode="bilinear", align_corners=False)
    if not torch.isfinite(a).all():
        raise ValueError("attributions contain NaN or Inf; pixels cannot be ranked by them")
    return a.abs().sum(dim=1).flatten(1)


def ranks(scores: Tensor) -> Tensor:
    """The position of each pixel in the descending order of ``scores`` ``[B, P]``, ties broken by
    pixel index (a stable sort): ``[B, P]`` int64, 0 for the most important pixel."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def steps(pixels: int, pixels_per_step: int | None) -> tuple[int, int]:
    """``(pixels_per_step, N)``: the default ``ceil(pixels / 100)`` (at least 1), ``N = ceil(pixels /
    pixels_per_step)``."""
    if pixels_per_step is None:
        pixels_per_step = max(1, math.ceil(pixels / 100))
    if isinstance(pixels_per_step, bool) or not isinstance(pixels_per_step, int) or pixels_per_step < 1:
        raise ValueError(f"pixels_per_step must be a positive int; got {pixels_per_step!r}")
    return pixels_per_step, math.ceil(pixels / pixels_per_step)


def default_batch_size(x: Tensor) -> int:
    """Images per forward pass when none is given: on the CPU as many as hold about 1.2 million input
    values (8 of 3x224x224, 32 of 3x112x112), at most 128; on an accelerator 64."""
    if x.device.type != "cpu":
        return 64
    return max(1, min(128, _CPU_BATCH_VALUES // x[0].numel()))


def _fill(value: float | Tensor, x: Tensor, what: str) -> Tensor:
    """A number or a tensor broadcastable to ``x``, as ``x``'s dtype and device, expanded to its shape."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{what} must be a number or a tensor broadcastable to x; got {type(value).__name__}")
    t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    try:
        t = t.expand_as(x)
    except RuntimeError as err:
        raise ValueError(f"{what} of shape {list(t.shape)} does not broadcast to x {list(x.shape)}") from err
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN or Inf")
    return t


@overload
def deletion(model: nn.Module, x: Tensor, attributions: Tensor, target: Target = None, *,
             pixels_per_step: int | None = None, baseline: float | Tensor = 0.0,
             batch_size: int | None = None, return_curves: Literal[False] = False) -> Tensor: ...
@overload
def deletion(model: nn.Module, x: Tensor, attributions: Tensor, target: Target = None, *,
             pixels_per_step: int | None = None, baseline: float | Tensor = 0.0,
             batch_size: int | None = None, return_curves: Literal[True]) -> Curves: ...
def deletion(
    model: nn.Module,
    x: Tensor,
    attributions: Tensor,
    target: Target = None,
    *,
    pixels_per_step: int | None = None,
    baseline: float | Tensor = 0.0,
    batch_size: int | None = None,
    return_curves: bool = False,
) -> Tensor | Curves:
    """Deletion AUC per example (lower is better). Returns ``[B]``, or :class:`Curves` if ``return_curves``.

    Petsiuk et al., BMVC 2018 (RISE). The ranked pixels of ``x`` [B,C,H,W] are set, all channels, to
    ``baseline`` (a number or a tensor broadcastable to ``x``, in the model's input space).
    ``target=None`` scores the class predicted for ``x``.
    """
    check_input(x)
    return _curves(model, x, attributions, target, start=x, end=_fill(baseline, x, "baseline"),
                   pixels_per_step=pixels_per_step, batch_size=batch_size, curves=return_curves)


@overload
def insertion(model: nn.Module, x: Tensor, attributions: Tensor, target: Target = None, *,
              pixels_per_step: int | None = None, start: str | float | Tensor = "blur",
              batch_size: int | None = None, return_curves: Literal[False] = False) -> Tensor: ...
@overload
def insertion(model: nn.Module, x: Tensor, attributions: Tensor, target: Target = None, *,
              pixels_per_step: int | None = None, start: str | float | Tensor = "blur",
              batch_size: int | None = None, return_curves: Literal[True]) -> Curves: ...
def insertion(
    model: nn.Module,
    x: Tensor,
    attributions: Tensor,
    target: Target = None,
    *,
    pixels_per_step: int | None = None,
    start: str | float | Tensor = "blur",
    batch_size: int | None = None,
    return_curves: bool = False,
) -> Tensor | Curves:
    """Insertion AUC per example (higher is better). Returns ``[B]``, or :class:`Curves` if ``return_curves``.

    Petsiuk et al., BMVC 2018 (RISE). The image starts as ``start`` — ``"blur"``: a Gaussian blur of
    ``x`` (kernel 11, sigma 5, as the RISE code; see :func:`blurred`), or a number or a tensor
    broadcastable to ``x`` — and the ranked pixels of ``x`` are put back, all channels.
    ``target=None`` scores the class predicted for ``x``.
    """
    check_input(x)
    if isinstance(start, str):
        if start != "blur":
            raise ValueError(f"start must be 'blur', a number or a tensor; got {start!r}")
        begin = blurred(x)
    else:
        begin = _fill(start, x, "start")
    return _curves(model, x, attributions, target, start=begin, end=x,
                   pixels_per_step=pixels_per_step, batch_size=batch_size, curves=return_curves)


def blurred(x: Tensor) -> Tensor:
    """RISE's insertion start: ``gaussian_blur`` of ``x`` with kernel 11 and sigma 5 (reflected
    borders); an image under 6 pixels a side gets the largest odd kernel its border reflection allows."""
    side = min(BLUR_KERNEL, 2 * min(x.shape[-2:]) - 1)
    kernel = side - (side + 1) % 2
    with torch.no_grad():
        return gaussian_blur(x.detach(), [kernel, kernel], [BLUR_SIGMA, BLUR_SIGMA])


def _curves(
    model: nn.Module,
    x: Tensor,
    attributions: Tensor,
    target: Target,
    *,
    start: Tensor,
    end: Tensor,
    pixels_per_step: int | None,
    batch_size: int | None,
    curves: bool,
) -> Tensor | Curves:
    """Score the images that go from ``start`` to ``end`` one step of ranked pixels at a time."""
    batch, _, height, width = x.shape
    pixels = height * width
    per_step, n = steps(pixels, pixels_per_step)
    batch_size = default_batch_size(x) if batch_size is None else batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    weights = importance(attributions, x)
    _warn_constant(weights)
    rank = ranks(weights).view(batch, 1, height, width)
    replaced = (torch.arange(n + 1, device=x.device) * per_step).clamp_max(pixels)
    total = (n + 1) * batch

    with guarded(model, x, grad=False), torch.inference_mode():
        t = _target(model, x, target)
        chunks = []
        # Flat index i = k * B + b: point k of example b.
        for lo in range(0, total, batch_size):
            i = torch.arange(lo, min(lo + batch_size, total), device=x.device)
            k, b = i // batch, i % batch
            moved = rank[b] < replaced[k].view(-1, 1, 1, 1)  # [n,1,H,W]: the pixels already replaced
            out = checked_logits(model(torch.where(moved, end[b], start[b])), i.numel())
            out = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
            chunks.append(out.softmax(dim=1).gather(1, t[b][:, None])[:, 0])
    scores = torch.cat(chunks).view(n + 1, batch).t().clone()  # outside inference mode: an ordinary tensor
    if not torch.isfinite(scores).all():
        raise ValueError("the model's softmax scores contain NaN or Inf; no AUC can be computed")
    auc = (scores.sum(dim=1) - (scores[:, 0] + scores[:, -1]) / 2) / n
    if not curves:
        return auc
    return Curves(auc, scores, replaced.to(scores.dtype) / pixels)


def _target(model: nn.Module, x: Tensor, target: Target) -> Tensor:
    """The class per example ``[B]``: ``target``, or the class predicted for ``x`` when None."""
    one = x if target is None else x[:1]  # one image tells the number of classes
    logits = checked_logits(model(one.detach().clone()), one.shape[0])  # a model may change its input
    check_finite(logits)
    if target is not None:
        logits = logits.new_zeros(x.shape[0], logits.shape[1])
    return resolve_target(target, logits)


def _warn_constant(weights: Tensor) -> None:
    constant = int((weights == weights[:, :1]).all(dim=1).sum())
    if constant:
        warnings.warn(
            f"the attribution map is constant for {constant} of {weights.shape[0]} examples: their pixels "
            "are removed in index order (row by row), so their score says nothing about the map",
            EmptyMapWarning,
            stacklevel=3,
        )
