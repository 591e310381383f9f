"""What a model is called with: the attributed tensors and the extra arguments that are not attributed.

Every method takes ``x`` as one tensor ``[B, ...]`` of any shape (an image ``[B,C,H,W]``, features
``[B,N]``, a signal ``[B,C,L]``, a volume ``[B,C,D,H,W]``) or a tuple of such tensors with the same
``B``, and returns the same structure: one map per input. :func:`as_inputs` checks them once and
wraps them in :class:`Inputs`, which calls the model as ``model(*tensors, *forward_args,
**forward_kwargs)`` and packs the maps back into the user's structure.

Extra arguments (``forward_args``, ``forward_kwargs``) are passed to the model unchanged and never
attributed. When a method runs the model on a batch built from the examples — noisy copies
(SmoothGrad), path points (integrated gradients), occluded copies, masked copies (Score-CAM) — each
row of that batch belongs to one example, and a tensor argument is **per example** if its first
dimension is ``B``: its rows are taken for each row of the batch (:meth:`Inputs.take`). A 0-d tensor
or one whose first dimension is 1 is **shared** and passed as it is, as is anything that is not a
tensor. Any other tensor is an error before any work (it could not be matched to the examples).
With ``B = 1`` a tensor argument whose first dimension is 1 is treated as per example, which passes
the same values either way. The attributed tensors are copied before the model sees them (a model
that changes its input in place cannot reach yours); extra arguments are passed as they are, so a
model that changes one in place changes the caller's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

Model = nn.Module | Callable[..., Any]
InputLike = Tensor | tuple[Tensor, ...]


@dataclass(frozen=True)
class Inputs:
    """The inputs of one attribution call.

    ``tensors``: the attributed tensors, each ``[B, ...]``; ``was_tuple``: whether the user passed a
    tuple (then maps come back as a tuple, even of one); ``forward_args`` / ``forward_kwargs``: passed
    to the model after the tensors, never attributed.
    """

    tensors: tuple[Tensor, ...]
    was_tuple: bool = False
    forward_args: tuple[Any, ...] = ()
    forward_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        """``B``, the number of examples."""
        return self.tensors[0].shape[0]

    @property
    def first(self) -> Tensor:
        """The first attributed tensor (the image, for the layer methods that draw over it)."""
        return self.tensors[0]

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def call(self, model: Model, tensors: Sequence[Tensor] | None = None, rows: Tensor | None = None) -> Any:
        """``model(*tensors, *forward_args, **forward_kwargs)``; ``tensors`` default to the inputs.

        ``rows`` (``[B']`` int64): the example each row of ``tensors`` belongs to, when the method built
        a batch of another size; per-example extra arguments are taken at those rows.
        """
        args, kwargs = (self.forward_args, self.forward_kwargs) if rows is None else self._taken(rows)
        return model(*(self.tensors if tensors is None else tensors), *args, **kwargs)

    def take(self, rows: Tensor, tensors: Sequence[Tensor] | None = None) -> Inputs:
        """Inputs for a batch whose row ``i`` belongs to example ``rows[i]``: the attributed tensors are
        ``tensors`` (default: the inputs' rows), per-example extra arguments their rows."""
        if tensors is None:
            tensors = [t.index_select(0, rows) for t in self.tensors]
        args, kwargs = self._taken(rows)
        return Inputs(tuple(tensors), self.was_tuple, args, kwargs)

    def pack(self, maps: Sequence[Tensor]) -> InputLike:
        """``maps`` (one per input) in the structure the user passed: a tuple, or the one tensor."""
        maps = tuple(maps)
        if len(maps) != len(self.tensors):
            raise AssertionError(f"{len(maps)} maps for {len(self.tensors)} inputs")
        return maps if self.was_tuple else maps[0]

    def _taken(self, rows: Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
        batch = self.batch
        args = tuple(_rows_of(a, rows, batch) for a in self.forward_args)
        kwargs = {k: _rows_of(v, rows, batch) for k, v in self.forward_kwargs.items()}
        return args, kwargs


def _rows_of(value: Any, rows: Tensor, batch: int) -> Any:
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, rows.to(value.device))
    return value


def as_inputs(
    x: object,
    forward_args: object = None,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> Inputs:
    """Check ``x`` (a tensor ``[B, ...]`` or a tuple of them, same ``B``, floating) and the extra
    arguments (see the module's rule), and wrap them. Raises before any work with a message that says
    what was wrong."""
    if isinstance(x, Inputs):
        if forward_args is not None or forward_kwargs:
            raise TypeError("pass forward_args/forward_kwargs either in the Inputs or as arguments, not both")
        return x
    was_tuple = isinstance(x, tuple)
    if isinstance(x, list):
        raise TypeError("several inputs are passed as a tuple of tensors, not a list: x=(image, meta)")
    tensors: tuple[Any, ...] = x if isinstance(x, tuple) else (x,)
    if not tensors:
        raise ValueError("x is an empty tuple; pass at least one tensor")
    for i, t in enumerate(tensors):
        name = f"x[{i}]" if was_tuple else "x"
        if not isinstance(t, Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor of shape [B, ...] (or x a tuple of them), "
                f"not {type(t).__name__}"
            )
        if t.dim() == 0:
            raise ValueError(f"{name} must have a batch dimension [B, ...]; got a 0-d tensor")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor; got {t.dtype}")
        if t.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch")
    batch = tensors[0].shape[0]
    if len(tensors) > 1:  # one tensor has nothing to compare with (the common call stays cheap)
        batches = [t.shape[0] for t in tensors]
        if len(set(batches)) > 1:
            raise ValueError(
                f"the inputs of a tuple must share the batch size B; got {batches} "
                f"(shapes {[list(t.shape) for t in tensors]})"
            )
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            raise ValueError(f"the inputs are on different devices: {sorted(map(str, devices))}")
    if forward_args is None:
        args: tuple[Any, ...] = ()
    elif isinstance(forward_args, tuple):
        args = forward_args
    else:
        args = (forward_args,)
    if forward_kwargs is None:
        forward_kwargs = {}
    if not isinstance(forward_kwargs, Mapping):
        raise TypeError(f"forward_kwargs must be a dict, not {type(forward_kwargs).__name__}")
    named = [(f"forward_args[{i}]", a) for i, a in enumerate(args)] if args else []
    named += [(f"forward_kwargs[{k!r}]", v) for k, v in forward_kwargs.items()]
    for name, value in named:
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] not in (batch, 1):
            raise ValueError(
                f"{name} has shape {list(value.shape)}: a tensor argument must have the batch size "
                f"B={batch} as its first dimension (one row per example) or be shared (0-d, or first "
                "dimension 1); torchvis could not match its rows to the examples"
            )
    return Inputs(tuple(tensors), was_tuple, args, dict(forward_kwargs))


def check_model(model: object) -> None:
    """``model`` must be an ``nn.Module`` or another callable."""
    if not callable(model):
        raise TypeError(f"model must be an nn.Module or a callable, not {type(model).__name__}")


def check_module(model: object, method: str) -> nn.Module:
    """``model`` must be an ``nn.Module``: ``method`` places hooks on it (a layer or its ReLUs)."""
    check_model(model)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{method} needs an nn.Module (it reads a layer or the ReLUs through module hooks); got a "
            f"plain {type(model).__name__}. Pass the module itself (and layer=...), or use a method that "
            "needs no hook: saliency, gradient_x_input, integrated_gradients, smoothgrad, vargrad, "
            "occlusion"
        )
    return model


# A value given per input: occlusion's and integrated gradients' baselines, deletion's baseline,
# insertion's start. One for every input, or for a tuple ``x`` a tuple with one per input.
Fill = float | Tensor
PerInput = Fill | tuple[Fill, ...]


def per_input(value: Any, inputs: Inputs, what: str) -> list[tuple[Any, str]]:
    """``value`` for each input with its name for messages (``"baseline"``, ``"baseline[1]"``): one
    value for all, or for a tuple ``x`` a tuple with one per input. A tensor of more than 0 dimensions
    for a tuple of inputs is ambiguous (which input does it fit?) and refused; so is a list."""
    count = len(inputs.tensors)
    if isinstance(value, list):
        raise TypeError(f"one {what} per input is a tuple, not a list: {what}=(0.0, meta_mean)")
    if not inputs.was_tuple:
        return [(value, what)]
    if isinstance(value, tuple):
        if len(value) != count:
            raise TypeError(f"x is a tuple of {count} inputs: {what} must be one per input; got {len(value)} "
                            f"entries for {count} inputs")
        return [(v, f"{what}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Tensor) and value.dim() > 0 and count > 1:
        raise TypeError(f"x is a tuple of {count} inputs: pass {what} as a number or one per input, "
                        f"{what}=(b0, b1, ...); give the baselines as a tuple")
    return [(value, f"{what}[{i}]") for i in range(count)]


def fill_like(value: Any, x: Tensor, what: str, name: str = "x") -> Tensor:
    """A number or a tensor broadcastable to ``x`` (called ``name`` in messages), in ``x``'s dtype and
    device, expanded to its shape; NaN or Inf is an error. A number becomes a device tensor through a
    fill kernel: a copy from the host would wait for the GPU."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{what} must be a number or a tensor broadcastable to the input; got "
                        f"{type(value).__name__}")
    if isinstance(value, Tensor):
        t = value.detach().to(dtype=x.dtype, device=x.device)
        finite = bool(torch.isfinite(t).all())
    else:
        t, finite = torch.full((), value, dtype=x.dtype, device=x.device), math.isfinite(value)
    try:
        shape = torch.broadcast_shapes(t.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise ValueError(
            f"{what} of shape {list(t.shape)} does not broadcast to {name}'s shape {list(x.shape)}"
        )
    if not finite:
        raise ValueError(f"{what} contains NaN or Inf")
    return t.expand_as(x)


def fills(value: PerInput, inputs: Inputs, what: str = "baseline") -> list[Tensor]:
    """:func:`per_input` then :func:`fill_like`: each input's value expanded to its shape."""
    named = per_input(value, inputs, what)
    return [fill_like(v, t, name, f"x[{i}]" if inputs.was_tuple else "x")
            for i, ((v, name), t) in enumerate(zip(named, inputs.tensors, strict=True))]
