"""Grad-CAM and guided Grad-CAM (Selvaraju et al., ICCV 2017)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from torchvis.core.forward import Target
from torchvis.core.hooks import LayerRef
from torchvis.core.passes import gradient_pass


def cam(activation: Tensor, grad: Tensor, *, relu: bool = True) -> Tensor:
    """Grad-CAM from a layer's activation and the score's gradient there, both ``[B,K,h,w]``.

    Channel weights are the spatial mean of the gradient; the map is the weighted channel sum,
    rectified unless ``relu=False``. Returns ``[B,1,h,w]``.
    """
    if activation.dim() != 4:
        raise ValueError(
            "Grad-CAM needs a layer whose output is a feature map [B,K,h,w]; got shape "
            f"{list(activation.shape)}"
        )
    weights = grad.mean(dim=(2, 3), keepdim=True)
    heat = (weights * activation).sum(dim=1, keepdim=True)
    return heat.clamp_min(0) if relu else heat


def upsample_to(heat: Tensor, x: Tensor) -> Tensor:
    """Bilinear (``align_corners=False``) resize of ``[B,1,h,w]`` to ``x``'s ``H, W``."""
    if heat.shape[-2:] == x.shape[-2:]:
        return heat
    return F.interpolate(heat, size=x.shape[-2:], mode="bilinear", align_corners=False)


def cam_map(activation: Tensor, grad: Tensor, x: Tensor, *, relu: bool, upsample: bool) -> Tensor:
    """:func:`cam` in ``x``'s dtype, at ``x``'s size if ``upsample``: ``[B,1,H,W]`` or ``[B,1,h,w]``."""
    heat = cam(activation, grad, relu=relu).to(x.dtype)
    return upsample_to(heat, x) if upsample else heat


def guided_cam(guided_grad: Tensor, activation: Tensor, grad: Tensor, x: Tensor) -> Tensor:
    """Guided Grad-CAM: the guided-backprop gradient ``[B,C,H,W]`` times the upsampled CAM."""
    return (guided_grad * upsample_to(cam(activation, grad), x)).to(x.dtype)


def grad_cam(
    model: nn.Module,
    x: Tensor,
    target: Target = None,
    *,
    layer: LayerRef | None = None,
    relu: bool = True,
    upsample: bool = True,
    eval_mode: bool = True,
) -> Tensor:
    """Grad-CAM at ``layer``. Returns ``[B,1,H,W]`` (``[B,1,h,w]``, the layer's size, if not ``upsample``).

    Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", ICCV 2017. ``layer=None`` takes the last module whose output is still a spatial
    feature map (``layer4`` for torchvision's ResNet) and warns which. The backward pass stops at the
    layer.
    """
    result = gradient_pass(model, x, target, layers=[layer], eval_mode=eval_mode)
    (name,) = result.layer_names
    return cam_map(result.activations[name], result.grads[name], x, relu=relu, upsample=upsample)


def guided_grad_cam(
    model: nn.Module,
    x: Tensor,
    target: Target = None,
    *,
    layer: LayerRef | None,
    eval_mode: bool = True,
) -> Tensor:
    """Guided backprop times the upsampled Grad-CAM at ``layer``. Returns the shape of ``x``.

    Selvaraju et al., ICCV 2017, section 3.2. Two passes: one plain (for the CAM), one guided; both
    explain the same class (the first pass resolves ``target``).
    """
    plain = gradient_pass(model, x, target, layers=[layer], eval_mode=eval_mode)
    (name,) = plain.layer_names
    guided = gradient_pass(model, x, plain.target, input_grad=True, guided=True, eval_mode=eval_mode)
    assert guided.input_grad is not None
    return guided_cam(guided.input_grad, plain.activations[name], plain.grads[name], x)
