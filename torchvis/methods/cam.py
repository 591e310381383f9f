"""Grad-CAM and guided Grad-CAM (Selvaraju et al., ICCV 2017).

A CAM variant is a function of the layer's activation ``A`` and the target logit's gradient ``g``
there (both ``[B,K,h,w]``) returning the unrectified heat ``[B,1,h,w]``; :func:`finish_cam`
rectifies and upsamples it. Every variant at every layer reads the one shared forward+backward.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from torchvis.core.hooks import LayerRef
from torchvis.core.inputs import InputLike, Model
from torchvis.core.passes import Shared, shared_passes
from torchvis.core.targets import Target
from torchvis.methods.spec import Look, Need, register


def grad_cam_heat(activation: Tensor, grad: Tensor) -> Tensor:
    """Grad-CAM's heat before the ReLU: channel weights = the spatial mean of the gradient, map = the
    weighted channel sum. ``[B,K,h,w]`` x2 -> ``[B,1,h,w]``."""
    weights = grad.mean(dim=(2, 3), keepdim=True)
    return (weights * activation).sum(dim=1, keepdim=True)


def cam(activation: Tensor, grad: Tensor, *, relu: bool = True) -> Tensor:
    """Grad-CAM from a layer's activation and the score's gradient there, both ``[B,K,h,w]``.

    Returns ``[B,1,h,w]``, rectified unless ``relu=False``.
    """
    check_feature_map(activation)
    heat = grad_cam_heat(activation, grad)
    return heat.clamp_min(0) if relu else heat


def check_feature_map(activation: Tensor, method: str = "Grad-CAM") -> None:
    """``activation`` must be a feature map ``[B,K,h,w]``: a CAM of ``method`` needs a spatial layer."""
    if activation.dim() != 4:
        raise ValueError(
            f"{method} needs a layer whose output is a feature map [B,K,h,w]; got shape "
            f"{list(activation.shape)}"
        )


class EmptyMapWarning(UserWarning):
    """A map that is exactly zero (or constant) for some examples: it shows nothing, and ranks pixels by
    index in a deletion or insertion test."""


def warn_if_empty(heat: Tensor, activation: Tensor, layer_name: str) -> None:
    """Warn when the CAM ``heat`` ``[B,1,h,w]`` is exactly zero for some examples, saying for how many;
    when the layer's ``activation`` has negative values, suggest the activation after the layer."""
    empty = int((heat == 0).flatten(1).all(dim=1).sum())
    if not empty:
        return
    hint = (
        f"{layer_name!r} outputs negative values (a convolution before its activation?): the map at "
        "the activation after it (its ReLU, or a pooling layer) is usually informative"
        if bool((activation < 0).any())
        else "the target's gradient at the layer weighs every location's channels to zero or less"
    )
    warnings.warn(
        f"the CAM at {layer_name!r} is exactly zero for {empty} of {heat.shape[0]} examples, so it shows "
        f"nothing for them; {hint}",
        EmptyMapWarning,
        stacklevel=_first_caller_outside_torchvis(),
    )


def _first_caller_outside_torchvis() -> int:
    """The ``stacklevel`` (for a warning issued by our caller) of the first frame outside torchvis, so
    a warning points at the user's line whether it came through ``grad_cam``, ``explain`` or a monitor."""
    frame, level = sys._getframe(2), 2
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("torchvis."):
        frame, level = frame.f_back, level + 1
    return level


def upsample_to(heat: Tensor, x: Tensor) -> Tensor:
    """Bilinear (``align_corners=False``) resize of ``[B,1,h,w]`` to ``x``'s ``H, W``."""
    if heat.shape[-2:] == x.shape[-2:]:
        return heat
    return F.interpolate(heat, size=x.shape[-2:], mode="bilinear", align_corners=False)


def finish_cam(heat: Tensor, x: Tensor, *, relu: bool, upsample: bool) -> Tensor:
    """Rectify (unless ``relu=False``) a CAM heat ``[B,1,h,w]`` and bring it to ``x``'s dtype and, if
    ``upsample``, to its size: ``[B,1,H,W]`` or ``[B,1,h,w]``."""
    heat = (heat.clamp_min(0) if relu else heat).to(x.dtype)
    return upsample_to(heat, x) if upsample else heat


def cam_map(
    activation: Tensor, grad: Tensor, x: Tensor, *, relu: bool, upsample: bool, layer_name: str = "the layer"
) -> Tensor:
    """:func:`cam` in ``x``'s dtype, at ``x``'s size if ``upsample``: ``[B,1,H,W]`` or ``[B,1,h,w]``.
    Warns (:class:`EmptyMapWarning`) when the map is exactly zero for some examples."""
    check_feature_map(activation)
    heat = grad_cam_heat(activation, grad)
    warn_if_empty(heat.clamp_min(0) if relu else heat, activation, layer_name)
    return finish_cam(heat, x, relu=relu, upsample=upsample)


def grad_cam_from(shared: Shared, *, relu: bool = True, upsample: bool = True) -> Tensor:
    """:func:`grad_cam` from the shared plain pass at one layer."""
    assert shared.activation is not None and shared.grad is not None
    return cam_map(shared.activation, shared.grad, shared.x, relu=relu, upsample=upsample,
                   layer_name=shared.layer or "the layer")


def guided_cam(guided_grad: Tensor, activation: Tensor, grad: Tensor, x: Tensor) -> Tensor:
    """Guided Grad-CAM: the guided-backprop gradient ``[B,C,H,W]`` times the upsampled CAM."""
    return (guided_grad * upsample_to(cam(activation, grad), x)).to(x.dtype)


def guided_grad_cam_from(shared: Shared) -> Tensor:
    """:func:`guided_grad_cam` from the shared plain pass (at one layer) and guided pass."""
    assert shared.guided_grad is not None and shared.activation is not None and shared.grad is not None
    return guided_cam(shared.guided_grad, shared.activation, shared.grad, shared.x)


def grad_cam(
    model: Model,
    x: InputLike,
    target: Target = None,
    *,
    layer: LayerRef | None = None,
    relu: bool = True,
    upsample: bool = True,
    eval_mode: bool = True,
    forward_args: Any = None,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> Tensor:
    """Grad-CAM at ``layer``. Returns ``[B,1,H,W]`` (``[B,1,h,w]``, the layer's size, if not ``upsample``).

    Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", ICCV 2017. ``layer=None`` takes the last module whose output is still a spatial
    feature map (``layer4`` for torchvision's ResNet) and warns which. Grad-CAM wants a rectified map:
    the output of a ReLU (or a pooling after it), not the convolution before it. The backward pass
    stops at the layer. ``x`` may be a tuple of inputs: the map is drawn over the first (upsampled to
    its size); ``forward_args``/``forward_kwargs`` go to the model (see :mod:`torchvis.core.inputs`).
    Needs an ``nn.Module`` (it reads the layer through hooks).
    """
    (shared,) = shared_passes(model, x, target, layers=[layer], eval_mode=eval_mode,
                              forward_args=forward_args, forward_kwargs=forward_kwargs)
    return grad_cam_from(shared, relu=relu, upsample=upsample)


def guided_grad_cam(
    model: Model,
    x: InputLike,
    target: Target = None,
    *,
    layer: LayerRef | None = None,
    eval_mode: bool = True,
    forward_args: Any = None,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> Tensor:
    """Guided backprop times the upsampled Grad-CAM at ``layer``. Returns the shape of ``x`` (of its
    first input when ``x`` is a tuple: the CAM is drawn over it).

    Selvaraju et al., ICCV 2017, section 3.2. Two passes: one plain (for the CAM), one guided; both
    explain the same class (the first pass resolves ``target``). ``layer=None`` as in :func:`grad_cam`.
    """
    (shared,) = shared_passes(model, x, target, layers=[layer], guided=True, eval_mode=eval_mode,
                              forward_args=forward_args, forward_kwargs=forward_kwargs)
    return guided_grad_cam_from(shared)


register("grad_cam", grad_cam, needs=Need.LAYER_GRADIENT, from_pass=grad_cam_from, look=Look.HEAT_OVERLAY,
         title="Grad-CAM")
register("guided_grad_cam", guided_grad_cam, needs={Need.LAYER_GRADIENT, Need.GUIDED},
         from_pass=guided_grad_cam_from, look=Look.RGB, title="guided Grad-CAM")
