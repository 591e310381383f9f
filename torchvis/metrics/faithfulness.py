"""Deletion and insertion: does removing (adding) the top-ranked pixels first change the score fastest?

Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box Models", BMVC
2018. Pixels are ranked per example by the map, descending; curve point ``k = 0..N`` replaces the
first ``min(k * pixels_per_step, H*W)`` ranked pixels (all channels) and scores the image by the
softmax probability of the target class; the AUC is the trapezoid rule over the fraction of pixels,
``(sum_k s_k - (s_0 + s_N) / 2) / N``. Deletion replaces pixels by a baseline (lower AUC is better);
insertion puts the pixels of ``x`` back into a start image, by default a blur of ``x`` (higher is
better). All ``(N+1)*B`` images go through the model in bounded batches, forward passes only.

Other inputs. A *feature* plays the pixel's part: for an input ``[B,C,*spatial]`` (a signal
``[B,C,L]``, an image, a volume ``[B,C,D,H,W]``) one position across all channels — a time step, a
pixel, a voxel; for ``[B,N]`` one element. With a tuple ``x`` the attributions are a tuple too, one
per input, and the features of all inputs are ranked together by their importance (so the maps
must be on a common scale, as gradients of one score are) and replaced a fixed number per step,
wherever they lie. A callable target is scored by its own value instead of a softmax probability,
as is an index into a larger output or a model returning one score per example.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple, overload

import torch
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

from torchvis.core.caller import warn_user
from torchvis.core.forward import check_finite, checked_logits, guarded
from torchvis.core.inputs import InputLike, Inputs, Model, as_inputs, check_model, fill_like, fills, per_input
from torchvis.core.targets import Resolved, Target, is_function, resolve_target, score_of, take_target
from torchvis.methods.cam import EmptyMapWarning, upsample_to
from torchvis.methods.perturbation import batch_size_for

__all__ = [
    "METRICS", "Curves", "check_metrics", "deletion", "deletion_insertion", "importance", "insertion",
    "ranks", "steps",
]

METRICS = ("deletion", "insertion")
"""The metrics by name, as :func:`deletion_insertion`, the monitor and the audit take them."""

# The RISE code's substrate for insertion: a Gaussian blur with an 11-pixel kernel and sigma 5.
BLUR_KERNEL, BLUR_SIGMA = 11, 5.0


class Curves(NamedTuple):
    """Deletion or insertion curves: ``auc`` ``[B]``, ``scores`` ``[B, N+1]`` (the target's softmax
    probability at each point, or the callable target's value) and ``fraction`` ``[N+1]`` (the
    fraction of pixels, or features, replaced)."""

    auc: Tensor
    scores: Tensor
    fraction: Tensor


Attributions = Tensor | tuple[Tensor, ...]
Fill = float | Tensor | tuple[Any, ...]

def importance(attributions: Tensor, x: Tensor) -> Tensor:
    """Per-feature importance ``[B, P]``: for an image ``[B,C,H,W]`` the sum over channels of
    ``|attributions|`` per pixel (``P = H*W``), likewise per time step of ``[B,C,L]`` and per voxel of
    ``[B,C,D,H,W]``; ``|attributions|`` per element of ``[B,N]``.

    A one-channel map ``[B,1,*spatial]`` at another resolution (a CAM at its layer's size) is first
    upsampled to ``x``'s (bilinearly for an image; linearly, trilinearly for 1-D, 3-D).
    """
    if not isinstance(attributions, Tensor):
        raise TypeError(f"attributions must be a tensor, not {type(attributions).__name__}")
    batch, spatial = x.shape[0], tuple(x.shape[2:])
    if x.dim() == 2:
        wanted = f"[B,N] like x {list(x.shape)}"
        fits = attributions.shape == x.shape
    else:
        wanted = "[B,C,H,W] or [B,1,h,w]" if x.dim() == 4 else (
            f"shaped like x {list(x.shape)}, or [B,1,*spatial] at another resolution (as [B,C,H,W] or "
            "[B,1,h,w] for an image)"
        )
        fits = attributions.dim() == x.dim() and attributions.shape[0] == batch
    if not fits or attributions.shape[0] != batch:
        raise ValueError(f"attributions must be {wanted} with B={batch}; got {list(attributions.shape)}")
    if not attributions.is_floating_point():
        raise ValueError(f"attributions must be a floating tensor; got {attributions.dtype}")
    a = attributions.detach().to(x.device)
    if x.dim() > 2 and a.shape[2:] != spatial:
        if a.shape[1] != 1:
            size = "x".join(map(str, spatial))
            raise ValueError(
                f"a map at another resolution than x ({size}) must have one channel to be "
                f"upsampled; got {list(a.shape)}"
            )
        a = upsample_to(a.float() if a.dtype == torch.float16 else a, x)
    if not torch.isfinite(a).all():
        raise ValueError("attributions contain NaN or Inf; pixels cannot be ranked by them")
    return a.abs().sum(dim=1).flatten(1) if x.dim() > 2 else a.abs()


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


def _inputs(x: object, forward_args: object, forward_kwargs: Mapping[str, Any] | None) -> Inputs:
    if not isinstance(x, (Tensor, tuple)):
        raise TypeError(f"x must be a torch.Tensor [B, ...] (an image [B,C,H,W]) or a tuple of them, not "
                        f"{type(x).__name__}")
    inputs = as_inputs(x, forward_args, forward_kwargs)
    for i, t in enumerate(inputs.tensors):
        if t.dim() < 2:
            name = f"x[{i}]" if inputs.was_tuple else "x"
            raise ValueError(f"{name} must be [B,C,H,W], or [B,N], [B,C,L], [B,C,D,H,W]; got {list(t.shape)}")
    return inputs


def _maps(attributions: object, inputs: Inputs) -> list[Tensor]:
    if inputs.was_tuple:
        if not isinstance(attributions, tuple) or len(attributions) != len(inputs.tensors):
            raise TypeError(f"x is a tuple of {len(inputs.tensors)} inputs: attributions must be a tuple "
                            "with one map per input")
        return list(attributions)
    if not isinstance(attributions, Tensor):
        raise TypeError(f"attributions must be a tensor, not {type(attributions).__name__}")
    return [attributions]


@overload
def deletion(model: Model, x: InputLike, attributions: Attributions, target: Target = None, *,
             pixels_per_step: int | None = None, baseline: Fill = 0.0,
             batch_size: int | None = None, return_curves: Literal[False] = False,
             forward_args: Any = None, forward_kwargs: Mapping[str, Any] | None = None) -> Tensor: ...
@overload
def deletion(model: Model, x: InputLike, attributions: Attributions, target: Target = None, *,
             pixels_per_step: int | None = None, baseline: Fill = 0.0,
             batch_size: int | None = None, return_curves: Literal[True],
             forward_args: Any = None, forward_kwargs: Mapping[str, Any] | None = None) -> Curves: ...
def deletion(
    model: Model,
    x: InputLike,
    attributions: Attributions,
    target: Target = None,
    *,
    pixels_per_step: int | None = None,
    baseline: Fill = 0.0,
    batch_size: int | None = None,
    return_curves: bool = False,
    forward_args: Any = None,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> Tensor | Curves:
    """Deletion AUC per example (lower is better). Returns ``[B]``, or :class:`Curves` if ``return_curves``.

    Petsiuk et al., BMVC 2018 (RISE). The ranked pixels of ``x`` [B,C,H,W] are set, all channels, to
    ``baseline`` (a number or a tensor broadcastable to ``x``, in the model's input space).
    ``target=None`` scores the class predicted for ``x``. Other inputs, tuples of them (``baseline``
    then a number or one per input) and callable targets: see :mod:`torchvis.metrics.faithfulness`;
    ``forward_args``/``forward_kwargs`` go to the model, their per-example tensors taken for each row.
    """
    inputs = _inputs(x, forward_args, forward_kwargs)
    maps = _maps(attributions, inputs)
    ends = fills(baseline, inputs, "baseline")
    return _curves(model, inputs, maps, target, [(list(inputs.tensors), ends)],
                   pixels_per_step=pixels_per_step, batch_size=batch_size, curves=return_curves)[0]


@overload
def insertion(model: Model, x: InputLike, attributions: Attributions, target: Target = None, *,
              pixels_per_step: int | None = None, start: str | Fill = "blur",
              batch_size: int | None = None, return_curves: Literal[False] = False,
              forward_args: Any = None, forward_kwargs: Mapping[str, Any] | None = None) -> Tensor: ...
@overload
def insertion(model: Model, x: InputLike, attributions: Attributions, target: Target = None, *,
              pixels_per_step: int | None = None, start: str | Fill = "blur",
              batch_size: int | None = None, return_curves: Literal[True],
              forward_args: Any = None, forward_kwargs: Mapping[str, Any] | None = None) -> Curves: ...
def insertion(
    model: Model,
    x: InputLike,
    attributions: Attributions,
    target: Target = None,
    *,
    pixels_per_step: int | None = None,
    start: str | Fill = "blur",
    batch_size: int | None = None,
    return_curves: bool = False,
    forward_args: Any = None,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> Tensor | Curves:
    """Insertion AUC per example (higher is better). Returns ``[B]``, or :class:`Curves` if ``return_curves``.

    Petsiuk et al., BMVC 2018 (RISE). The image starts as ``start`` — ``"blur"``: a Gaussian blur of
    ``x`` (kernel 11, sigma 5, as the RISE code; see :func:`blurred`), or a number or a tensor
    broadcastable to ``x`` — and the ranked pixels of ``x`` are put back, all channels.
    ``target=None`` scores the class predicted for ``x``. ``"blur"`` is for images ``[B,C,H,W]``
    only: other inputs need a number or a tensor (with a tuple ``x``, ``start`` may be one per input,
    ``"blur"`` for its images). Other inputs, tuples and callable targets: see
    :mod:`torchvis.metrics.faithfulness`.
    """
    inputs = _inputs(x, forward_args, forward_kwargs)
    maps = _maps(attributions, inputs)
    begins = _starts(start, inputs)
    return _curves(model, inputs, maps, target, [(begins, list(inputs.tensors))],
                   pixels_per_step=pixels_per_step, batch_size=batch_size, curves=return_curves)[0]


@overload
def deletion_insertion(model: Model, x: InputLike, attributions: Attributions, target: Target = None, *,
                       metrics: Sequence[str] = METRICS, pixels_per_step: int | None = None,
                       baseline: Fill = 0.0, start: str | Fill = "blur", batch_size: int | None = None,
                       return_curves: Literal[False] = False, forward_args: Any = None,
                       forward_kwargs: Mapping[str, Any] | None = None) -> dict[str, Tensor]: ...
@overload
def deletion_insertion(model: Model, x: InputLike, attributions: Attributions, target: Target = None, *,
                       metrics: Sequence[str] = METRICS, pixels_per_step: int | None = None,
                       baseline: Fill = 0.0, start: str | Fill = "blur", batch_size: int | None = None,
                       return_curves: Literal[True], forward_args: Any = None,
                       forward_kwargs: Mapping[str, Any] | None = None) -> dict[str, Curves]: ...
def deletion_insertion(
    model: Model,
    x: InputLike,
    attributions: Attributions,
    target: Target = None,
    *,
    metrics: Sequence[str] = METRICS,
    pixels_per_step: int | None = None,
    baseline: Fill = 0.0,
    start: str | Fill = "blur",
    batch_size: int | None = None,
    return_curves: bool = False,
    forward_args: Any = None,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Tensor] | dict[str, Curves]:
    """Several metrics of one map at once: ``{"deletion": [B], "insertion": [B]}`` (or :class:`Curves`).

    Each value equals :func:`deletion` (with ``baseline``) or :func:`insertion` (with ``start``) called
    alone, bit for bit; together they share the checks, the ranking of the pixels and the pass that
    resolves ``target``, so a caller that wants both (the monitor) pays for one of each.
    """
    names = check_metrics(metrics)
    if not names:
        raise ValueError("metrics is empty; name deletion and/or insertion")
    inputs = _inputs(x, forward_args, forward_kwargs)
    maps = _maps(attributions, inputs)
    paths = [(list(inputs.tensors), fills(baseline, inputs, "baseline")) if name == "deletion"
             else (_starts(start, inputs), list(inputs.tensors)) for name in names]
    results = _curves(model, inputs, maps, target, paths, pixels_per_step=pixels_per_step,
                      batch_size=batch_size, curves=return_curves)
    return dict(zip(names, results, strict=True))  # type: ignore[return-value]


def check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """The metric names, checked: each one of :data:`METRICS`, none twice (may be empty)."""
    if isinstance(metrics, str):
        raise TypeError(f"metrics is a sequence of names, e.g. ({metrics!r},); got the string {metrics!r}")
    names = tuple(metrics)
    for name in names:
        if name not in METRICS:
            close = difflib.get_close_matches(str(name), list(METRICS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown metric {name!r}{hint}; known: {', '.join(METRICS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"metrics names a metric twice: {list(names)}")
    return names


def _starts(start: object, inputs: Inputs) -> list[Tensor]:
    """Insertion's start images, one per input: a blur of an image, or a number or tensor filled."""
    begins = []
    for i, ((value, what), t) in enumerate(zip(per_input(start, inputs, "start"), inputs.tensors,
                                               strict=True)):
        if isinstance(value, str):
            if value != "blur":
                raise ValueError(f"{what} must be 'blur', a number or a tensor; got {value!r}")
            if t.dim() != 4:
                name = f"x[{i}]" if inputs.was_tuple else "x"
                raise ValueError(
                    f"{what}='blur' blurs images [B,C,H,W]; {name} has shape {list(t.shape)}: give it a "
                    "number or a tensor as its start (e.g. start=0.0, or one per input for a tuple x)"
                )
            begins.append(blurred(t))
        else:
            begins.append(fill_like(value, t, what, f"x[{i}]" if inputs.was_tuple else "x"))
    return begins


def blurred(x: Tensor) -> Tensor:
    """RISE's insertion start: ``gaussian_blur`` of ``x`` with kernel 11 and sigma 5 (reflected
    borders); an image under 6 pixels a side gets the largest odd kernel its border reflection allows."""
    side = min(BLUR_KERNEL, 2 * min(x.shape[-2:]) - 1)
    kernel = side - (side + 1) % 2
    with torch.no_grad():
        return gaussian_blur(x.detach(), [kernel, kernel], [BLUR_SIGMA, BLUR_SIGMA])


def _curves(
    model: Model,
    inputs: Inputs,
    attributions: Sequence[Tensor],
    target: Target,
    paths: Sequence[tuple[Sequence[Tensor], Sequence[Tensor]]],
    *,
    pixels_per_step: int | None,
    batch_size: int | None,
    curves: bool,
) -> list[Tensor] | list[Curves]:
    """For each ``(start, end)`` of ``paths``, score the inputs that go from ``start`` to ``end`` one
    step of ranked features at a time; the ranks and the target are shared by the paths."""
    check_model(model)
    batch = inputs.batch
    weights = [importance(a, t) for a, t in zip(attributions, inputs.tensors, strict=True)]
    pixels = sum(w.shape[1] for w in weights)
    per_step, n = steps(pixels, pixels_per_step)
    batch_size = batch_size_for(inputs, batch_size)  # occlusion's: the same forward-only work
    joint = weights[0] if len(weights) == 1 else torch.cat(weights, dim=1)
    _warn_constant(joint, image=inputs.first.dim() == 4 and len(weights) == 1)
    # Each input's ranks, shaped to broadcast over its channels: [B,1,*spatial], or [B,N].
    rank = [r.view(batch, *([1] if t.dim() > 2 else []), *t.shape[2 if t.dim() > 2 else 1 :])
            for r, t in zip(ranks(joint).split([w.shape[1] for w in weights], dim=1), inputs.tensors,
                            strict=True)]
    replaced = (torch.arange(n + 1, device=inputs.device) * per_step).clamp_max(pixels)
    # Row i = k * B + b of a path's stream is point k of example b. Each input's replaced counts,
    # [N+1, 1, ...], broadcast against its ranks: a chunk's whole points are built by one op.
    counts = [replaced.view(-1, *[1] * r.dim()) for r in rank]
    total = (n + 1) * batch
    spans = [(lo, min(lo + batch_size, total)) for lo in range(0, total, batch_size)]

    results = []
    with guarded(model, inputs.first, grad=False), torch.inference_mode():
        t = _target(model, inputs, target)
        probability = isinstance(t, Tensor) and t.dim() == 1
        for first, last in paths:
            formats = [_layout(r, s, e) for r, s, e in zip(rank, first, last, strict=True)]
            chunks = []
            for lo, hi in spans:
                b = torch.arange(lo, hi, device=inputs.device) % batch
                tensors = [_images(r, c, s, e, lo, hi, f)
                           for r, c, s, e, f in zip(rank, counts, first, last, formats, strict=True)]
                out = inputs.call(model, tensors, rows=b)
                chunks.append(_score(out, take_target(t, b), hi - lo, probability))
            stream = torch.cat(chunks)
            if not torch.isfinite(stream).all():  # before the next path's forwards
                kind = "softmax scores" if probability else "scores"
                raise ValueError(f"the model's {kind} contain NaN or Inf; no AUC can be computed")
            results.append(stream)
    output = []
    for stream in results:
        scores = stream.view(n + 1, batch).t().clone()  # outside inference mode: ordinary
        auc = (scores.sum(dim=1) - (scores[:, 0] + scores[:, -1]) / 2) / n
        output.append(Curves(auc, scores, replaced.to(scores.dtype) / pixels) if curves else auc)
    return output  # type: ignore[return-value]


def _layout(rank: Tensor, first: Tensor, last: Tensor) -> torch.memory_format:
    """The memory format that ``where`` gives the rows of ``first`` and ``last`` (channels last for
    some image layouts), so the model sees its inputs laid out as before the images were built by
    broadcasting (a convolution's result may depend on the layout in its last bits)."""
    if first.dim() != 4:
        return torch.contiguous_format
    rows = torch.arange(min(2, rank.shape[0]), device=rank.device)
    probe = torch.where(rank[rows] < 0, last[rows], first[rows])
    if probe.is_contiguous() or not probe.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last


def _images(rank: Tensor, counts: Tensor, first: Tensor, last: Tensor, lo: int, hi: int,
            layout: torch.memory_format) -> Tensor:
    """Rows ``lo..hi`` of the stream ``where(rank < counts[k], last, first)``, row ``k * B + b``: a
    fresh tensor (the model may keep or change it). At most three ``where``: the partial point the
    chunk starts in, the whole points, the partial point it ends in."""
    batch, shape = rank.shape[0], first.shape[1:]
    dtype = torch.result_type(last, first)
    out = torch.empty((hi - lo, *shape), dtype=dtype, device=first.device, memory_format=layout)
    k, b = divmod(lo, batch)
    row = lo
    while row < hi:
        if b == 0 and hi - row >= batch:  # whole points k .. k+m-1
            m = (hi - row) // batch
            torch.where(rank < counts[k : k + m], last, first,
                        out=out[row - lo : row - lo + m * batch].view(m, batch, *shape))
            row, k = row + m * batch, k + m
        else:  # part of point k: examples b .. e-1
            e = min(batch, b + hi - row)
            torch.where(rank[b:e] < counts[k], last[b:e], first[b:e], out=out[row - lo : row - lo + e - b])
            row, k, b = row + e - b, k + (e == batch), 0 if e == batch else e
    return out


def _score(out: Any, target: Resolved, batch: int, probability: bool) -> Tensor:
    """The softmax probability of each row's class (a class target), else the explained score."""
    if probability:
        out = checked_logits(out, batch)
        out = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
        return out.softmax(dim=1).gather(1, target[:, None])[:, 0]  # type: ignore[index]
    score = score_of(out, target, batch)
    return score.float() if score.dtype in (torch.float16, torch.bfloat16) else score


def _target(model: Model, inputs: Inputs, target: Target) -> Resolved:
    """The resolved target: ``target``, or the class predicted for ``x`` when None. A callable target
    needs no forward pass; any other given target one example's (which tells the output's shape)."""
    if is_function(target):
        return target  # type: ignore[return-value]
    batch = inputs.batch
    one = inputs if target is None else inputs.take(torch.zeros(1, dtype=torch.long, device=inputs.device))
    # A model may change its input.
    logits = one.call(model, [t.detach().clone() for t in one.tensors])
    indexes = isinstance(target, tuple) or (isinstance(target, Tensor) and target.dim() == 2)
    if not indexes and not (isinstance(logits, Tensor) and logits.dim() == 1):
        logits = checked_logits(logits, one.batch)
    check_finite(logits)
    if target is not None:
        logits = logits.new_zeros(batch, *logits.shape[1:])
    return resolve_target(target, logits, batch)


def _warn_constant(weights: Tensor, *, image: bool = True) -> None:
    constant = int((weights == weights[:, :1]).all(dim=1).sum())
    if constant:
        order = "pixels are removed in index order (row by row)" if image else "features are removed in order"
        warn_user(
            f"the attribution map is constant for {constant} of {weights.shape[0]} examples: their {order}, "
            "so their score says nothing about the map",
            EmptyMapWarning,
        )
