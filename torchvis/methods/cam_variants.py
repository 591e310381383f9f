"""Grad-CAM++, XGrad-CAM, LayerCAM and HiResCAM: other ways to turn a layer's activation and gradient
into a map.

Each variant is a heat function of the layer's activation ``A`` and the target logit's gradient
``g`` there (both ``[B,K,*spatial]``) returning the unrectified heat ``[B,1,*spatial]``, like
:func:`torchvis.methods.cam.grad_cam_heat`; :func:`torchvis.methods.cam.cam_from` rectifies and
upsamples it. All of them read the shared forward+backward, so :func:`torchvis.explain` computes
every variant at every layer from the one pass it runs for saliency and Grad-CAM.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from torchvis.core import layouts
from torchvis.core.hooks import LayerAddress
from torchvis.core.inputs import InputLike, Model
from torchvis.core.passes import Shared
from torchvis.core.targets import Target
from torchvis.methods.cam import Heat, Upsample, cam_from, cam_of
from torchvis.methods.spec import Look, Need, register


def _spatial(t: Tensor) -> tuple[int, ...]:
    return tuple(range(2, t.dim()))


def grad_cam_pp_heat(activation: Tensor, grad: Tensor) -> Tensor:
    """Grad-CAM++ (Eq. 19, exponential form): ``alpha = g^2 / (2 g^2 + sum_ab A_ab * g^3)`` (0 where
    the denominator is 0), ``w_k = sum_ij alpha_ij ReLU(g_ij)``, heat ``sum_k w_k A_k``."""
    g2 = grad * grad
    denominator = 2 * g2 + activation.sum(dim=_spatial(activation), keepdim=True) * g2 * grad
    safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    alpha = torch.where(denominator != 0, g2 / safe, torch.zeros_like(g2))
    weights = (alpha * grad.clamp_min(0)).sum(dim=_spatial(grad), keepdim=True)
    return (weights * activation).sum(dim=1, keepdim=True)


def xgrad_cam_heat(activation: Tensor, grad: Tensor) -> Tensor:
    """XGrad-CAM: ``w_k = sum_ij (A_ij / sum_ab A_ab) g_ij`` (0 where ``sum A = 0``), heat
    ``sum_k w_k A_k``."""
    total = activation.sum(dim=_spatial(activation), keepdim=True)
    safe = torch.where(total != 0, total, torch.ones_like(total))
    weights = torch.where(total != 0, (activation * grad).sum(dim=_spatial(grad), keepdim=True) / safe, 0.0)
    return (weights * activation).sum(dim=1, keepdim=True)


def layer_cam_heat(activation: Tensor, grad: Tensor) -> Tensor:
    """LayerCAM: ``sum_k ReLU(g_k) * A_k`` per position."""
    return (grad.clamp_min(0) * activation).sum(dim=1, keepdim=True)


def hires_cam_heat(activation: Tensor, grad: Tensor) -> Tensor:
    """HiResCAM: ``sum_k g_k * A_k`` per position."""
    return (grad * activation).sum(dim=1, keepdim=True)


_TITLES: dict[Heat, str] = {
    grad_cam_pp_heat: "Grad-CAM++", xgrad_cam_heat: "XGrad-CAM", layer_cam_heat: "LayerCAM",
    hires_cam_heat: "HiResCAM",
}


def _variant_from(
    heat: Heat, shared: Shared, relu: bool, upsample: Upsample, reshape: layouts.Reshape
) -> Tensor:
    return cam_from(shared, heat, _TITLES[heat], relu=relu, upsample=upsample, reshape=reshape)


def _variant(
    heat: Heat, model: Model, x: InputLike, target: Target, layer: LayerAddress | None, relu: bool,
    upsample: Upsample, reshape: layouts.Reshape, layer_input: bool, eval_mode: bool, forward_args: Any,
    forward_kwargs: Mapping[str, Any] | None,
) -> Tensor:
    return cam_of(heat, _TITLES[heat], model, x, target, layer=layer, relu=relu, upsample=upsample,
                  reshape=reshape, layer_input=layer_input, eval_mode=eval_mode, forward_args=forward_args,
                  forward_kwargs=forward_kwargs)


def grad_cam_pp_from(
    shared: Shared, *, relu: bool = True, upsample: Upsample = True, reshape: layouts.Reshape = None,
    layer_input: bool = False,
) -> Tensor:
    """:func:`grad_cam_pp` from the shared plain pass at one layer."""
    return _variant_from(grad_cam_pp_heat, shared, relu, upsample, reshape)


def xgrad_cam_from(
    shared: Shared, *, relu: bool = True, upsample: Upsample = True, reshape: layouts.Reshape = None,
    layer_input: bool = False,
) -> Tensor:
    """:func:`xgrad_cam` from the shared plain pass at one layer."""
    return _variant_from(xgrad_cam_heat, shared, relu, upsample, reshape)


def layer_cam_from(
    shared: Shared, *, relu: bool = True, upsample: Upsample = True, reshape: layouts.Reshape = None,
    layer_input: bool = False,
) -> Tensor:
    """:func:`layer_cam` from the shared plain pass at one layer."""
    return _variant_from(layer_cam_heat, shared, relu, upsample, reshape)


def hires_cam_from(
    shared: Shared, *, relu: bool = True, upsample: Upsample = True, reshape: layouts.Reshape = None,
    layer_input: bool = False,
) -> Tensor:
    """:func:`hires_cam` from the shared plain pass at one layer."""
    return _variant_from(hires_cam_heat, shared, relu, upsample, reshape)


def grad_cam_pp(
    model: Model, x: InputLike, target: Target = None, *, layer: LayerAddress | None = None,
    relu: bool = True, upsample: Upsample = True, reshape: layouts.Reshape = None, layer_input: bool = False,
    eval_mode: bool = True, forward_args: Any = None, forward_kwargs: Mapping[str, Any] | None = None,
) -> Tensor:
    """Grad-CAM++ at ``layer``. Returns ``[B,1,*x.shape[2:]]`` (the layer's size if ``upsample=None``).

    Chattopadhyay, Sarkar, Howlader & Balasubramanian, "Grad-CAM++: Generalized Gradient-based
    Visual Explanations for Deep Convolutional Networks", WACV 2018, Eq. 19 (the exponential form):
    ``alpha_ij = g_ij^2 / (2 g_ij^2 + sum_ab A_ab g_ij^3)``, 0 where that denominator is 0;
    ``w_k = sum_ij alpha_ij ReLU(g_ij)``; map ``ReLU(sum_k w_k A_k)``. torchcam 0.5 divides alpha on a
    copy (boolean indexing copies), so its alpha stays ``g^2``, and sums ``A * g^3`` instead of
    ``sum A * g^3``. ``layer``, ``relu``, ``upsample``, ``reshape``, ``layer_input`` as in
    :func:`torchvis.grad_cam` (also a tuple ``x``, ``forward_args``).
    """
    return _variant(grad_cam_pp_heat, model, x, target, layer, relu, upsample, reshape, layer_input,
                    eval_mode, forward_args, forward_kwargs)


def xgrad_cam(
    model: Model, x: InputLike, target: Target = None, *, layer: LayerAddress | None = None,
    relu: bool = True, upsample: Upsample = True, reshape: layouts.Reshape = None, layer_input: bool = False,
    eval_mode: bool = True, forward_args: Any = None, forward_kwargs: Mapping[str, Any] | None = None,
) -> Tensor:
    """XGrad-CAM at ``layer``. Returns ``[B,1,*x.shape[2:]]`` (the layer's size if ``upsample=None``).

    Fu, Hu, Dong, Zhou, Huang & Zhang, "Axiom-based Grad-CAM: Towards Accurate Visualization and
    Explanation of CNNs", BMVC 2020: ``w_k = sum_ij (A_ij / sum_ab A_ab) g_ij`` (0 for a channel whose
    activations sum to 0); map ``ReLU(sum_k w_k A_k)``. ``layer``, ``relu``, ``upsample`` as in
    :func:`torchvis.grad_cam` (also ``reshape``, ``layer_input``).
    """
    return _variant(xgrad_cam_heat, model, x, target, layer, relu, upsample, reshape, layer_input,
                    eval_mode, forward_args, forward_kwargs)


def layer_cam(
    model: Model, x: InputLike, target: Target = None, *, layer: LayerAddress | None = None,
    relu: bool = True, upsample: Upsample = True, reshape: layouts.Reshape = None, layer_input: bool = False,
    eval_mode: bool = True, forward_args: Any = None, forward_kwargs: Mapping[str, Any] | None = None,
) -> Tensor:
    """LayerCAM at ``layer``. Returns ``[B,1,*x.shape[2:]]`` (the layer's size if ``upsample=None``).

    Jiang, Zhang, Hou, Cheng & Wei, "LayerCAM: Exploring Hierarchical Class Activation Maps for
    Localization", IEEE TIP 2021: every position weighs each channel by its own positive gradient,
    map ``ReLU(sum_k ReLU(g_k) * A_k)``. ``layer``, ``relu``, ``upsample``, ``reshape``,
    ``layer_input`` as in :func:`torchvis.grad_cam`.
    """
    return _variant(layer_cam_heat, model, x, target, layer, relu, upsample, reshape, layer_input,
                    eval_mode, forward_args, forward_kwargs)


def hires_cam(
    model: Model, x: InputLike, target: Target = None, *, layer: LayerAddress | None = None,
    relu: bool = True, upsample: Upsample = True, reshape: layouts.Reshape = None, layer_input: bool = False,
    eval_mode: bool = True, forward_args: Any = None, forward_kwargs: Mapping[str, Any] | None = None,
) -> Tensor:
    """HiResCAM at ``layer``. Returns ``[B,1,*x.shape[2:]]`` (the layer's size if ``upsample=None``).

    Draelos & Carin, "Use HiResCAM instead of Grad-CAM for faithful explanations of convolutional
    neural networks", arXiv:2011.08891, 2020: the gradient times the activation, summed over channels
    per position, map ``ReLU(sum_k g_k * A_k)``. ``layer``, ``relu``, ``upsample`` as in
    :func:`torchvis.grad_cam` (also ``reshape``, ``layer_input``).
    """
    return _variant(hires_cam_heat, model, x, target, layer, relu, upsample, reshape, layer_input,
                    eval_mode, forward_args, forward_kwargs)


register("grad_cam_pp", grad_cam_pp, needs=Need.LAYER_GRADIENT, from_pass=grad_cam_pp_from,
         look=Look.HEAT_OVERLAY, title="Grad-CAM++")
register("xgrad_cam", xgrad_cam, needs=Need.LAYER_GRADIENT, from_pass=xgrad_cam_from, look=Look.HEAT_OVERLAY,
         title="XGrad-CAM")
register("layer_cam", layer_cam, needs=Need.LAYER_GRADIENT, from_pass=layer_cam_from, look=Look.HEAT_OVERLAY,
         title="LayerCAM")
register("hires_cam", hires_cam, needs=Need.LAYER_GRADIENT, from_pass=hires_cam_from, look=Look.HEAT_OVERLAY,
         title="HiResCAM")
