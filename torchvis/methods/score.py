"""Score-CAM (Wang et al., CVPR-W 2020): channel weights from the class scores of the input masked
by each channel, forward passes only."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchvis.core import hooks, layouts
from torchvis.core.forward import Target, checked_logits, guarded
from torchvis.core.hooks import LayerAddress
from torchvis.core.passes import activation_pass
from torchvis.methods.cam import check_feature_map, default_reshape, interpolation, upsample_to
from torchvis.methods.perturbation import default_batch_size
from torchvis.methods.spec import Look, Need, register


def channel_masks(activation: Tensor, size: tuple[int, ...]) -> Tensor:
    """Channels ``[N,*spatial]`` upsampled (bilinearly for ``[N,h,w]``; linearly, trilinearly for other
    ranks) to ``size`` and min-max normalised to [0, 1] each: ``[N,1,*size]`` (a channel whose
    upsampled map is constant gives 0)."""
    mode = interpolation(True, len(size)) or "bilinear"
    up = F.interpolate(activation[:, None], size=size, mode=mode, align_corners=False)
    dims = tuple(range(2, up.dim()))
    low, high = up.amin(dim=dims, keepdim=True), up.amax(dim=dims, keepdim=True)
    span = high - low
    return torch.where(span > 0, (up - low) / torch.where(span > 0, span, 1), 0)


def channel_scores(
    model: nn.Module, x: Tensor, activation: Tensor, target: Tensor, *, batch_size: int, eval_mode: bool
) -> Tensor:
    """``s[b,k]``: the softmax probability of ``target[b]`` for ``x[b]`` masked by channel ``k``
    (:func:`channel_masks`); 0 for a channel constant at the layer, whose mask carries no location.
    ``[B,K]``. The ``K*B`` masked inputs (constant channels skipped) go through the model in batches
    of ``batch_size``, under ``torch.inference_mode``; the only host sync is finding the live channels."""
    spatial = tuple(range(2, activation.dim()))
    live = (activation.amax(dim=spatial) > activation.amin(dim=spatial)).nonzero()  # [N, 2]: (b, k)
    scores = torch.zeros(activation.shape[:2], dtype=activation.dtype, device=activation.device)
    with guarded(model, x, eval_mode=eval_mode, grad=False), torch.inference_mode():
        for lo in range(0, live.shape[0], batch_size):
            b, k = live[lo : lo + batch_size].unbind(dim=1)
            masked = x[b] * channel_masks(activation[b, k], x.shape[2:])
            probabilities = checked_logits(model(masked), masked.shape[0]).softmax(dim=1)
            scores[b, k] = probabilities.gather(1, target[b, None])[:, 0].to(scores.dtype)
    return scores.clone()  # an ordinary tensor again, outside inference mode


def score_cam(
    model: nn.Module,
    x: Tensor,
    target: Target = None,
    *,
    layer: LayerAddress | None = None,
    batch_size: int | None = None,
    reshape: layouts.Reshape = None,
    layer_input: bool = False,
    eval_mode: bool = True,
) -> Tensor:
    """Score-CAM at ``layer``. Returns ``[B,1,*x.shape[2:]]``.

    Wang, Wang, Du, Yang, Zhang, Ding, Mardziel & Hu, "Score-CAM: Score-Weighted Visual Explanations
    for Convolutional Neural Networks", CVPR-W 2020, as the authors' code computes it: ``H_k`` is
    channel ``k`` of the layer's activation ``A`` upsampled bilinearly to the input and min-max
    normalised; ``s_k`` the softmax probability of the target class for ``x * H_k``; the map
    ``ReLU(sum_k s_k Up(A_k))``. A channel constant at the layer is skipped (``s_k = 0``); the authors
    test the upsampled map, whose values a non-zero constant can miss by rounding. Forward passes
    only, ``K*B`` masked inputs in batches of at most ``batch_size`` (default as
    :func:`torchvis.methods.perturbation.default_batch_size`), no host sync per channel.

    Peers differ: pytorch-grad-cam (1.5) upsamples with ``align_corners=True``, weighs channels by the
    softmax *over channels* of the raw target logits, and reads each score with ``.item()``; torchcam
    (0.5) normalises the channels before upsampling, and takes the softmax over channels of the logit
    minus the clean input's logit. ``layer=None``, ``reshape``, ``layer_input`` as in
    :func:`torchvis.grad_cam`.
    """
    bad_size = isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    if batch_size is not None and bad_size:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
    probe = activation_pass(model, x, target, layer=layer, eval_mode=eval_mode, layer_input=layer_input)
    model = hooks.unwrap(model)  # the masked passes too run the module the probe hooked
    if batch_size is None:
        batch_size = default_batch_size(x)
    spatial = tuple(x.shape[2:])
    reading = default_reshape(model, layer, reshape)
    activation = layouts.to_feature_map(probe.activation, reading, spatial, probe.layer)
    check_feature_map(activation, "Score-CAM", probe.layer, x)
    scores = channel_scores(model, x, activation, probe.target, batch_size=batch_size, eval_mode=eval_mode)
    if torch.isnan(scores).any():
        raise ValueError("the model output contains NaN for a masked input; Score-CAM cannot weigh channels")
    heat = (scores.reshape(*scores.shape, *[1] * len(spatial)) * activation).sum(dim=1, keepdim=True)
    # Bilinear upsampling is linear: the sum of the upsampled channels is the upsampled sum.
    cam = upsample_to(heat, x).clamp_min(0).to(x.dtype)
    empty = (scores == 0).all(dim=1)
    if empty.any():
        warnings.warn(
            f"Score-CAM: every channel of layer {probe.layer!r} is constant (or scores 0) for example(s) "
            f"{empty.nonzero()[:, 0].tolist()}; their maps are 0",
            stacklevel=2,
        )
    return cam


# Forward passes of changed inputs only, like occlusion: it also runs under torch.inference_mode().
register("score_cam", score_cam, needs=Need.PERTURBATION, look=Look.HEAT_OVERLAY, title="Score-CAM")
