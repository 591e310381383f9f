"""Score-CAM (Wang et al., CVPR-W 2020): channel weights from the class scores of the input masked
by each channel, forward passes only."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from torchvis.core import hooks, layouts
from torchvis.core.caller import warn_user
from torchvis.core.forward import guarded
from torchvis.core.hooks import LayerAddress
from torchvis.core.inputs import InputLike, Inputs, Model, as_inputs, check_module
from torchvis.core.passes import activation_pass
from torchvis.core.targets import Resolved, Target, score_of, take_target
from torchvis.methods.cam import check_feature_map, default_reshape, interpolation, upsample_to
from torchvis.methods.perturbation import batch_size_for
from torchvis.methods.spec import Look, Need, register


def channel_masks(activation: Tensor, size: tuple[int, ...]) -> Tensor:
    """Channels ``[N,*spatial]`` upsampled (bilinearly for ``[N,h,w]``; linearly, trilinearly for other
    ranks) to ``size`` and min-max normalised to [0, 1] each: ``[N,1,*size]`` (a channel whose
    upsampled map is constant gives 0)."""
    mode = interpolation(True, len(size))
    assert mode is not None  # True always names a mode
    up = F.interpolate(activation[:, None], size=size, mode=mode, align_corners=False)
    dims = tuple(range(2, up.dim()))
    low, high = up.amin(dim=dims, keepdim=True), up.amax(dim=dims, keepdim=True)
    span = high - low
    return torch.where(span > 0, (up - low) / torch.where(span > 0, span, 1), 0)


def channel_scores(
    model: Model, inputs: Inputs, activation: Tensor, target: Resolved, *, batch_size: int, eval_mode: bool
) -> Tensor:
    """``s[b,k]``: the score of ``target[b]`` (:func:`masked_score`) for example ``b`` with its first
    input masked by channel ``k`` (:func:`channel_masks`), its other inputs and per-example extra
    arguments as they are; 0 for a channel constant at the layer, whose mask carries no location.
    ``[B,K]``. The ``K*B`` masked inputs (constant channels skipped) go through the model in batches
    of ``batch_size``, under ``torch.inference_mode``; the only host sync is finding the live channels."""
    x = inputs.first
    spatial = tuple(range(2, activation.dim()))
    live = (activation.amax(dim=spatial) > activation.amin(dim=spatial)).nonzero()  # [N, 2]: (b, k)
    scores = torch.zeros(activation.shape[:2], dtype=activation.dtype, device=activation.device)
    with guarded(model, x, eval_mode=eval_mode, grad=False), torch.inference_mode():
        for lo in range(0, live.shape[0], batch_size):
            b, k = live[lo : lo + batch_size].unbind(dim=1)
            masked = x[b] * channel_masks(activation[b, k], x.shape[2:])
            output = inputs.call(model, [masked, *(t[b] for t in inputs.tensors[1:])], rows=b)
            scores[b, k] = masked_score(output, take_target(target, b), masked.shape[0]).to(scores.dtype)
    return scores.clone()  # an ordinary tensor again, outside inference mode


def masked_score(output: Any, target: Resolved, batch: int) -> Tensor:
    """Score-CAM's score of each row: the softmax probability of the target class for a classifier
    ``[B, classes]``; the explained score itself (:func:`~torchvis.core.targets.score_of`) for a
    callable target, an index into a larger output or one score per example."""
    if isinstance(target, Tensor) and target.dim() == 1:
        if not (isinstance(output, Tensor) and output.dim() == 2 and output.shape[0] == batch):
            return score_of(output, target, batch)  # raises, saying what the output should be
        return output.softmax(dim=1).gather(1, target[:, None])[:, 0]
    return score_of(output, target, batch)


def score_cam(
    model: Model,
    x: InputLike,
    target: Target = None,
    *,
    layer: LayerAddress | None = None,
    batch_size: int | None = None,
    reshape: layouts.Reshape = None,
    layer_input: bool = False,
    eval_mode: bool = True,
    forward_args: Any = None,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> Tensor:
    """Score-CAM at ``layer``. Returns ``[B,1,*x.shape[2:]]``, drawn over the first input when ``x`` is a
    tuple.

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

    Inputs: with a tuple ``x`` the masks apply to the first input (upsampled to its size), the other
    inputs are passed as they are; ``forward_args``/``forward_kwargs`` go to the model, their
    per-example tensors taken for each masked row (:mod:`torchvis.core.inputs`). With a callable
    ``target``, an index into a larger output, or a model returning one score per example, ``s_k`` is
    that score itself rather than a softmax probability (:func:`masked_score`).
    """
    inputs = as_inputs(x, forward_args, forward_kwargs)
    x = inputs.first
    # The masked passes too run the module the probe hooks.
    module = hooks.unwrap(check_module(model, "Score-CAM"))
    batch_size = batch_size_for(inputs, batch_size)
    reading = default_reshape(module, layer, reshape)  # a bad reshape refused before the probe pass
    probe = activation_pass(model, inputs, target, layer=layer, eval_mode=eval_mode, layer_input=layer_input)
    model = module
    spatial = tuple(x.shape[2:])
    activation = layouts.to_feature_map(probe.activation, reading, spatial, probe.layer)
    check_feature_map(activation, "Score-CAM", probe.layer, x)
    scores = channel_scores(model, inputs, activation, probe.target, batch_size=batch_size,
                            eval_mode=eval_mode)
    if torch.isnan(scores).any():
        raise ValueError("the model output contains NaN for a masked input; Score-CAM cannot weigh channels")
    heat = (scores.reshape(*scores.shape, *[1] * len(spatial)) * activation).sum(dim=1, keepdim=True)
    # Bilinear upsampling is linear: the sum of the upsampled channels is the upsampled sum.
    cam = upsample_to(heat, x).clamp_min(0).to(x.dtype)
    empty = (scores == 0).all(dim=1)
    if empty.any():
        warn_user(
            f"Score-CAM: every channel of layer {probe.layer!r} is constant (or scores 0) for example(s) "
            f"{empty.nonzero()[:, 0].tolist()}; their maps are 0"
        )
    return cam


# Forward passes of changed inputs only, like occlusion: it also runs under torch.inference_mode().
register("score_cam", score_cam, needs=Need.PERTURBATION, look=Look.HEAT_OVERLAY, title="Score-CAM")
