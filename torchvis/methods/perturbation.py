"""Occlusion sensitivity (Zeiler & Fergus, ECCV 2014)."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from torchvis.core.forward import (
    Target,
    check_finite,
    check_input,
    checked_logits,
    guarded,
    resolve_target,
)
from torchvis.methods import incremental_occlusion as inc
from torchvis.methods.spec import Look, Need, register

log = logging.getLogger("torchvis")


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets along one axis: from 0 in steps of ``stride`` until a window reaches the far
    edge; the last window may be cut off at the border, so every pixel is covered."""
    starts = [0]
    while starts[-1] + window < size:
        starts.append(starts[-1] + stride)
    return starts


def _pair(value: int | tuple[int, int], what: str) -> tuple[int, int]:
    # Anything but an int or a tuple/list (a float, say) fails the length check below.
    pair = tuple(value) if isinstance(value, (tuple, list)) else ()
    if isinstance(value, int):
        pair = (value, value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{what} must be an int or a pair of ints; got {value!r}")
    return pair[0], pair[1]


def _occlude(
    images: Tensor, fill: Tensor, windows: list[tuple[int, int]], lo: int, batch: int, size: tuple[int, int]
) -> None:
    """Set the windows of flat indices ``lo .. lo+len(images)`` to the baseline, in place; one slice
    assignment per window, since a window's examples are consecutive."""
    wh, ww = size
    k, hi = lo, lo + images.shape[0]
    while k < hi:
        index, first = divmod(k, batch)
        stop = min(hi, (index + 1) * batch)
        i, j = windows[index]
        rows, src = slice(k - lo, stop - lo), slice(first, first + stop - k)
        images[rows, :, i : i + wh, j : j + ww] = fill[src, :, i : i + wh, j : j + ww]
        k = stop


# On a CPU the images per second of plain forward passes peak when a batch holds about 1.2 million
# input values (8 images of 3x224x224, 32 of 3x112x112: benchmarks/RESULTS.md); larger batches
# overflow the caches, and memory grows with them.
_CPU_BATCH_VALUES = 8 * 3 * 224 * 224


def default_batch_size(x: Tensor) -> int:
    """Occluded images per forward pass when none is given: on the CPU as many as hold about 1.2
    million input values (8 of 3x224x224, 32 of 3x112x112, at most 64); on an accelerator 32."""
    if x.device.type != "cpu":
        return 32
    return max(1, min(64, _CPU_BATCH_VALUES // x[0].numel()))


def occlusion(
    model: nn.Module,
    x: Tensor,
    target: Target = None,
    *,
    window: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    baseline: float | Tensor = 0.0,
    batch_size: int | None = None,
    progress: bool = False,
    eval_mode: bool = True,
    incremental: bool | None = False,
) -> Tensor:
    """Occlusion sensitivity map. Returns ``[B,1,H,W]``.

    Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014. A window of
    ``window`` pixels (all channels) slides from the top-left corner with ``stride`` (default: half
    the window, at least 1); a pixel's value is the mean, over the windows covering it, of
    ``score(x) - score(x with the window set to baseline)``. ``baseline`` is a number or a tensor
    broadcastable to ``x``. Forward passes only, under ``torch.inference_mode``; ``batch_size`` caps
    the occluded images per forward pass (memory), mixing windows and examples. ``None`` chooses it
    with :func:`default_batch_size`.

    ``incremental`` (Krypton: Nakandala et al., SIGMOD 2019) reuses the clean image's activations and
    recomputes, per window, only the patch of each layer that its change can reach, up to the first
    layer that mixes globally; the map is the same up to float rounding. ``True`` requires it
    (``ValueError`` saying why it cannot be used); ``None`` uses it when the model traces with
    ``torch.fx``, the estimated work is at most half the naive path's and the model is large enough
    for that to pay (:func:`~torchvis.methods.incremental_occlusion.gains`); ``False`` (the default)
    runs every occluded image whole. It is opt-in because tracing patches ``nn.Module.__call__``
    process-wide for its few milliseconds, which would reach a model another thread runs at that
    moment (a training loop, say), and because the incremental path replays the traced graph, so
    Python code in ``forward`` and hooks of modules outside ``torch.nn`` do not run per window. The
    ``torchvis`` logger says at DEBUG level which path ran.
    """
    check_input(x)
    batch, _, height, width = x.shape
    wh, ww = _pair(window, "window")
    sh, sw = _pair(stride, "stride") if stride is not None else (max(1, wh // 2), max(1, ww // 2))
    if not (0 < wh <= height and 0 < ww <= width):
        raise ValueError(f"window {(wh, ww)} must be positive and fit the image {(height, width)}")
    if sh <= 0 or sw <= 0:
        raise ValueError(f"stride must be positive; got {(sh, sw)}")
    if sh > wh or sw > ww:
        raise ValueError(f"stride {(sh, sw)} larger than the window {(wh, ww)} would skip pixels")
    if batch_size is None:
        batch_size = default_batch_size(x)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    # A number becomes a device tensor through a fill kernel: a copy from the host would wait for the GPU.
    fill = (
        torch.full((), baseline, dtype=x.dtype, device=x.device)
        if isinstance(baseline, (int, float))
        else torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    ).expand_as(x)
    windows = [(i, j) for i in window_starts(height, wh, sh) for j in window_starts(width, ww, sw)]

    with guarded(model, x, eval_mode=eval_mode, grad=False), torch.inference_mode():
        engine, out = _engine(model, x, fill, windows, (wh, ww), incremental)
        # A model may change its input in place.
        logits = checked_logits(model(x.clone()) if out is None else out, batch)
        check_finite(logits)
        t = resolve_target(target, logits)
        clean = logits.gather(1, t[:, None])[:, 0]
        # Flat index k = window * batch + example: a forward batch holds consecutive windows,
        # each for a contiguous run of examples, so each window is one slice assignment.
        drops = torch.empty(len(windows) * batch, dtype=logits.dtype, device=x.device)
        if engine is not None:
            chunks = list(inc.chunks(engine, drops.numel(), batch_size))
        else:
            chunks = [(lo, min(lo + batch_size, drops.numel())) for lo in range(0, drops.numel(), batch_size)]
        for lo, hi in tqdm(chunks, desc="occlusion", unit="batch", disable=not progress):
            examples = torch.arange(lo, hi, device=x.device) % batch
            if engine is not None:
                out = checked_logits(inc.occluded_logits(engine, lo, hi), hi - lo)
            else:
                images = x.index_select(0, examples)
                _occlude(images, fill, windows, lo, batch, (wh, ww))
                out = model(images)
            drops[lo:hi] = clean[examples] - out.gather(1, t[examples][:, None])[:, 0]
        # An occluded image may overflow where the clean one did not.
        check_finite(logits, drops, what="the target scores of some occluded images")
        drops = drops.view(len(windows), batch)

    # Outside inference mode, so the result is an ordinary tensor the user can compute with. A column
    # of ones spreads into the number of windows covering each pixel, in the same pass.
    with_ones = torch.cat([drops, torch.ones_like(drops[:, :1])], dim=1)
    sums = _spread(with_ones, (height, width), (wh, ww), (sh, sw))
    return (sums[:batch] / sums[batch:]).to(x.dtype)


def _engine(
    model: nn.Module,
    x: Tensor,
    fill: Tensor,
    windows: list[tuple[int, int]],
    window: tuple[int, int],
    incremental: bool | None,
) -> tuple[inc.Engine | None, Tensor | None]:
    """The incremental engine when it is required or (``None``) expected to gain, and the clean
    logits if the attempt computed them."""
    if incremental is False:
        log.debug("occlusion: naive, incremental=False (pass True or None to trace the model)")
        return None, None
    built = inc.build(model, x, fill, windows, window)
    if isinstance(built, str):
        if incremental:
            raise ValueError(f"incremental occlusion cannot run on this model: {built}")
        log.debug("occlusion: naive, every occluded image whole: %s", built)
        return None, None
    if incremental is None and not inc.gains(built):
        log.debug("occlusion: naive, incremental would not gain enough: %s", inc.describe(built))
        return None, built.logits
    log.debug("occlusion: incremental, %s", inc.describe(built))
    return built, built.logits


def _spread(
    values: Tensor, size: tuple[int, int], window: tuple[int, int], stride: tuple[int, int]
) -> Tensor:
    """Sum, at every pixel, the values ``[windows, B]`` of the windows covering it: ``[B,1,H,W]``.

    A window covers a band of rows times a band of columns, so the sum is separable: first along the
    columns for every row of windows at once, then along the rows — one slice addition per row and
    per column of windows rather than one per window.
    """
    (height, width), (wh, ww), (sh, sw) = size, window, stride
    rows, cols = window_starts(height, wh, sh), window_starts(width, ww, sw)
    grid = values.t().reshape(-1, len(rows), len(cols))  # [B, rows of windows, columns of windows]
    bands = grid.new_zeros(grid.shape[0], len(rows), width)
    for k, j in enumerate(cols):
        bands[:, :, j : j + ww] += grid[:, :, k : k + 1]
    heat = grid.new_zeros(grid.shape[0], height, width)
    for k, i in enumerate(rows):
        heat[:, i : i + wh, :] += bands[:, k : k + 1, :]
    return heat.unsqueeze(1)


register("occlusion", occlusion, needs=Need.PERTURBATION, look=Look.SIGNED_OVERLAY, title="occlusion",
         needs_hooks=False)
