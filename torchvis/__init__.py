"""torchvis: see what a convolutional network looks at.

Attribution methods are plain functions ``(model, x [B,C,H,W], target=None, **options) -> Tensor``,
each described by one spec (:func:`register`, :data:`SPECS`); the hook core (:mod:`torchvis.core.hooks`,
also ``torchvis.hooks``) is public for building your own analyses.
"""

from torchvis import targets
from torchvis.core import hooks
from torchvis.core.hooks import Recording, capture, resolve_layer
from torchvis.core.passes import Shared, shared_passes
from torchvis.inspection.activation_maximization import (
    Channel,
    Logit,
    maximize,
    parse_unit,
    to_images,
    unit_activations,
)
from torchvis.inspection.architecture import log_graph
from torchvis.inspection.conv_filters import filter_grid, filters, log_filters
from torchvis.inspection.features import feature_grid, feature_maps, log_feature_maps, top_channels
from torchvis.inspection.model_summary import Summary, log_summary, summary
from torchvis.methods import (
    METHODS,
    SPECS,
    Look,
    MethodSpec,
    Need,
    explain,
    grad_cam,
    grad_cam_pp,
    gradient_x_input,
    guided_backprop,
    guided_grad_cam,
    hires_cam,
    integrated_gradients,
    layer_cam,
    occlusion,
    register,
    saliency,
    score_cam,
    smoothgrad,
    spec_of,
    unregister,
    vargrad,
    xgrad_cam,
)
from torchvis.metrics.faithfulness import deletion, deletion_insertion, insertion
from torchvis.metrics.sanity import SanityResult, sanity_check
from torchvis.rendering import image
from torchvis.tracking.monitor import Monitor
from torchvis.tracking.tensorboard import PNGWriter, log_attributions

__version__ = "0.1.0"

__all__ = [
    "Channel",
    "Logit",
    "Look",
    "METHODS",
    "MethodSpec",
    "Need",
    "SPECS",
    "Shared",
    "Monitor",
    "PNGWriter",
    "Recording",
    "SanityResult",
    "Summary",
    "capture",
    "deletion",
    "deletion_insertion",
    "explain",
    "feature_grid",
    "feature_maps",
    "filter_grid",
    "filters",
    "grad_cam",
    "grad_cam_pp",
    "gradient_x_input",
    "guided_backprop",
    "guided_grad_cam",
    "hires_cam",
    "hooks",
    "image",
    "integrated_gradients",
    "layer_cam",
    "insertion",
    "log_attributions",
    "log_feature_maps",
    "log_filters",
    "log_graph",
    "log_summary",
    "maximize",
    "occlusion",
    "parse_unit",
    "register",
    "resolve_layer",
    "saliency",
    "score_cam",
    "sanity_check",
    "shared_passes",
    "smoothgrad",
    "spec_of",
    "summary",
    "targets",
    "to_images",
    "top_channels",
    "unit_activations",
    "unregister",
    "vargrad",
    "xgrad_cam",
]
