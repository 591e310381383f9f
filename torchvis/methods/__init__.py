"""Attribution methods: one spec each (:mod:`torchvis.methods.spec`), plain functions
``(model, x, target=None, **options) -> Tensor``, and :func:`explain` that runs several sharing passes.

Importing this package registers the built-in methods, in this order.
"""

# Registration order is the order methods are listed in (CLI, figures, METHODS): gradients, CAMs,
# perturbation.
from torchvis.methods import gradient, cam, perturbation  # noqa: I001, F401  (isort: order matters)
from torchvis.methods.cam import grad_cam, guided_grad_cam
from torchvis.methods.combine import explain
from torchvis.methods.gradient import guided_backprop, saliency
from torchvis.methods.perturbation import occlusion
from torchvis.methods.spec import METHODS, SPECS, Look, MethodSpec, Need, register, spec_of, unregister

__all__ = [
    "METHODS",
    "SPECS",
    "Look",
    "MethodSpec",
    "Need",
    "explain",
    "grad_cam",
    "guided_backprop",
    "guided_grad_cam",
    "occlusion",
    "register",
    "saliency",
    "spec_of",
    "unregister",
]
