"""Input-gradient methods: vanilla saliency and guided backprop."""

from __future__ import annotations

from torch import Tensor, nn

from torchvis.core.forward import Target
from torchvis.core.passes import gradient_pass


def saliency(
    model: nn.Module, x: Tensor, target: Target = None, *, abs: bool = False, eval_mode: bool = True
) -> Tensor:
    """Gradient of the target logit with respect to the input. Returns the shape of ``x`` ``[B,C,H,W]``.

    Simonyan, Vedaldi & Zisserman, "Deep Inside Convolutional Networks: Visualising Image
    Classification Models and Saliency Maps", ICLR-W 2014. ``abs=True`` returns its absolute value.
    One forward and one backward to the input; no weight gradient is computed.
    """
    grad = gradient_pass(model, x, target, input_grad=True, eval_mode=eval_mode).input_grad
    assert grad is not None
    grad = grad.to(x.dtype)
    return grad.abs() if abs else grad


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
    grad = gradient_pass(model, x, target, input_grad=True, guided=True, eval_mode=eval_mode).input_grad
    assert grad is not None
    return grad.to(x.dtype)
