"""Several methods at once, each shared pass run once: :func:`explain`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from torch import Tensor

from torchvis.core.hooks import LayerAddress, address, is_element
from torchvis.core.inputs import InputLike, Model, as_inputs, check_module
from torchvis.core.passes import shared_passes
from torchvis.core.reads import one_host_read
from torchvis.core.targets import Target
from torchvis.methods.cam import check_cam_options, default_reshape
from torchvis.methods.spec import MethodSpec, Need, extra_arguments, spec_of

Method = str | Callable[..., Tensor] | MethodSpec
Layers = LayerAddress | None | Sequence[LayerAddress | None]


class Explained(NamedTuple):
    """What :func:`explain_batch` returns: the maps by key, and the model's logits ``[B, classes]``
    when a shared pass ran (``None`` otherwise)."""

    maps: dict[str, Any]
    logits: Any


def explain(
    model: Model,
    x: InputLike,
    target: Target = None,
    *,
    methods: Sequence[Method],
    layer: Layers = None,
    eval_mode: bool = True,
    forward_args: Any = None,
    forward_kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run several methods on one batch; returns ``{key: map}`` in the order asked.

    Methods are grouped by the pass they need (:class:`torchvis.methods.spec.Need`) and each pass runs
    once: saliency and every CAM variant at every requested layer share one forward and one backward;
    guided backprop and guided Grad-CAM share one guided pass; perturbation and other methods run
    their own. Every method explains the same class per example (``target=None``: the predicted one).
    A method that takes a layer — registered or a plain function whose signature names ``layer``, or
    SmoothGrad/VarGrad of one (``method="grad_cam"``) — gets each requested layer; with a list of
    layers its keys are ``"<method>/<layer>"``, else ``"<method>"``. ``options`` go to the methods
    whose signature names them (``abs``, ``relu``, ``upsample``, ``window``, ``reshape``,
    ``layer_input``, ...); an option no method takes is an error. A layer may be one element of a
    tuple output: ``("encoder.lstm", 0)`` or
    ``"encoder.lstm[0]"`` (a list of layers is a list, never a tuple). ``x`` may be a tuple of
    inputs (each method then returns a tuple of maps, one per input, where its spec says so);
    ``forward_args``/``forward_kwargs`` go to the model with every call (see
    :mod:`torchvis.core.inputs`).
    """
    return explain_batch(model, x, target, methods=methods, layer=layer, eval_mode=eval_mode,
                         forward_args=forward_args, forward_kwargs=forward_kwargs, **options).maps


def explain_batch(
    model: Model,
    x: InputLike,
    target: Target = None,
    *,
    methods: Sequence[Method],
    layer: Layers = None,
    eval_mode: bool = True,
    forward_args: Any = None,
    forward_kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> Explained:
    """:func:`explain`, also returning the logits of the shared pass (so a caller that needs the
    predictions, like the audit, runs no extra forward)."""
    inputs = as_inputs(x, forward_args, forward_kwargs)  # checked once, before any work
    specs = unique_specs(methods)
    routed = route_options(specs, options)
    # Shared methods get the forward arguments through the pass; the others in their call (each checked
    # here, before any work).
    extra = {spec.name: extra_arguments(spec, forward_args, forward_kwargs)
             for spec in specs if not spec.shared}
    many = isinstance(layer, list) or (isinstance(layer, tuple) and not is_element(layer))
    layers: list[LayerAddress | None] = list(layer) if many else [layer]  # type: ignore[arg-type, list-item]
    results: dict[str, Tensor] = {}
    check_cam_options(specs, options, inputs.first)  # the layer methods' options, refused before any pass

    shared_specs = [spec for spec in specs if spec.shared]
    shared_layers = any(spec.takes_layer for spec in shared_specs)
    # The layers' names for the methods that run their own passes, resolved (an unknown layer refused)
    # before any pass runs; None where the shared pass picks the layer (layer=None).
    layered = {spec.name: spec.takes_layer_with(routed[spec.name]) for spec in specs}
    own_names = ([_layer_name(model, ref) for ref in layers]
                 if any(layered[spec.name] and not spec.shared for spec in specs)
                 and not shared_layers else None)
    names: list[str] | None = None
    logits = None
    # The passes' checks and the CAMs' empty-map checks in one host read, made before the methods of
    # their own passes run (an error one of those finds must not hide a NaN the passes found).
    with one_host_read():
        if shared_specs:
            passes = shared_passes(
                model, inputs, target,
                input_grad=any(Need.INPUT_GRADIENT in spec.needs for spec in shared_specs),
                layers=layers if shared_layers else [],
                guided=any(Need.GUIDED in spec.needs for spec in shared_specs),
                eval_mode=eval_mode,
                layer_input=bool(options.get("layer_input", False)),
            )
            target, logits = passes[0].target, passes[0].logits
            if passes[0].layer is not None:
                names = [shared.layer for shared in passes]  # type: ignore[misc]
            for spec in shared_specs:
                assert spec.from_pass is not None
                pairs = zip(layers, passes, strict=True) if spec.takes_layer else [(None, passes[0])]
                for ref, shared in pairs:
                    key = layer_key(spec.name, shared.layer, many) if spec.takes_layer else spec.name
                    kwargs = dict(routed[spec.name])
                    if "reshape" in spec.options:
                        kwargs["reshape"] = default_reshape(model, ref, kwargs.get("reshape"))
                    results[key] = spec.from_pass(shared, **kwargs)

    picked = names is not None  # the shared pass resolved the layers (layer=None included)
    names = names if picked else own_names
    for spec in specs:
        if spec.shared:
            continue
        kwargs = dict(routed[spec.name]) | extra[spec.name]
        if "eval_mode" in spec.parameters:
            kwargs["eval_mode"] = eval_mode
        if not layered[spec.name]:
            results[spec.name] = spec.function(model, x, target, **kwargs)
            continue
        assert names is not None  # own_names whenever a method of its own passes takes a layer
        for ref, name in zip(layers, names, strict=True):
            layer_kwargs = kwargs
            if picked and ref is None:  # the layer the pass picked, so that the key says what was used
                layer_kwargs = dict(kwargs, layer=name)
                if "reshape" in spec.options_with(kwargs):
                    layer_kwargs["reshape"] = default_reshape(model, None, kwargs.get("reshape"))
            else:
                layer_kwargs = dict(kwargs, layer=ref)
            results[layer_key(spec.name, name, many)] = spec.function(model, x, target, **layer_kwargs)
    maps = {key: results[key] for spec in specs for key in results if key.split("/")[0] == spec.name}
    return Explained(maps, logits)


def unique_specs(methods: Sequence[Method]) -> list[MethodSpec]:
    """The specs of ``methods`` (names, functions or specs), each once, in the order given."""
    if isinstance(methods, (str, MethodSpec)) or callable(methods):
        raise TypeError("methods must be a sequence of methods, e.g. methods=['saliency']")
    specs: dict[str, MethodSpec] = {}
    for method in methods:
        spec = spec_of(method)
        specs.setdefault(spec.name, spec)
    if not specs:
        raise ValueError("methods is empty; name at least one, e.g. methods=('saliency', 'grad_cam')")
    return list(specs.values())


def route_options(specs: Sequence[MethodSpec], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Give each method the options its signature names (for SmoothGrad and VarGrad: also those of
    the method they wrap, which they pass on); an option no method takes is an error."""
    routed: dict[str, dict[str, Any]] = {spec.name: {} for spec in specs}
    taken = {spec.name: spec.options_with(options) for spec in specs}
    for key, value in options.items():
        takers = [spec.name for spec in specs if key in taken[spec.name]]
        if not takers:
            raise TypeError(f"option {key!r} is taken by none of the methods {[s.name for s in specs]}")
        for name in takers:
            routed[name][key] = value
    return routed


def layer_key(method: str, layer: str | None, many: bool) -> str:
    """``"<method>/<layer>"`` for a list of layers, else ``"<method>"``."""
    return f"{method}/{layer}" if many else method


def _layer_name(model: Model, layer: LayerAddress | None) -> str:
    return "auto" if layer is None else address(check_module(model, "a layer method"), layer).key

