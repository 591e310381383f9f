"""Several methods at once, sharing passes, and the registry of methods by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from torchvis.core.forward import Target
from torchvis.core.hooks import LayerRef
from torchvis.core.passes import gradient_pass
from torchvis.methods.cam import cam_map, grad_cam, guided_cam, guided_grad_cam
from torchvis.methods.gradient import guided_backprop, saliency
from torchvis.methods.perturbation import occlusion

METHODS: dict[str, Callable[..., Tensor]] = {
    "saliency": saliency,
    "guided_backprop": guided_backprop,
    "grad_cam": grad_cam,
    "guided_grad_cam": guided_grad_cam,
    "occlusion": occlusion,
}
"""Methods by name, for configs and the CLI: each is ``(model, x [B,C,H,W], target=None, **options) ->
Tensor``. Add your own: ``METHODS["mine"] = my_method``."""

_CAMS = ("grad_cam", "guided_grad_cam")


def method_name(method: str | Callable[..., Tensor]) -> str:
    """The registry name of a method given by name or by function."""
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}")
        return method
    for name, fn in METHODS.items():
        if fn is method:
            return name
    return getattr(method, "__name__", type(method).__name__)


def explain(
    model: nn.Module,
    x: Tensor,
    target: Target = None,
    *,
    methods: Sequence[str | Callable[..., Tensor]],
    layer: LayerRef | None | Sequence[LayerRef | None] = None,
    eval_mode: bool = True,
    **options: Any,
) -> dict[str, Tensor]:
    """Run several methods on one batch; returns ``{method name: map}`` in the order asked.

    Saliency and Grad-CAM (at one or several layers) share one forward and one backward pass; guided
    backprop and guided Grad-CAM share one guided pass; occlusion and user methods run their own.
    Every method explains the same class per example (``target=None``: the predicted one). With a list
    of layers, the keys are ``"grad_cam/<layer>"`` (likewise guided Grad-CAM). ``options`` go to the
    methods whose signature names them (``abs``, ``relu``, ``upsample``, ``window``, ...).
    """
    functions = {method_name(m): m if callable(m) else METHODS[m] for m in methods}
    names = list(functions)
    opts = _route_options(functions, options)
    layers: list[LayerRef | None] = list(layer) if isinstance(layer, (list, tuple)) else [layer]  # type: ignore[list-item]
    cams = [name for name in _CAMS if name in names]
    results: dict[str, Tensor] = {}

    if "saliency" in names or cams:
        plain = gradient_pass(
            model, x, target, layers=layers if cams else [],
            input_grad="saliency" in names, eval_mode=eval_mode,
        )
        target = plain.target
        if plain.input_grad is not None:
            grad = plain.input_grad.to(x.dtype)
            results["saliency"] = grad.abs() if opts["saliency"].get("abs", False) else grad
    if "guided_backprop" in names or "guided_grad_cam" in names:
        guided = gradient_pass(model, x, target, input_grad=True, guided=True, eval_mode=eval_mode)
        target = guided.target
        assert guided.input_grad is not None
        guided_grad = results["guided_backprop"] = guided.input_grad.to(x.dtype)
    for layer_name in plain.layer_names if cams else ():
        suffix = f"/{layer_name}" if isinstance(layer, (list, tuple)) else ""
        act, grad = plain.activations[layer_name], plain.grads[layer_name]
        if "grad_cam" in names:
            relu, upsample = opts["grad_cam"].get("relu", True), opts["grad_cam"].get("upsample", True)
            results["grad_cam" + suffix] = cam_map(act, grad, x, relu=relu, upsample=upsample)
        if "guided_grad_cam" in names:
            results["guided_grad_cam" + suffix] = guided_cam(guided_grad, act, grad, x)
    for name, fn in functions.items():
        if name in ("saliency", "guided_backprop", *_CAMS):
            continue
        if "eval_mode" in inspect.signature(fn).parameters:
            opts[name]["eval_mode"] = eval_mode
        results[name] = fn(model, x, target, **opts[name])
    return {key: results[key] for name in names for key in results if key.split("/")[0] == name}


def _route_options(
    functions: dict[str, Callable[..., Tensor]], options: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Give each method the options its signature names; an option no method takes is an error."""
    routed: dict[str, dict[str, Any]] = {name: {} for name in functions}
    for key, value in options.items():
        takers = [name for name, fn in functions.items() if key in inspect.signature(fn).parameters]
        if not takers:
            raise TypeError(f"option {key!r} is taken by none of the methods {sorted(functions)}")
        for name in takers:
            routed[name][key] = value
    return routed
