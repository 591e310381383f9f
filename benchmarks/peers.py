"""Other libraries computing the same maps, timed beside torchvis when they are installed.

Captum (``Saliency``, ``GuidedBackprop``, ``LayerGradCam`` + ``interpolate``, ``GuidedGradCam``,
``Occlusion`` at several ``perturbations_per_eval``), pytorch-grad-cam ``GradCAM`` and torchcam
``GradCAM``. Each is imported only when its row is built, and each runs on its own deep copy of the
model: pytorch-grad-cam calls ``model.eval()`` and ``backward()``, torchcam leaves hooks behind, and
none of that may reach the model that torchvis and the floors run on.

Every peer also yields our map converted to its conventions (pytorch-grad-cam and torchcam min-max
normalise each map; pytorch-grad-cam resizes between two normalisations), so the harness can print the
largest difference between the two.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from torchvis.core.hooks import resolve_layer
from torchvis.methods.cam import grad_cam, guided_grad_cam, upsample_to
from torchvis.methods.gradient import guided_backprop, saliency
from torchvis.methods.perturbation import occlusion


class Skip(Exception):
    """A peer row that is left out on purpose (the reason is printed instead of a time)."""


@dataclass(frozen=True)
class PeerCase:
    """The inputs of one benchmark row: ``x`` ``[B,C,H,W]``, ``target`` ``[B]`` (the classes
    explained), the Grad-CAM ``layer`` (dotted name), the occlusion windows, and the cap on images
    per forward pass that Captum's batched occlusion may use."""

    model: nn.Module
    x: Tensor
    target: Tensor
    layer: str
    window: tuple[int, int]
    stride: tuple[int, int]
    max_images: int


@dataclass(frozen=True)
class PeerRun:
    """``run`` is timed; ``output(run())`` is compared with ``reference``, our map in the peer's
    conventions."""

    run: Callable[[], Any]
    output: Callable[[Any], Tensor]
    reference: Tensor


@dataclass(frozen=True)
class Peer:
    """A peer row: its label, the torchvis method it computes, the floor it is measured against
    (``"input"``, ``"layer"``, ``"both"`` or ``"occlusion"``) and how to build it."""

    name: str
    method: str
    floor: str
    build: Callable[[PeerCase], PeerRun]


def _own(case: PeerCase) -> nn.Module:
    return copy.deepcopy(case.model).eval()


def _same(result: Any) -> Tensor:
    return torch.as_tensor(result)


def captum_saliency(case: PeerCase) -> PeerRun:
    from captum.attr import Saliency

    explainer = Saliency(_own(case))
    return PeerRun(
        lambda: explainer.attribute(case.x, target=case.target, abs=False),
        _same,
        saliency(case.model, case.x, case.target),
    )


def captum_guided_backprop(case: PeerCase) -> PeerRun:
    from captum.attr import GuidedBackprop

    explainer = GuidedBackprop(_own(case))
    return PeerRun(
        lambda: explainer.attribute(case.x, target=case.target),
        _same,
        guided_backprop(case.model, case.x, case.target),
    )


def captum_layer_grad_cam(case: PeerCase) -> PeerRun:
    from captum.attr import LayerAttribution, LayerGradCam

    model = _own(case)
    explainer = LayerGradCam(model, resolve_layer(model, case.layer)[1])
    size = case.x.shape[-2:]

    def run() -> Tensor:
        heat = explainer.attribute(case.x, target=case.target, relu_attributions=True)
        return LayerAttribution.interpolate(heat, size, interpolate_mode="bilinear")

    return PeerRun(run, _same, grad_cam(case.model, case.x, case.target, layer=case.layer))


def captum_guided_grad_cam(case: PeerCase) -> PeerRun:
    from captum.attr import GuidedGradCam

    model = _own(case)
    explainer = GuidedGradCam(model, resolve_layer(model, case.layer)[1])
    return PeerRun(
        lambda: explainer.attribute(case.x, target=case.target, interpolate_mode="bilinear"),
        _same,
        guided_grad_cam(case.model, case.x, case.target, layer=case.layer),
    )


def captum_occlusion(per_eval: int) -> Callable[[PeerCase], PeerRun]:
    """Captum ``Occlusion`` pushing ``per_eval`` occluded copies of the batch per forward pass."""

    def build(case: PeerCase) -> PeerRun:
        images = per_eval * case.x.shape[0]
        if images > case.max_images:
            raise Skip(f"{images} images per forward > --max-images {case.max_images}")
        from captum.attr import Occlusion

        explainer = Occlusion(_own(case))
        channels = case.x.shape[1]
        ours = occlusion(case.model, case.x, case.target, window=case.window, stride=case.stride)
        return PeerRun(
            lambda: explainer.attribute(
                case.x,
                sliding_window_shapes=(channels, *case.window),
                strides=(channels, *case.stride),
                baselines=0.0,
                target=case.target,
                perturbations_per_eval=per_eval,
            ),
            lambda result: result[:, :1],  # Captum repeats the map over the channels
            ours,
        )

    return build


def _min_max(heat: Tensor, eps: float) -> Tensor:
    """Per-example min-max normalisation of ``[B,1,h,w]``, as both CAM libraries do."""
    flat = heat.flatten(1)
    shifted = heat - flat.min(dim=1).values.view(-1, 1, 1, 1)
    return shifted / (shifted.flatten(1).max(dim=1).values.view(-1, 1, 1, 1) + eps)


def pytorch_grad_cam(case: PeerCase) -> PeerRun:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = _own(case)
    explainer = GradCAM(model=model, target_layers=[resolve_layer(model, case.layer)[1]])
    targets = [ClassifierOutputTarget(int(c)) for c in case.target]
    raw = grad_cam(case.model, case.x, case.target, layer=case.layer, upsample=False)
    # pytorch-grad-cam normalises at the layer's resolution, resizes (cv2, bilinear), normalises again.
    reference = _min_max(upsample_to(_min_max(raw, 1e-7), case.x), 1e-7)[:, 0]
    return PeerRun(
        lambda: explainer(input_tensor=case.x, targets=targets),
        lambda result: torch.from_numpy(result).to(case.x.device),
        reference,
    )


def torchcam_grad_cam(case: PeerCase) -> PeerRun:
    from torchcam.methods import GradCAM

    model = _own(case)
    extractor = GradCAM(model, target_layer=case.layer)
    classes = [int(c) for c in case.target]

    def run() -> Tensor:
        scores = model(case.x)
        return extractor(class_idx=classes, scores=scores)[0]

    raw = grad_cam(case.model, case.x, case.target, layer=case.layer, upsample=False)
    return PeerRun(run, _same, _min_max(raw, 1e-8)[:, 0])


PEERS: tuple[Peer, ...] = (
    Peer("captum Saliency", "saliency", "input", captum_saliency),
    Peer("captum GuidedBackprop", "guided_backprop", "input", captum_guided_backprop),
    Peer("captum LayerGradCam+interp", "grad_cam", "layer", captum_layer_grad_cam),
    Peer("pytorch-grad-cam GradCAM", "grad_cam", "layer", pytorch_grad_cam),
    Peer("torchcam GradCAM", "grad_cam", "layer", torchcam_grad_cam),
    Peer("captum GuidedGradCam", "guided_grad_cam", "both", captum_guided_grad_cam),
    Peer("captum Occlusion ppe=1", "occlusion", "occlusion", captum_occlusion(1)),
    Peer("captum Occlusion ppe=16", "occlusion", "occlusion", captum_occlusion(16)),
    Peer("captum Occlusion ppe=64", "occlusion", "occlusion", captum_occlusion(64)),
)
"""Every peer, in the order of the table."""


def max_difference(peer_run: PeerRun) -> tuple[float, float]:
    """The largest absolute difference between the peer's map and ours, and that over max |ours|."""
    theirs = peer_run.output(peer_run.run()).detach().to(peer_run.reference.dtype)
    diff = float((theirs - peer_run.reference).abs().max())
    scale = float(peer_run.reference.abs().max())
    return diff, diff / scale if scale > 0 else diff
