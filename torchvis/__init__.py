"""torchvis: see what a convolutional network looks at.

Attribution methods are plain functions ``(model, x [B,C,H,W], target=None, **options) -> Tensor``;
the hook core (:mod:`torchvis.hooks`) is public for building your own analyses.
"""

from torchvis.explain import METHODS, explain
from torchvis.gradcam import grad_cam, guided_grad_cam
from torchvis.hooks import Recording, capture, resolve_layer
from torchvis.occlusion import occlusion
from torchvis.saliency import guided_backprop, saliency

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Recording",
    "capture",
    "explain",
    "grad_cam",
    "guided_backprop",
    "guided_grad_cam",
    "occlusion",
    "resolve_layer",
    "saliency",
]
