"""What is explained: the score per example that a method attributes, read from the model's output.

``target`` takes one of:

- ``None``: each example's predicted class; the output must be ``[B, classes]`` (or ``[B]``, a single
  score per example, which is then explained as it is);
- an ``int`` (or a NumPy integer, a 0-d integer tensor): that class for every example of a
  ``[B, classes]`` output;
- a sequence, 1-D integer tensor or NumPy array of length ``B``: one class per example;
- for an output with more dimensions, ``[B, d1, ..., dk]``: a tuple of ``k`` ints indexes it the same
  way for every example (``target=(3, 1)`` for ``[B, 5, 2]``, Captum's convention), a list of ``B``
  such tuples or an integer tensor ``[B, k]`` one index per example;
- a callable ``f(output) -> Tensor[B]``: the score per example, from the model's raw output of any
  structure (a tensor, a dict, a tuple, a list) — e.g. :func:`class_in_region` for segmentation.
  Methods that run the model on larger or smaller batches (occlusion, SmoothGrad, integrated gradients,
  Score-CAM, deletion) call it on those batches too, so it must score each row of the output on its
  own and return one score per row.

:func:`resolve_target` turns ``target`` into a *resolved* target — an int64 index tensor (``[B]`` for
classes, ``[B, k]`` otherwise) or the callable — and :func:`score_of` reads the scores with it.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from torchvis.core.reads import on_host

ScoreFunction = Callable[[Any], Tensor]
Target = int | Sequence[int] | Tensor | ScoreFunction | None
Resolved = Tensor | ScoreFunction


def as_target(target: object) -> Any:
    """``target`` with NumPy integers and 0-d integer arrays or tensors turned into ``int`` and a NumPy
    array into a tensor; anything else is returned as it is (checked by :func:`resolve_target`)."""
    if isinstance(target, bool) or target is None or isinstance(target, int):
        return target
    if isinstance(target, numbers.Integral):  # np.int64, np.uint8, ...
        return int(target)
    if type(target).__module__ == "numpy" and hasattr(target, "dtype"):
        if target.dtype.kind not in "iu":
            raise TypeError(f"target must hold integer class indices, not numpy {target.dtype}")
        target = torch.as_tensor(target)
    if isinstance(target, Tensor) and target.dim() == 0:
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise TypeError(f"target must hold integer class indices, not {target.dtype}")
        return int(target.item())
    return target


def is_function(target: object) -> bool:
    """Whether ``target`` is a score function (a callable that is not a tensor)."""
    return callable(target) and not isinstance(target, Tensor)


def resolve_target(target: Target, output: object, batch: int | None = None) -> Resolved:
    """The resolved target for ``output`` (the model's output for ``B`` examples): an int64 index
    tensor on the output's device, ``[B]`` for a ``[B, classes]`` output and ``[B, k]`` for a
    ``[B, d1..dk]`` one, or the score function itself. Raises with a message saying what to pass."""
    if is_function(target):
        return target  # type: ignore[return-value]
    target = as_target(target)
    if (
        not isinstance(output, Tensor)
        or output.dim() == 0
        or batch not in (None, output.shape[0])
        or (output.dim() > 2 and not isinstance(target, (tuple, list, Tensor)))
    ):
        raise ValueError(
            f"torchvis needs a model output of shape [B, classes] for a class target (B={batch}); it "
            f"returned {_describe(output)}. Wrap it in a module whose forward returns that tensor, e.g. "
            "one returning `self.model(x)['logits']`, or `nn.Sequential(model, nn.Flatten())` for "
            "[B, classes, 1, 1]; index a larger output with a tuple target (target=(3, 1) for [B, 5, 2]); "
            "or pass a callable target f(output) -> [B], e.g. torchvis.targets.output_tensor('out', "
            "torchvis.targets.class_in_region(c, mask)) for a segmentation model"
        )
    if output.dim() == 1:
        if isinstance(target, Tensor) and target.shape == (output.shape[0], 0):
            return target  # already resolved (a method's batch of noisy copies or path points)
        if target is not None:
            raise ValueError(
                f"the model returns one score per example (shape {list(output.shape)}); it is explained as "
                f"it is, so target must be None, not {target!r}"
            )
        return torch.zeros(output.shape[0], 0, dtype=torch.long, device=output.device)
    if output.dim() == 2:
        return _class_target(target, output)
    return _index_target(target, output)


def _class_target(target: Any, logits: Tensor) -> Tensor:
    batch, classes = logits.shape
    if target is None:
        return logits.argmax(dim=1)  # no gradient flows into an index
    if isinstance(target, bool):
        raise TypeError("target must be an int, a sequence of ints or an integer tensor, not bool")
    if isinstance(target, int):
        if not 0 <= target < classes:
            raise ValueError(f"target {target} is out of range for {classes} classes")
        return torch.full((batch,), target, dtype=torch.long, device=logits.device)
    if isinstance(target, (float, str)) or not isinstance(target, (Tensor, Iterable)):
        raise TypeError(
            "target must be an int, a sequence of ints, an integer tensor or a callable "
            f"f(output) -> [B], not {type(target).__name__}"
        )
    t = target if isinstance(target, Tensor) else torch.as_tensor(list(target))
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, not {t.dtype}")
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"target must have one class per example ({batch}); got shape {list(t.shape)}")
    def check(bounds: list[float]) -> None:
        low, high = int(bounds[0]), int(bounds[1])
        if low < 0 or high >= classes:
            raise ValueError(f"target {low if low < 0 else high} is out of range for {classes} classes")

    # One read of both bounds, with the call's other checks when it makes one read (then the index is
    # clamped meanwhile: an out-of-range gather would fail on the device before the check could say why).
    checked = on_host(torch.stack(torch.aminmax(t)), check)
    t = t.to(device=logits.device, dtype=torch.long)
    return t if checked else t.clamp(0, classes - 1)


def _index_target(target: Any, output: Tensor) -> Tensor:
    batch, dims = output.shape[0], list(output.shape[1:])
    k = len(dims)
    if isinstance(target, tuple) and not any(isinstance(i, (Iterable, Tensor)) for i in target):
        items = [as_target(i) for i in target]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise TypeError(f"target must hold integer indices; got {target!r}")
        index = torch.tensor(items, dtype=torch.long).expand(batch, -1)
    elif isinstance(target, Tensor):
        index = target
    elif isinstance(target, Iterable) and not isinstance(target, str):
        rows = list(target)
        if not all(isinstance(row, (tuple, list, Tensor)) for row in rows):
            raise TypeError(
                f"the model's output has shape {list(output.shape)}: a list target holds one index tuple "
                f"per example, e.g. [(3, 1), (0, 1)]; got {target!r}"
            )
        index = torch.as_tensor([list(row) for row in rows])
    else:
        raise TypeError(f"target {target!r} cannot index an output of shape {list(output.shape)}")
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(f"target must hold integer indices, not {index.dtype}")
    if index.dim() != 2 or index.shape[1] != k or index.shape[0] != batch:
        raise ValueError(
            f"the model's output has shape {list(output.shape)}: a target needs {k} indices per example "
            f"(a tuple of {k} ints, or [B={batch}, {k}]); got shape {list(index.shape)}"
        )
    def check(bounds: list[float]) -> None:  # the k lowest indices, then the k highest
        for d, (size, low, high) in enumerate(zip(dims, bounds[:k], bounds[k:], strict=True)):
            if low < 0 or high >= size:
                raise ValueError(
                    f"target index {int(low if low < 0 else high)} is out of range for dimension {d + 1} "
                    f"of the output (size {size}; output shape {list(output.shape)})"
                )

    # As for a class target: one read with the call's other checks, the index clamped meanwhile.
    checked = on_host(torch.stack(torch.aminmax(index, dim=0)).flatten(), check)
    index = index.to(device=output.device, dtype=torch.long)
    if not checked:
        index = torch.stack([index[:, d].clamp(0, size - 1) for d, size in enumerate(dims)], dim=1)
    return index.contiguous()


def score_of(output: object, target: Resolved, batch: int) -> Tensor:
    """The explained score of each of the ``batch`` rows of ``output``, ``[batch]``; differentiable.
    ``target`` is resolved (:func:`resolve_target`) for these rows."""
    if is_function(target):
        score = target(output)  # type: ignore[operator]
        if not isinstance(score, Tensor) or score.shape != (batch,) or not score.is_floating_point():
            got = _describe(score) + (f" ({score.dtype})" if isinstance(score, Tensor) else "")
            raise ValueError(
                f"a callable target must return a floating tensor with one score per example [B={batch}] "
                f"(reduce everything else, e.g. .sum(dim=(1, 2))); it returned {got}"
            )
        return score
    assert isinstance(target, Tensor) and isinstance(output, Tensor)
    if target.dim() == 1:
        if output.dim() != 2 or output.shape[0] != batch:
            raise ValueError(f"a class target needs an output [B={batch}, classes]; got {list(output.shape)}")
        return output.gather(1, target.unsqueeze(1)).squeeze(1)  # a view whose backward allocates nothing
    rows = torch.arange(batch, device=output.device)
    return output[(rows,) + tuple(target.unbind(1))]


def take_target(target: Any, rows: Tensor) -> Any:
    """The target of a batch whose row ``i`` belongs to example ``rows[i]``: a per-example tensor's
    rows; a callable, an int or a tuple index (the same for every row) as it is."""
    if isinstance(target, Tensor):
        return target.index_select(0, rows.to(target.device))
    return target


def given_target(target: Target, batch: int) -> Any:
    """``target`` in a form that needs no forward pass to resolve — for methods that run the model on
    other batches (noisy copies, path points) and would otherwise run ``x`` once just to fix the
    target: a callable, an int or a tuple of ints as they are (each row's output is read the same
    way), a per-example sequence, array or tensor as a tensor whose rows :func:`take_target` takes.
    ``None`` when the target depends on the output's values (``target=None``: the predicted class),
    or when its form cannot be told without the output (a tuple, say, with a sequence of length ``B``).
    Each batch's pass checks the rest (range, dtype)."""
    if target is None or is_function(target):
        return target
    target = as_target(target)
    if isinstance(target, int):
        return target
    if isinstance(target, tuple):
        return None  # per-example classes or an index into a larger output: the output decides
    if type(target).__module__ == "numpy" or isinstance(target, (list, range)):
        try:
            target = torch.as_tensor(target)
        except (TypeError, ValueError):
            return None
    if isinstance(target, Tensor) and target.dim() in (1, 2) and target.shape[0] == batch:
        return target.long() if not target.is_floating_point() and target.dtype != torch.bool else None
    return None


# Ready-made score functions.


def class_logit(c: int) -> ScoreFunction:
    """``f(output) = output[:, c]`` for a classification output ``[B, classes]``."""

    def score(output: Any) -> Tensor:
        if not isinstance(output, Tensor) or output.dim() != 2:
            raise ValueError(f"class_logit({c}) needs an output [B, classes]; got {_describe(output)}")
        return output[:, c]

    return score


def class_in_region(c: int, mask: Tensor | None = None) -> ScoreFunction:
    """The sum of class ``c``'s scores inside ``mask`` for a dense output ``[B, classes, *spatial]``.

    ``mask``: boolean or 0/1 (weights allowed) over the spatial dimensions, ``[*spatial]`` (the same for
    every example) — ``None`` sums over the whole output. Pass the segmentation logits (for
    torchvision's segmentation models, ``output_tensor("out", class_in_region(c, mask))``).
    """

    def score(output: Any) -> Tensor:
        if not isinstance(output, Tensor) or output.dim() < 3:
            raise ValueError(
                f"class_in_region({c}) needs a dense output [B, classes, *spatial]; got {_describe(output)} "
                "(for a dict output, wrap it: output_tensor('out', class_in_region(...)))"
            )
        scores = output[:, c]
        if mask is None:
            return scores.flatten(1).sum(dim=1)
        if tuple(mask.shape) != tuple(scores.shape[1:]):
            raise ValueError(
                f"class_in_region's mask has shape {list(mask.shape)}; it must match the output's spatial "
                f"shape {list(scores.shape[1:])}"
            )
        return (scores * mask.to(device=scores.device, dtype=scores.dtype)).flatten(1).sum(dim=1)

    return score


def output_tensor(key: int | str, then: ScoreFunction) -> ScoreFunction:
    """``then(output[key])``: the score of one tensor of a dict, tuple or list output."""

    def score(output: Any) -> Tensor:
        try:
            part = output[key]
        except (KeyError, IndexError, TypeError) as err:
            raise ValueError(
                f"output_tensor({key!r}): the model's output, {_describe(output)}, has no {key!r}"
            ) from err
        return then(part)

    return score


def _describe(output: Any) -> str:
    if isinstance(output, Tensor):
        return f"a tensor of shape {list(output.shape)}"
    if isinstance(output, dict):
        return f"a dict with keys {list(output)}"
    return type(output).__name__
