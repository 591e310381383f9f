"""torchvis: see what a convolutional network looks at.

Attribution methods are plain functions ``(model, x [B,C,H,W], target=None, **options) -> Tensor``;
the hook core (:mod:`torchvis.hooks`) is public for building your own analyses.
"""

from torchvis.architecture import log_graph
from torchvis.explain import METHODS, explain
from torchvis.features import feature_grid, feature_maps, log_feature_maps, top_channels
from torchvis.filters import filter_grid, filters, log_filters
from torchvis.gradcam import grad_cam, guided_grad_cam
from torchvis.hooks import Recording, capture, resolve_layer
from torchvis.image import Look
from torchvis.maximize import Channel, Logit, maximize, parse_unit, to_images, unit_activations
from torchvis.monitor import Monitor
from torchvis.occlusion import occlusion
from torchvis.saliency import guided_backprop, saliency
from torchvis.summary import Summary, log_summary, summary
from torchvis.tensorboard import PNGWriter, log_attributions

__version__ = "0.1.0"

__all__ = [
    "Channel",
    "Logit",
    "Look",
    "METHODS",
    "Monitor",
    "PNGWriter",
    "Recording",
    "Summary",
    "capture",
    "explain",
    "feature_grid",
    "feature_maps",
    "filter_grid",
    "filters",
    "grad_cam",
    "guided_backprop",
    "guided_grad_cam",
    "log_attributions",
    "log_feature_maps",
    "log_filters",
    "log_graph",
    "log_summary",
    "maximize",
    "occlusion",
    "parse_unit",
    "resolve_layer",
    "saliency",
    "summary",
    "to_images",
    "top_channels",
    "unit_activations",
]
