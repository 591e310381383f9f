"""Naive reference implementations of every attribution method, for tests only.

Written for obviousness, not speed: one example at a time, plain ``torch.autograd.grad``, deep copies
of the model instead of hooks wherever possible. Nothing here is imported from torchvis.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with every in-place activation made out-of-place, so that a layer's
    output keeps its values after the forward pass."""
    twin = copy.deepcopy(model).eval()
    for module in twin.modules():
        if getattr(module, "inplace", False):
            module.inplace = False  # type: ignore[assignment]
    return twin


def score(model: nn.Module, image: Tensor, target: int) -> Tensor:
    """The target logit of one image ``[C,H,W]``."""
    return model(image[None])[0, target]


def saliency(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """d logit[target] / d x, one example at a time. Returns the shape of ``x``."""
    model = plain_copy(model)
    grads = []
    for image, t in zip(x, target.tolist(), strict=True):
        leaf = image.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(score(model, leaf, t), leaf)
        grads.append(grad)
    return torch.stack(grads)


class GuidedReLUFunction(torch.autograd.Function):
    """max(x, 0) whose backward passes the gradient only where the input and the gradient are > 0."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.where(x > 0, x, torch.zeros_like(x))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        keep = (x > 0) & (grad > 0)
        return torch.where(keep, grad, torch.zeros_like(grad))


def guided_relu(x: Tensor) -> Tensor:
    out = GuidedReLUFunction.apply(x)
    assert isinstance(out, Tensor)
    return out


class GuidedReLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return guided_relu(x)


def guided_copy(model: nn.Module) -> nn.Module:
    """A deep copy (eval mode) with every ``nn.ReLU`` module replaced by :class:`GuidedReLU`."""
    twin = plain_copy(model)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, name, GuidedReLU())
    return twin


def guided_backprop(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Saliency of the guided copy of ``model`` (functional ReLUs must already be replaced)."""
    return saliency(guided_copy(model), x, target)


def layer_activation_and_grad(
    model: nn.Module, image: Tensor, target: int, layer: str
) -> tuple[Tensor, Tensor]:
    """One image's activation at ``layer`` ``[K,h,w]`` and the target logit's gradient there
    (``model`` must have no in-place activation: see :func:`plain_copy`)."""
    stored: list[Tensor] = []
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda mod, inp, out: stored.append(out))
    try:
        logit = score(model, image.detach().clone().requires_grad_(True), target)
    finally:
        handle.remove()
    assert len(stored) == 1, f"{layer} ran {len(stored)} times"
    (grad,) = torch.autograd.grad(logit, stored[0])
    return stored[0][0].detach(), grad[0]


def grad_cam(
    model: nn.Module, x: Tensor, target: Tensor, layer: str, *, relu: bool = True, upsample: bool = True
) -> Tensor:
    """Selvaraju et al. 2017, one example at a time. Returns ``[B,1,H,W]`` (``[B,1,h,w]``)."""
    model = plain_copy(model)
    maps = []
    for image, t in zip(x, target.tolist(), strict=True):
        act, grad = layer_activation_and_grad(model, image, t, layer)
        alpha = grad.mean(dim=(1, 2))
        heat = (alpha[:, None, None] * act).sum(dim=0)
        maps.append(heat.clamp_min(0) if relu else heat)
    out = torch.stack(maps)[:, None]
    if upsample:
        out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return out


def guided_grad_cam(model: nn.Module, x: Tensor, target: Tensor, layer: str) -> Tensor:
    """Guided backprop times the upsampled (rectified) Grad-CAM."""
    return guided_backprop(model, x, target) * grad_cam(model, x, target, layer)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Every multiple of ``stride`` whose previous window did not yet reach the far edge."""
    return [s for s in range(0, size, stride) if s == 0 or s - stride + window < size]


def occlusion(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    window: tuple[int, int],
    stride: tuple[int, int],
    baseline: float | Tensor = 0.0,
) -> Tensor:
    """Zeiler & Fergus 2014 by hand: one occluded image per window and example. Returns ``[B,1,H,W]``."""
    model = plain_copy(model)
    _, _, height, width = x.shape
    fill = torch.as_tensor(baseline, dtype=x.dtype).expand_as(x[0])
    out = torch.zeros(x.shape[0], 1, height, width, dtype=x.dtype)
    with torch.no_grad():
        for b, (image, t) in enumerate(zip(x, target.tolist(), strict=True)):
            clean = score(model, image, t)
            total = torch.zeros(height, width, dtype=x.dtype)
            count = torch.zeros(height, width, dtype=x.dtype)
            for i in window_starts(height, window[0], stride[0]):
                for j in window_starts(width, window[1], stride[1]):
                    rows, cols = slice(i, i + window[0]), slice(j, j + window[1])
                    occluded = image.clone()
                    occluded[:, rows, cols] = fill[:, rows, cols]
                    total[rows, cols] += clean - score(model, occluded, t)
                    count[rows, cols] += 1
            out[b, 0] = total / count
    return out


def gradient_x_input(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Shrikumar et al. 2016: the input times its gradient."""
    return x * saliency(model, x, target)


def layer_cam_family(
    model: nn.Module, x: Tensor, target: Tensor, layer: str, variant: str, *, relu: bool = True,
    upsample: bool = True,
) -> Tensor:
    """Grad-CAM++, XGrad-CAM, LayerCAM or HiResCAM written from the papers' formulas, one example, one
    channel and one position at a time. Returns ``[B,1,H,W]`` (``[B,1,h,w]``)."""
    model = plain_copy(model)
    maps = []
    for image, t in zip(x, target.tolist(), strict=True):
        act, grad = layer_activation_and_grad(model, image, t, layer)
        channels, height, width = act.shape
        heat = torch.zeros(height, width, dtype=act.dtype)
        for k in range(channels):
            a, g = act[k], grad[k]
            if variant == "grad_cam_pp":  # Chattopadhyay et al. 2018, Eq. 19
                total, w = float(a.sum()), 0.0
                for i in range(height):
                    for j in range(width):
                        gij = float(g[i, j])
                        denominator = 2 * gij**2 + total * gij**3
                        alpha = gij**2 / denominator if denominator != 0 else 0.0
                        w += alpha * max(gij, 0.0)
                heat += w * a
            elif variant == "xgrad_cam":  # Fu et al. 2020
                total, w = float(a.sum()), 0.0
                if total != 0:
                    w = sum(
                        float(a[i, j]) / total * float(g[i, j]) for i in range(height) for j in range(width)
                    )
                heat += w * a
            elif variant == "layer_cam":  # Jiang et al. 2021
                heat += torch.where(g > 0, g, torch.zeros_like(g)) * a
            elif variant == "hires_cam":  # Draelos & Carin 2020
                heat += g * a
            else:
                raise AssertionError(variant)
        maps.append(heat.clamp_min(0) if relu else heat)
    out = torch.stack(maps)[:, None]
    if upsample:
        out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return out


def layer_activation(model: nn.Module, image: Tensor, layer: str) -> Tensor:
    """One image's activation at ``layer`` ``[K,h,w]``, without gradients."""
    stored: list[Tensor] = []
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda mod, inp, out: stored.append(out.detach().clone()))
    try:
        with torch.no_grad():
            model(image[None])
    finally:
        handle.remove()
    return stored[0][0]


def score_cam(model: nn.Module, x: Tensor, target: Tensor, layer: str) -> Tensor:
    """Wang et al. 2020 as in the authors' code: one masked forward per example and channel, the mask
    the upsampled channel min-max normalised; a channel constant at the layer is skipped. ``[B,1,H,W]``."""
    model = plain_copy(model)
    size = x.shape[-2:]
    maps = []
    for image, t in zip(x, target.tolist(), strict=True):
        act = layer_activation(model, image, layer)
        heat = torch.zeros(1, 1, *size, dtype=x.dtype)
        for k in range(act.shape[0]):
            if act[k].max() == act[k].min():
                continue
            up = F.interpolate(act[k][None, None], size=size, mode="bilinear", align_corners=False)
            mask = (up - up.min()) / (up.max() - up.min())
            with torch.no_grad():
                probability = torch.softmax(model(image[None] * mask), dim=1)[0, t]
            heat += probability * up
        maps.append(heat.clamp_min(0)[0])
    return torch.stack(maps)


def smoothgrad_samples(
    method: Any, model: nn.Module, x: Tensor, target: Tensor, *, samples: int, noise: float, seed: int,
    **options: Any,
) -> Tensor:
    """``method`` on each noisy copy, one copy and one example at a time: ``[samples, B, ...]``. Sample
    ``s``'s noise is the ``s``-th ``torch.randn(x.shape)`` of a CPU generator seeded with ``seed``,
    scaled per example by ``noise * (max - min)``."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(samples):
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        maps = []
        for b in range(x.shape[0]):
            sigma = noise * (x[b].max() - x[b].min())
            maps.append(method(model, (x[b] + sigma * eps[b])[None], target[b : b + 1], **options)[0])
        out.append(torch.stack(maps))
    return torch.stack(out)
