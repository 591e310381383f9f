"""Input-gradient methods: vanilla saliency, guided backprop and gradient x input."""

from __future__ import annotations

from typing import Any

from torchvis.core.inputs import InputLike, Model
from torchvis.core.passes import Shared, shared_passes
from torchvis.core.reads import one_host_read
from torchvis.core.targets import Target
from torchvis.methods.spec import Look, Need, register


def saliency(
    model: Model,
    x: InputLike,
    target: Target = None,
    *,
    abs: bool = False,
    eval_mode: bool = True,
    forward_args: Any = None,
    forward_kwargs: dict[str, Any] | None = None,
) -> InputLike:
    """Gradient of the target score with respect to the input. Returns the structure and shape of
    ``x`` (a tensor ``[B, ...]`` or a tuple of them, one gradient per input).

    Simonyan, Vedaldi & Zisserman, "Deep Inside Convolutional Networks: Visualising Image
    Classification Models and Saliency Maps", ICLR-W 2014. ``abs=True`` returns its absolute value.
    One forward and one backward to the inputs; no weight gradient is computed. ``model`` may be any
    callable; ``forward_args``/``forward_kwargs`` are passed to it unchanged and never attributed.
    """
    with one_host_read():  # the target's and the gradients' checks: one host read
        (shared,) = shared_passes(model, x, target, input_grad=True, eval_mode=eval_mode,
                                  forward_args=forward_args, forward_kwargs=forward_kwargs)
        return saliency_from(shared, abs=abs)


def saliency_from(shared: Shared, *, abs: bool = False) -> InputLike:
    """:func:`saliency` from the shared plain pass."""
    assert shared.input_grads is not None
    grads = [g.to(t.dtype) for g, t in zip(shared.input_grads, shared.inputs.tensors, strict=True)]
    return shared.inputs.pack([g.abs() if abs else g for g in grads])


def gradient_x_input(
    model: Model,
    x: InputLike,
    target: Target = None,
    *,
    eval_mode: bool = True,
    forward_args: Any = None,
    forward_kwargs: dict[str, Any] | None = None,
) -> InputLike:
    """The input times the gradient of the target score at it. Returns the structure and shape of
    ``x`` (one map per input).

    Shrikumar, Greenside, Shcherbina & Kundaje, "Not Just a Black Box: Learning Important Features
    Through Propagating Activation Differences", arXiv:1605.01713, 2016. It reads the same forward
    and backward as :func:`saliency`; for a linear model it is each input's share ``w * x`` of the logit.
    """
    with one_host_read():  # the target's and the gradients' checks: one host read
        (shared,) = shared_passes(model, x, target, input_grad=True, eval_mode=eval_mode,
                                  forward_args=forward_args, forward_kwargs=forward_kwargs)
        return gradient_x_input_from(shared)


def gradient_x_input_from(shared: Shared) -> InputLike:
    """:func:`gradient_x_input` from the shared plain pass."""
    assert shared.input_grads is not None
    return shared.inputs.pack([(g * t.detach()).to(t.dtype)
                               for g, t in zip(shared.input_grads, shared.inputs.tensors, strict=True)])


def guided_backprop(
    model: Model,
    x: InputLike,
    target: Target = None,
    *,
    eval_mode: bool = True,
    forward_args: Any = None,
    forward_kwargs: dict[str, Any] | None = None,
) -> InputLike:
    """Guided backpropagation. Returns the structure and shape of ``x`` (one map per input).

    Springenberg, Dosovitskiy, Brox & Riedmiller, "Striving for Simplicity: The All Convolutional
    Net", ICLR-W 2015: at every ReLU the gradient passes only where both the forward input and the
    incoming gradient are positive. Every ReLU is treated — ``nn.ReLU`` (in place or not, reused or
    not) and functional calls (``F.relu``, ``torch.relu``, ``Tensor.relu``, ``relu_``). Other
    activations (GELU, SiLU, ...) keep their plain gradient, and a warning names them.
    Needs an ``nn.Module`` (it rewrites the ReLUs' backward while the model runs).
    """
    with one_host_read():  # the target's and the gradients' checks: one host read
        (shared,) = shared_passes(model, x, target, guided=True, eval_mode=eval_mode,
                                  forward_args=forward_args, forward_kwargs=forward_kwargs)
        return guided_backprop_from(shared)


def guided_backprop_from(shared: Shared) -> InputLike:
    """:func:`guided_backprop` from the shared guided pass."""
    assert shared.guided_grads is not None
    return shared.inputs.pack([g.to(t.dtype) for g, t in zip(shared.guided_grads, shared.inputs.tensors,
                                                              strict=True)])


register("saliency", saliency, needs=Need.INPUT_GRADIENT, from_pass=saliency_from, look=Look.SIGNED,
         title="saliency")
register("guided_backprop", guided_backprop, needs=Need.GUIDED, from_pass=guided_backprop_from,
         look=Look.RGB, title="guided backprop")
register("gradient_x_input", gradient_x_input, needs=Need.INPUT_GRADIENT, from_pass=gradient_x_input_from,
         look=Look.SIGNED, title="gradient × input")
