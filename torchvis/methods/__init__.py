"""Attribution methods: one spec each (:mod:`torchvis.methods.spec`), plain functions
``(model, x, target=None, **options) -> Tensor``, and :func:`explain` that runs several sharing passes.

Importing this package registers the built-in methods, in this order.
"""

# Registration order is the order methods are listed in (CLI, figures, METHODS): gradients, CAMs,
# perturbation, then the gradient family (path, noise) and the CAM family (variants, Score-CAM).
from torchvis.methods import gradient, cam, perturbation, path, noise, cam_variants, score  # noqa: I001, F401
from torchvis.methods.cam import grad_cam, guided_grad_cam
from torchvis.methods.cam_variants import grad_cam_pp, hires_cam, layer_cam, xgrad_cam
from torchvis.methods.combine import explain
from torchvis.methods.gradient import gradient_x_input, guided_backprop, saliency
from torchvis.methods.noise import smoothgrad, vargrad
from torchvis.methods.path import integrated_gradients
from torchvis.methods.perturbation import occlusion
from torchvis.methods.score import score_cam
from torchvis.methods.spec import METHODS, SPECS, Look, MethodSpec, Need, register, spec_of, unregister

__all__ = [
    "METHODS",
    "SPECS",
    "Look",
    "MethodSpec",
    "Need",
    "explain",
    "grad_cam",
    "grad_cam_pp",
    "gradient_x_input",
    "guided_backprop",
    "guided_grad_cam",
    "hires_cam",
    "integrated_gradients",
    "layer_cam",
    "occlusion",
    "register",
    "saliency",
    "score_cam",
    "smoothgrad",
    "spec_of",
    "unregister",
    "vargrad",
    "xgrad_cam",
]
