"""Grad-CAM and guided Grad-CAM (Selvaraju et al., ICCV 2017).

A CAM variant is a function of the layer's activation ``A`` and the target logit's gradient ``g``
there (both ``[B,K,*spatial]``: ``[B,K,h,w]`` for a Conv2d layer, ``[B,K,L]`` for Conv1d,
``[B,K,d,h,w]`` for Conv3d) returning the unrectified heat ``[B,1,*spatial]``; :func:`cam_from`
rectifies and upsamples it. Every variant at every layer reads the one shared forward+backward.

The layer options every CAM takes: ``layer`` a dotted name or module, or one element of a tuple
output as ``("encoder.lstm", 0)`` or ``"encoder.lstm[0]"``; ``layer_input=True`` takes the layer's
(first, or ``index``-th) input instead of its output; ``reshape`` reads a layer that is not
``[B,K,*spatial]`` (ViT tokens, channels-last maps; see :mod:`torchvis.core.layouts`); ``upsample``
``True`` or ``"bilinear"`` (the natural interpolation for the rank: linear, bilinear, trilinear —
``"bilinear"`` is accepted for every rank), ``"nearest"``, or ``None``/``False`` (the layer's size).
Heat is computed from float32 copies of ``A`` and ``g`` when they are bf16/fp16 (mixed precision).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchvis.core import layouts
from torchvis.core.caller import warn_user
from torchvis.core.hooks import LayerAddress
from torchvis.core.inputs import InputLike, Model, as_inputs
from torchvis.core.passes import Shared, shared_passes
from torchvis.core.reads import on_host, one_host_read
from torchvis.core.targets import Target
from torchvis.methods.spec import Look, MethodSpec, Need, register

Upsample = bool | str | None


def grad_cam_heat(activation: Tensor, grad: Tensor) -> Tensor:
    """Grad-CAM's heat before the ReLU: channel weights = the spatial mean of the gradient, map = the
    weighted channel sum. ``[B,K,*spatial]`` x2 -> ``[B,1,*spatial]``."""
    weights = grad.mean(dim=tuple(range(2, grad.dim())), keepdim=True)
    return (weights * activation).sum(dim=1, keepdim=True)


def cam(activation: Tensor, grad: Tensor, *, relu: bool = True) -> Tensor:
    """Grad-CAM from a layer's activation and the score's gradient there, both ``[B,K,*spatial]``.

    Returns ``[B,1,*spatial]``, rectified unless ``relu=False``; float32 at least (see
    :func:`accumulate`).
    """
    check_feature_map(activation)
    heat = grad_cam_heat(accumulate(activation), accumulate(grad))
    return heat.clamp_min(0) if relu else heat


_WIDE = (torch.float32, torch.float64)


def accumulate(t: Tensor) -> Tensor:
    """``t`` in float32 if it is in a narrower floating type (bf16, fp16); ``t`` itself otherwise."""
    return t if t.dtype in _WIDE else t.to(torch.promote_types(t.dtype, torch.float32))


def check_feature_map(
    activation: Tensor, method: str = "Grad-CAM", layer: str | None = None, x: Tensor | None = None
) -> None:
    """``activation`` must be a feature map ``[B,K,*spatial]`` with at least one spatial dimension — as
    many as the input ``x`` has, when given: a CAM of ``method`` needs a spatial layer."""
    at = f" from layer {layer!r}" if layer else ""
    if activation.dim() < 3:
        raise ValueError(
            f"{method} needs a layer whose output is a feature map [B,K,h,w]; got shape "
            f"{list(activation.shape)}{at}, without spatial dimensions (any [B,K,*spatial] will do: "
            "[B,K,L] from a Conv1d, [B,K,d,h,w] from a Conv3d)"
        )
    if x is not None and activation.dim() != x.dim():
        raise ValueError(
            f"{method} needs a layer whose output is a feature map with the input's {x.dim() - 2} spatial "
            f"dimension(s), [B,K,*spatial]; got shape {list(activation.shape)}{at} for an input of shape "
            f"{list(x.shape)}. Tokens [B,N,D] or a channels-last map? pass reshape='auto' or a callable"
        )


def layer_maps(shared: Shared, reshape: layouts.Reshape) -> tuple[Tensor, Tensor]:
    """The shared pass's activation and gradient at its layer, read as ``[B,K,*spatial]`` through
    ``reshape`` (see :mod:`torchvis.core.layouts`)."""
    assert shared.activation is not None and shared.grad is not None
    layer = shared.layer or "the layer"
    spatial = tuple(shared.x.shape[2:])
    return (layouts.to_feature_map(shared.activation, reshape, spatial, layer),
            layouts.to_feature_map(shared.grad, reshape, spatial, layer))


class EmptyMapWarning(UserWarning):
    """A map that is exactly zero (or constant) for some examples: it shows nothing, and ranks pixels by
    index in a deletion or insertion test."""


def warn_if_empty(heat: Tensor, activation: Tensor, layer_name: str) -> None:
    """Warn when the CAM ``heat`` ``[B,1,h,w]`` is exactly zero for some examples, saying for how many;
    when the layer's ``activation`` has negative values, suggest the activation after the layer. The
    peaks are read with the call's other checks (:func:`torchvis.core.reads.on_host`)."""

    def check(peaks: list[float]) -> None:
        empty = peaks.count(0)
        if not empty:
            return
        hint = (
            f"{layer_name!r} outputs negative values (a convolution before its activation?): the map at "
            "the activation after it (its ReLU, or a pooling layer) is usually informative"
            if bool((activation < 0).any())
            else "the target's gradient at the layer weighs every location's channels to zero or less"
        )
        warn_user(
            f"the CAM at {layer_name!r} is exactly zero for {empty} of {heat.shape[0]} examples, so it "
            f"shows nothing for them; {hint}",
            EmptyMapWarning,
        )

    on_host(heat.flatten(1).abs().amax(dim=1), check)


def interpolation(upsample: Upsample, rank: int) -> str | None:
    """The ``F.interpolate`` mode for ``upsample`` (see the module doc) on ``rank`` spatial
    dimensions; ``None`` for no upsampling."""
    if upsample is None or upsample is False:
        return None
    if upsample is True or upsample == "bilinear":
        if not 1 <= rank <= 3:
            raise ValueError(f"no linear interpolation for {rank} spatial dimensions; use upsample='nearest'")
        return ("linear", "bilinear", "trilinear")[rank - 1]
    if upsample == "nearest":
        return "nearest"
    raise ValueError(f"upsample must be True, 'bilinear', 'nearest', None or False; got {upsample!r}")


def check_upsample(upsample: Upsample, x: Tensor, *, guided: bool = False) -> None:
    """Refuse, before any pass runs, an ``upsample`` that :func:`upsample_to` would refuse for ``x``
    (the first input ``[B,C,*spatial]``); with ``guided`` also ``None``, since guided Grad-CAM
    multiplies by the CAM at ``x``'s size. Only the value is judged here: an input without spatial
    dimensions is refused by the layer's own check, with a message about the layer."""
    if interpolation(upsample, max(x.dim() - 2, 1)) is None and guided:
        raise ValueError("guided Grad-CAM multiplies by the CAM at the input's size; upsample cannot be None")


def check_cam_options(specs: Iterable[MethodSpec], options: Mapping[str, Any], x: Tensor) -> None:
    """Refuse, before any pass runs, the layer methods' options in ``options`` that would be refused
    after it: an ``upsample`` that a CAM among ``specs`` (or wrapped by one, as SmoothGrad of
    Grad-CAM) would refuse for ``x`` (:func:`check_upsample`), and a ``reshape`` that is none
    (:func:`torchvis.core.layouts.check_reshape`)."""
    if "reshape" in options:
        layouts.check_reshape(options["reshape"])
    if "upsample" not in options:
        return
    cams = [s for spec in specs for s in (spec, spec.wrapped(options))
            if s is not None and Need.LAYER_GRADIENT in s.needs]
    if cams:
        check_upsample(options["upsample"], x, guided=any(Need.GUIDED in s.needs for s in cams))


def upsample_to(heat: Tensor, x: Tensor, upsample: Upsample = True) -> Tensor:
    """Resize ``[B,1,*spatial]`` to ``x``'s spatial shape ``x.shape[2:]`` (see :func:`interpolation`;
    linear modes with ``align_corners=False``)."""
    size = tuple(x.shape[2:])
    if heat.dim() != x.dim():
        raise ValueError(
            f"a map of shape {list(heat.shape)} cannot be upsampled to an input of shape {list(x.shape)} "
            "(different numbers of spatial dimensions); pass upsample=None or a reshape"
        )
    mode = interpolation(upsample, len(size))
    if tuple(heat.shape[2:]) == size or mode is None:
        return heat
    if mode == "nearest":
        return F.interpolate(heat, size=size, mode=mode)
    return F.interpolate(heat, size=size, mode=mode, align_corners=False)


Heat = Callable[[Tensor, Tensor], Tensor]


def cam_from(
    shared: Shared, heat: Heat, method: str, *, relu: bool, upsample: Upsample, reshape: layouts.Reshape
) -> Tensor:
    """The CAM of ``heat`` (a function of the layer's ``A`` and ``g``, ``[B,1,*spatial]`` before the
    ReLU) from the shared pass at one layer, in ``x``'s dtype, at ``x``'s size unless not ``upsample``.
    Every CAM variant is this with its own ``heat``. Warns (:class:`EmptyMapWarning`) when the map is
    exactly zero for some examples."""
    activation, grad = layer_maps(shared, reshape)
    layer = shared.layer or "the layer"
    check_feature_map(activation, method, layer, shared.x)
    value = heat(accumulate(activation), accumulate(grad))
    if relu:
        value = value.clamp_min(0)
    warn_if_empty(value, activation, layer)
    return upsample_to(value.to(shared.x.dtype), shared.x, upsample)


def grad_cam_from(
    shared: Shared, *, relu: bool = True, upsample: Upsample = True, reshape: layouts.Reshape = None,
    layer_input: bool = False,
) -> Tensor:
    """:func:`grad_cam` from the shared plain pass at one layer (``layer_input`` was the pass's)."""
    return cam_from(shared, grad_cam_heat, "Grad-CAM", relu=relu, upsample=upsample, reshape=reshape)


def guided_cam(
    guided_grad: Tensor, activation: Tensor, grad: Tensor, x: Tensor, upsample: Upsample = True
) -> Tensor:
    """Guided Grad-CAM: the guided-backprop gradient (shape of ``x``) times the CAM upsampled to ``x``
    (``upsample`` checked by the caller, :func:`check_upsample` with ``guided``)."""
    return (guided_grad * upsample_to(cam(activation, grad), x, upsample)).to(x.dtype)


def guided_grad_cam_from(
    shared: Shared, *, upsample: Upsample = True, reshape: layouts.Reshape = None, layer_input: bool = False
) -> Tensor:
    """:func:`guided_grad_cam` from the shared plain pass (at one layer) and guided pass."""
    assert shared.guided_grad is not None
    check_upsample(upsample, shared.x, guided=True)  # for a caller that did not check before the passes
    activation, grad = layer_maps(shared, reshape)
    check_feature_map(activation, "guided Grad-CAM", shared.layer, shared.x)
    return guided_cam(shared.guided_grad, activation, grad, shared.x, upsample)


def default_reshape(
    model: Model, layer: LayerAddress | None, reshape: layouts.Reshape
) -> layouts.Reshape:
    """``reshape`` for a method on ``model``: ``"auto"`` bound to the model's patch size, and
    ``"auto"`` where ``layer=None`` picks a ViT block (tokens are no ``[B,K,L]`` map)."""
    if not isinstance(model, nn.Module):  # refused by the pass: a layer method needs a module
        return reshape
    if reshape is None and layer is None and layouts.vit_layer(model) is not None:
        reshape = "auto"
    return layouts.bind(reshape, model)


def grad_cam(
    model: Model,
    x: InputLike,
    target: Target = None,
    *,
    layer: LayerAddress | None = None,
    relu: bool = True,
    upsample: Upsample = True,
    reshape: layouts.Reshape = None,
    layer_input: bool = False,
    eval_mode: bool = True,
    forward_args: Any = None,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> Tensor:
    """Grad-CAM at ``layer``. Returns ``[B,1,*x.shape[2:]]`` (the layer's size if ``upsample=None``).

    Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", ICCV 2017. ``layer=None`` takes the last module whose output is still a spatial
    feature map (``layer4`` for torchvision's ResNet; a ViT's last block's ``ln_1``, read with
    ``reshape="auto"``) and warns which. Grad-CAM wants a rectified map: the output of a ReLU (or a
    pooling after it), not the convolution before it. The backward pass stops at the layer.
    ``layer``, ``layer_input``, ``reshape`` and ``upsample`` as in :mod:`torchvis.methods.cam`. ``x``
    may be a tuple of inputs: the map is drawn over the first (upsampled to its size);
    ``forward_args``/``forward_kwargs`` go to the model (see :mod:`torchvis.core.inputs`). Needs an
    ``nn.Module`` (it reads the layer through hooks).
    """
    return cam_of(grad_cam_heat, "Grad-CAM", model, x, target, layer=layer, relu=relu, upsample=upsample,
                  reshape=reshape, layer_input=layer_input, eval_mode=eval_mode, forward_args=forward_args,
                  forward_kwargs=forward_kwargs)


def cam_of(
    heat: Heat, method: str, model: Model, x: InputLike, target: Target, *, layer: LayerAddress | None,
    relu: bool, upsample: Upsample, reshape: layouts.Reshape, layer_input: bool, eval_mode: bool,
    forward_args: Any, forward_kwargs: Mapping[str, Any] | None,
) -> Tensor:
    """A CAM method (``heat``, named ``method`` in messages) called on its own, as :func:`grad_cam` and its
    variants are: the options refused before the pass, one plain pass at ``layer``, :func:`cam_from`,
    and the pass's and the map's checks read once (:mod:`torchvis.core.reads`)."""
    inputs = as_inputs(x, forward_args, forward_kwargs)
    check_upsample(upsample, inputs.first)
    reshape = default_reshape(model, layer, reshape)
    with one_host_read():
        (shared,) = shared_passes(model, inputs, target, layers=[layer], eval_mode=eval_mode,
                                  layer_input=layer_input)
        return cam_from(shared, heat, method, relu=relu, upsample=upsample, reshape=reshape)


def guided_grad_cam(
    model: Model,
    x: InputLike,
    target: Target = None,
    *,
    layer: LayerAddress | None = None,
    upsample: Upsample = True,
    reshape: layouts.Reshape = None,
    layer_input: bool = False,
    eval_mode: bool = True,
    forward_args: Any = None,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> Tensor:
    """Guided backprop times the upsampled Grad-CAM at ``layer``. Returns the shape of ``x`` (of its
    first input when ``x`` is a tuple: the CAM is drawn over it).

    Selvaraju et al., ICCV 2017, section 3.2. Two passes: one plain (for the CAM), one guided; both
    explain the same class (the first pass resolves ``target``). ``layer=None`` as in :func:`grad_cam`;
    ``upsample`` ``True``/``"bilinear"`` or ``"nearest"`` (Captum's default for ``GuidedGradCam``).
    """
    inputs = as_inputs(x, forward_args, forward_kwargs)
    check_upsample(upsample, inputs.first, guided=True)  # the options refused before the passes
    reshape = default_reshape(model, layer, reshape)
    with one_host_read():  # both passes' checks: one host read
        (shared,) = shared_passes(model, inputs, target, layers=[layer], guided=True, eval_mode=eval_mode,
                                  layer_input=layer_input)
        return guided_grad_cam_from(shared, upsample=upsample, reshape=reshape)


register("grad_cam", grad_cam, needs=Need.LAYER_GRADIENT, from_pass=grad_cam_from, look=Look.HEAT_OVERLAY,
         title="Grad-CAM")
register("guided_grad_cam", guided_grad_cam, needs={Need.LAYER_GRADIENT, Need.GUIDED},
         from_pass=guided_grad_cam_from, look=Look.RGB, title="guided Grad-CAM")
