"""Input-gradient methods: vanilla saliency, guided backprop and gradient x input."""

from __future__ import annotations

from torch import Tensor, nn

from torchvis.core.forward import Target
from torchvis.core.passes import Shared, shared_passes
from torchvis.methods.spec import Look, Need, register


def saliency(
    model: nn.Module, x: Tensor, target: Target = None, *, abs: bool = False, eval_mode: bool = True
) -> Tensor:
    """Gradient of the target logit with respect to the input. Returns the shape of ``x`` ``[B,C,H,W]``.

    Simonyan, Vedaldi & Zisserman, "Deep Inside Convolutional Networks: Visualising Image
    Classification Models and Saliency Maps", ICLR-W 2014. ``abs=True`` returns its absolute value.
    One forward and one backward to the input; no weight gradient is computed.
    """
    (shared,) = shared_passes(model, x, target, input_grad=True, eval_mode=eval_mode)
    return saliency_from(shared, abs=abs)


def saliency_from(shared: Shared, *, abs: bool = False) -> Tensor:
    """:func:`saliency` from the shared plain pass."""
    assert shared.input_grad is not None
    grad = shared.input_grad.to(shared.x.dtype)
    return grad.abs() if abs else grad


def gradient_x_input(
    model: nn.Module, x: Tensor, target: Target = None, *, eval_mode: bool = True
) -> Tensor:
    """The input times the gradient of the target logit at it. Returns the shape of ``x`` ``[B,C,H,W]``.

    Shrikumar, Greenside, Shcherbina & Kundaje, "Not Just a Black Box: Learning Important Features
    Through Propagating Activation Differences", arXiv:1605.01713, 2016. It reads the same forward
    and backward as :func:`saliency`; for a linear model it is each input's share ``w * x`` of the logit.
    """
    (shared,) = shared_passes(model, x, target, input_grad=True, eval_mode=eval_mode)
    return gradient_x_input_from(shared)


def gradient_x_input_from(shared: Shared) -> Tensor:
    """:func:`gradient_x_input` from the shared plain pass."""
    assert shared.input_grad is not None
    return (shared.input_grad * shared.x.detach()).to(shared.x.dtype)


def guided_backprop(
    model: nn.Module, x: Tensor, target: Target = None, *, eval_mode: bool = True
) -> Tensor:
    """Guided backpropagation. Returns the shape of ``x`` ``[B,C,H,W]``.

    Springenberg, Dosovitskiy, Brox & Riedmiller, "Striving for Simplicity: The All Convolutional
    Net", ICLR-W 2015: at every ReLU the gradient passes only where both the forward input and the
    incoming gradient are positive. Every ReLU is treated — ``nn.ReLU`` (in place or not, reused or
    not) and functional calls (``F.relu``, ``torch.relu``, ``Tensor.relu``, ``relu_``). Other
    activations (GELU, SiLU, ...) keep their plain gradient, and a warning names them.
    """
    (shared,) = shared_passes(model, x, target, guided=True, eval_mode=eval_mode)
    return guided_backprop_from(shared)


def guided_backprop_from(shared: Shared) -> Tensor:
    """:func:`guided_backprop` from the shared guided pass."""
    assert shared.guided_grad is not None
    return shared.guided_grad.to(shared.x.dtype)


register("saliency", saliency, needs=Need.INPUT_GRADIENT, from_pass=saliency_from, look=Look.SIGNED,
         title="saliency")
register("guided_backprop", guided_backprop, needs=Need.GUIDED, from_pass=guided_backprop_from,
         look=Look.RGB, title="guided backprop")
register("gradient_x_input", gradient_x_input, needs=Need.INPUT_GRADIENT, from_pass=gradient_x_input_from,
         look=Look.SIGNED, title="gradient × input")
