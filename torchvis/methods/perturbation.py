"""Occlusion sensitivity (Zeiler & Fergus, ECCV 2014) over inputs of any shape."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from torchvis.core.forward import check_finite, guarded
from torchvis.core.inputs import InputLike, Inputs, Model, PerInput, as_inputs, check_model, fills
from torchvis.core.targets import Resolved, Target, resolve_target, score_of, take_target
from torchvis.methods import incremental_occlusion as inc
from torchvis.methods.spec import Look, Need, register
from torchvis.methods.windows import Grid, grids, spread, window_starts

__all__ = ["default_batch_size", "occlusion", "window_starts"]

log = logging.getLogger("torchvis")


def _occlude(images: Tensor, fill: Tensor, boxes: list[tuple[slice, ...]], lo: int, batch: int) -> None:
    """Set the windows of flat indices ``lo .. lo+len(images)`` to the baseline, in place; one slice
    assignment per window, since a window's examples are consecutive."""
    k, hi = lo, lo + images.shape[0]
    while k < hi:
        index, first = divmod(k, batch)
        stop = min(hi, (index + 1) * batch)
        box = boxes[index]
        rows, src = slice(k - lo, stop - lo), slice(first, first + stop - k)
        images[(rows,) + box] = fill[(src,) + box]
        k = stop


# On a CPU the images per second of plain forward passes peak when a batch holds about 1.2 million
# input values (8 images of 3x224x224, 32 of 3x112x112: benchmarks/RESULTS.md); larger batches
# overflow the caches, and memory grows with them.
_CPU_BATCH_VALUES = 8 * 3 * 224 * 224


def default_batch_size(x: InputLike) -> int:
    """Occluded inputs per forward pass when none is given: on the CPU as many as hold about 1.2
    million input values (8 images of 3x224x224, 32 of 3x112x112, at most 64; the values of every
    input of a tuple counted); on an accelerator 32."""
    tensors = x if isinstance(x, tuple) else (x,)
    if tensors[0].device.type != "cpu":
        return 32
    return max(1, min(64, _CPU_BATCH_VALUES // sum(t[0].numel() for t in tensors)))


def batch_size_for(inputs: Inputs, batch_size: int | None) -> int:
    """``batch_size`` checked, or :func:`default_batch_size`'s default
    for one example of all the inputs together."""
    if batch_size is None:
        return default_batch_size(inputs.tensors)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
    return batch_size


def occlusion(
    model: Model,
    x: InputLike,
    target: Target = None,
    *,
    window: Any,
    stride: Any = None,
    baseline: PerInput = 0.0,
    batch_size: int | None = None,
    progress: bool = False,
    eval_mode: bool = True,
    incremental: bool | None = False,
    forward_args: Any = None,
    forward_kwargs: dict[str, Any] | None = None,
) -> InputLike:
    """Occlusion sensitivity map. Returns ``[B,1,H,W]`` for an image and an ``int`` or ``(h, w)``
    window; in general one map per input (the structure of ``x``), shaped like the input for a
    window with one size per dimension and with one channel for a window over the dimensions after
    the channels (:mod:`torchvis.methods.windows`).

    Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014. A window
    slides over each input from its first corner with ``stride`` (default: half the window, at least
    1); an element's value is the mean, over the windows covering it, of ``score(x) - score(x with
    the window set to baseline)``, the other inputs of a tuple left as they are.

    ``window``: an ``int`` ``k`` is ``k x k`` pixels over all channels of an image ``[B,C,H,W]``,
    ``k`` time steps over all channels of a signal ``[B,C,L]``, a ``k^3`` cube over all channels of a
    volume ``[B,C,D,H,W]``, ``k`` consecutive features of ``[B,N]``; a tuple gives one size per
    dimension after the channels (all channels occluded together: the map has one channel) or one
    per non-batch dimension (Captum's ``sliding_window_shapes``: the map has the input's shape). For
    a tuple ``x``, one window per input (``window=((2, 2), 3)``; an ``int`` for all); ``stride``
    likewise (an ``int``, or as many sizes as the window). A window that covers a whole dimension
    runs once along it whatever the stride. ``baseline``: a number, a tensor broadcastable to the
    input, or for a tuple ``x`` one of those per input.

    ``model`` may be any callable; ``forward_args``/``forward_kwargs`` go to it unchanged, their
    per-example tensors (first dimension ``B``) taken at each occluded row's example
    (:mod:`torchvis.core.inputs`). ``target`` may be a callable scoring each row of the output
    (:mod:`torchvis.core.targets`). Forward passes only, under ``torch.inference_mode``;
    ``batch_size`` caps the occluded inputs per forward pass (memory), mixing windows and examples;
    ``None`` chooses it with :func:`default_batch_size`.

    ``incremental`` (Krypton: Nakandala et al., SIGMOD 2019) reuses the clean image's activations and
    recomputes, per window, only the patch of each layer that its change can reach, up to the first
    layer that mixes globally; the map is the same up to float rounding. It serves one image input
    ``[B,C,H,W]`` of an ``nn.Module`` without forward arguments and a window over height and width.
    ``True`` requires it (``ValueError`` saying why it cannot be used); ``None`` uses it when the
    model traces with ``torch.fx``, the estimated work is at most half the naive path's and the model
    is large enough for that to pay (:func:`~torchvis.methods.incremental_occlusion.gains`); ``False``
    (the default) runs every occluded image whole. It is opt-in because tracing patches
    ``nn.Module.__call__`` process-wide for its few milliseconds, which would reach a model another
    thread runs at that moment (a training loop, say), and because the incremental path replays the
    traced graph, so Python code in ``forward`` and hooks of modules outside ``torch.nn`` do not run
    per window. The ``torchvis`` logger says at DEBUG level which path ran.
    """
    inputs = as_inputs(x, forward_args, forward_kwargs)
    check_model(model)
    batch = inputs.batch
    layout = grids([tuple(t.shape[1:]) for t in inputs.tensors], inputs.was_tuple, window, stride)
    baselines = fills(baseline, inputs)
    batch_size = batch_size_for(inputs, batch_size)
    unsuited = _why_not_incremental(model, inputs, layout[0])
    if incremental and unsuited:
        raise ValueError(f"incremental occlusion cannot run here: {unsuited}")
    first = inputs.first

    with guarded(model, first, eval_mode=eval_mode, grad=False), torch.inference_mode():
        engine, out = (None, None)
        if unsuited:
            log.debug("occlusion: naive, the incremental engine does not apply: %s", unsuited)
        else:
            engine, out = _engine(model, first, baselines[0], layout[0], incremental)  # type: ignore[arg-type]
        # A model may change its input in place.
        output = inputs.call(model, [t.clone() for t in inputs.tensors]) if out is None else out
        t = resolve_target(target, output, batch)
        clean = score_of(output, t, batch)
        check_finite(output if isinstance(output, Tensor) else clean)
        drops = [_drops(model, inputs, i, grid, baselines[i], t, clean, engine, batch_size, progress)
                 for i, grid in enumerate(layout)]
        # An occluded input may overflow where the clean one did not.
        check_finite(clean, *drops, what="the target scores of some occluded images")  # clean: read above

    # Outside inference mode, so the result is an ordinary tensor the user can compute with. A column
    # of ones spreads into the number of windows covering each element, in the same pass.
    maps = []
    for values, grid, tensor in zip(drops, layout, inputs.tensors, strict=True):
        values = values.view(-1, batch)
        with_ones = torch.cat([values, torch.ones_like(values[:, :1])], dim=1)
        sums = spread(with_ones, grid)
        maps.append((sums[:batch] / sums[batch:]).to(tensor.dtype))
    return inputs.pack(maps)


def _drops(
    model: Model,
    inputs: Inputs,
    index: int,
    grid: Grid,
    fill: Tensor,
    target: Resolved,
    clean: Tensor,
    engine: inc.Engine | None,
    batch_size: int,
    progress: bool,
) -> Tensor:
    """``score(x) - score(occluded)`` for every window of input ``index`` and example, ``[windows * B]``.

    Flat index k = window * B + example: a forward batch holds consecutive windows, each for a
    contiguous run of examples, so each window is one slice assignment."""
    batch, device = inputs.batch, inputs.device
    boxes = grid.boxes
    total = len(boxes) * batch
    drops = torch.empty(total, dtype=clean.dtype, device=device)
    if engine is not None:
        chunks = list(inc.chunks(engine, total, batch_size))
    else:
        chunks = [(lo, min(lo + batch_size, total)) for lo in range(0, total, batch_size)]
    desc = "occlusion" if len(inputs.tensors) == 1 else f"occlusion of x[{index}]"
    for lo, hi in tqdm(chunks, desc=desc, unit="batch", disable=not progress):
        examples = torch.arange(lo, hi, device=device) % batch
        if engine is not None:
            out = inc.occluded_logits(engine, lo, hi)
        else:
            tensors = [t.index_select(0, examples) for t in inputs.tensors]
            _occlude(tensors[index], fill, boxes, lo, batch)
            out = inputs.call(model, tensors, rows=examples)
        drops[lo:hi] = clean[examples] - score_of(out, take_target(target, examples), hi - lo)
    return drops


def _why_not_incremental(model: Model, inputs: Inputs, grid: Grid) -> str:
    """Why the incremental engine cannot serve this call ('' when it can)."""
    if not isinstance(model, nn.Module):
        return "the model is a plain callable, not an nn.Module"
    if len(inputs.tensors) != 1 or inputs.first.dim() != 4:
        return "it takes one image input [B,C,H,W]"
    if grid.lead != 1:
        return "it takes a window over height and width (all channels)"
    if inputs.forward_args or inputs.forward_kwargs:
        return "the model takes forward_args/forward_kwargs"
    return ""


def _engine(
    model: nn.Module, x: Tensor, fill: Tensor, grid: Grid, incremental: bool | None
) -> tuple[inc.Engine | None, Tensor | None]:
    """The incremental engine when it is required or (``None``) expected to gain, and the clean
    logits if the attempt computed them."""
    if incremental is False:
        log.debug("occlusion: naive, incremental=False (pass True or None to trace the model)")
        return None, None
    window = grid.window
    assert len(window) == 2
    built = inc.build(model, x, fill, grid.positions, (window[0], window[1]))  # type: ignore[arg-type]
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


register("occlusion", occlusion, needs=Need.PERTURBATION, look=Look.SIGNED_OVERLAY, title="occlusion",
         needs_hooks=False)
