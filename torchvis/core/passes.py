"""One forward and one backward pass that serve every gradient method at once.

Saliency needs the gradient at the input, Grad-CAM the activation and gradient at a layer, guided
backprop the input gradient under the guided ReLU rule. :func:`gradient_pass` computes exactly the
gradients asked for with ``torch.autograd.grad`` — no weight gradient, no ``.grad`` written, and a
backward that stops at the deepest tensor requested.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from torchvis.core import hooks, layouts
from torchvis.core.caller import warn_user
from torchvis.core.forward import check_finite, grad_leaf, guarded
from torchvis.core.hooks import LayerAddress
from torchvis.core.inputs import InputLike, Inputs, Model, as_inputs, check_model, check_module
from torchvis.core.targets import Resolved, Target, resolve_target, score_of

_PASS_THROUGH = (nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)


@dataclass(frozen=True)
class GradientPass:
    """The result of :func:`gradient_pass`; every tensor detached.

    ``logits`` the model's output (``[B, classes]`` for a classifier; any structure with a callable
    target); ``target`` the resolved target (:func:`torchvis.core.targets.resolve_target`: ``[B]``
    int64 classes, an index ``[B, k]`` or the callable); ``input_grads`` one gradient per input, each
    shaped like it (if asked); ``activations`` and ``grads`` map each layer's dotted name to its output
    ``[B,K,h,w]`` and the score's gradient there; ``layer_names`` gives the name of each requested
    layer, in the order asked (resolving ``None``).
    """

    logits: Any
    target: Resolved
    input_grads: tuple[Tensor, ...] | None
    activations: dict[str, Tensor]
    grads: dict[str, Tensor]
    layer_names: tuple[str, ...]


def gradient_pass(
    model: Model,
    x: InputLike | Inputs,
    target: Target = None,
    *,
    layers: Sequence[LayerAddress | None] = (),
    input_grad: bool = False,
    guided: bool = False,
    eval_mode: bool = True,
    layer_input: bool = False,
    guidable: bool = False,
) -> GradientPass:
    """Gradients of the target logit at the input and/or at ``layers``, from one forward and one backward.

    ``x``: a tensor ``[B, ...]``, a tuple of them, or :class:`~torchvis.core.inputs.Inputs` (with extra
    forward arguments). A ``None`` layer means, for a torchvision-style ViT, the last block's ``ln_1``
    (:func:`torchvis.core.layouts.vit_layer`), else the last module whose output is still a spatial
    feature map of the first input's rank (see :func:`pick_feature_layer`). A layer may be one element of
    a tuple output (:func:`torchvis.core.hooks.address`); with ``layer_input`` the layers' inputs are
    taken instead of their outputs. With ``guided``, every ReLU's backward follows guided backprop; the
    model is refused if TorchScript (:func:`check_guidable`) unless ``guidable`` says the caller has
    checked. Layers and ``guided`` need an ``nn.Module``; the input gradient alone any callable. A wrapped
    module (``torch.compile``, ``DataParallel``) runs as its original module (:func:`hooks.unwrap`). The
    layers' outputs are kept without a copy unless the model has modules that work in place
    (:func:`hooks.has_in_place_modules`) or the call has forward arguments (which it may change in place,
    so that a rerun would see them changed); if a functional in-place op (``y += x``, ``F.relu(y,
    inplace=True)``) overwrites one, the forward runs once more, with copies and from the same RNG state —
    the same maps, at the cost of a second forward.
    """
    inputs = as_inputs(x)
    check_model(model)
    requested: list[str | None] = []
    if guided or layers:
        module = check_module(model, "guided backprop" if guided else "a layer method")
        requested = [_layer_key(module, layer) for layer in layers]  # names with a wrapper's prefix too
        model = module = hooks.unwrap(module)
    if guided and not guidable:
        check_guidable(module)
    named = [name for name in requested if name is not None]
    batch = inputs.batch

    def forward(copy: bool) -> tuple[Any, hooks.Recording | None, hooks.ActivationReport | None,
                                     list[hooks.ModuleOutput]]:
        if not (guided or requested):  # nothing to watch: no context to enter (it costs per call)
            return inputs.call(model, [leaf.clone() for leaf in leaves]), None, None, []
        guide: AbstractContextManager[hooks.ActivationReport | None] = (
            hooks.guided_relus() if guided else nullcontext()
        )
        auto: AbstractContextManager[list[hooks.ModuleOutput]] = (
            hooks.feature_maps(model, inputs.first.dim())  # type: ignore[arg-type]
            if None in requested else nullcontext([])
        )
        recording: AbstractContextManager[hooks.Recording | None] = (
            # No gradient hook: the pass takes the layers' gradients from autograd.grad after the block.
            hooks.capture(model, named, inputs=layer_input, grads=False, copy=copy)  # type: ignore[arg-type]
            if named else nullcontext(None)
        )
        with recording as rec, guide as report, auto as maps:
            # A copy: a model that changes its input in place must not hit the leaf (an autograd error).
            logits = inputs.call(model, [leaf.clone() for leaf in leaves])
        return logits, rec, report, maps

    with guarded(model, inputs.first, eval_mode=eval_mode) as rewind:
        leaves = [grad_leaf(t) for t in inputs.tensors]
        # A model without in-place modules gets its layers' outputs recorded uncopied (a copy is a pass
        # over each); should a functional in-place op (x += y) overwrite one, the forward runs again with
        # copies, from the RNG state the guard saved (None: nothing inside draws from it).
        # Not with extra forward arguments either: a model may change those in place, and a rerun would
        # see them changed.
        uncopied = (bool(named) and not inputs.forward_args and not inputs.forward_kwargs
                    and not hooks.has_in_place_modules(model))  # type: ignore[arg-type]
        logits, rec, report, maps = forward(copy=not uncopied)
        if uncopied and rec is not None and rec.modified():
            if rewind is not None:
                rewind()
            logits, rec, report, maps = forward(copy=True)
        # Outside the hooks and the guided ReLU mode: the score is not part of the model (and ops run
        # under a torch function mode pay a Python dispatch each).
        t = resolve_target(target, logits, batch)
        score = score_of(logits, t, batch)
        if report is not None and report.untreated:
            _warn_untreated(report)
        outputs = {name: _single_call_output(rec, name) for name in named}  # type: ignore[arg-type]
        if None in requested:
            chosen = pick_feature_layer(maps)
            outputs.setdefault(chosen.name, chosen.output)
            warn_user(f"layer=None: using {chosen.name!r}, the last spatial feature map")
        wanted = (leaves if input_grad else []) + list(outputs.values())
        if wanted and not score.requires_grad:
            raise ValueError(
                "the explained score does not depend on the inputs (a detached output, or a callable "
                "target that detaches it); there is no gradient to attribute"
            )
        computed = _grad(score.sum(), wanted) if wanted else ()
        check_finite(logits if isinstance(logits, Tensor) else score, *computed)
        grads = iter(computed)
        input_grads = tuple(next(grads) for _ in leaves) if input_grad else None
    return GradientPass(
        logits=logits.detach() if isinstance(logits, Tensor) else logits,
        target=t,
        input_grads=input_grads,
        activations={name: out.detach() for name, out in outputs.items()},
        grads={name: next(grads) for name in outputs},
        layer_names=tuple(chosen.name if name is None else name for name in requested),
    )


@dataclass(frozen=True)
class Shared:
    """What the shared passes give one method at one layer; every tensor detached.

    ``inputs`` the attributed inputs (:class:`~torchvis.core.inputs.Inputs`; ``x`` the first, the
    image for the methods that draw over it); ``target`` the resolved target (``[B]`` int64 classes
    for a classifier); ``input_grads`` the plain gradient at each input and ``guided_grads`` the
    guided-backprop one (each shaped like its input); ``activation`` and ``grad`` the output of the
    layer named ``layer`` ``[B,K,h,w]`` and the score's gradient there; ``logits`` the model's output
    (``[B, classes]`` for a classifier). A field is ``None`` when no requested method needs it.
    """

    inputs: Inputs
    target: Resolved
    logits: Any
    input_grads: tuple[Tensor, ...] | None = None
    guided_grads: tuple[Tensor, ...] | None = None
    layer: str | None = None
    activation: Tensor | None = None
    grad: Tensor | None = None

    @property
    def x(self) -> Tensor:
        """The first input."""
        return self.inputs.first

    @property
    def guided_grad(self) -> Tensor | None:
        """The guided gradient at the first input."""
        return None if self.guided_grads is None else self.guided_grads[0]


def shared_passes(
    model: Model,
    x: InputLike | Inputs,
    target: Target = None,
    *,
    input_grad: bool = False,
    layers: Sequence[LayerAddress | None] = (),
    guided: bool = False,
    eval_mode: bool = True,
    forward_args: object = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    layer_input: bool = False,
) -> list[Shared]:
    """Run each pass that is asked for once: the plain one (for ``input_grad`` and ``layers``) and the
    guided one (for ``guided``), both explaining the same target per example.

    ``x`` a tensor ``[B, ...]`` or a tuple of them; ``forward_args``/``forward_kwargs`` passed to the
    model after it (see :mod:`torchvis.core.inputs`). Returns one :class:`Shared` per requested layer,
    in the order asked (one without a layer when ``layers`` is empty). ``layer_input`` as in
    :func:`gradient_pass`.
    """
    inputs = as_inputs(x, forward_args, forward_kwargs)
    if guided:  # refused before the plain pass runs; the guided pass need not walk the model again
        check_guidable(check_module(model, "guided backprop"))
    plain = guided_result = None
    if input_grad or layers:
        plain = gradient_pass(model, inputs, target, layers=layers, input_grad=input_grad,
                              eval_mode=eval_mode, layer_input=layer_input)
        target = plain.target
    if guided:
        guided_result = gradient_pass(model, inputs, target, input_grad=True, guided=True,
                                      eval_mode=eval_mode, guidable=True)
        target = guided_result.target
    if plain is None and guided_result is None:
        raise ValueError("shared_passes needs input_grad, layers or guided")
    base = Shared(
        inputs=inputs,
        target=target,  # type: ignore[arg-type]  # resolved by the pass that ran
        logits=(plain or guided_result).logits,  # type: ignore[union-attr]
        input_grads=plain.input_grads if plain is not None else None,
        guided_grads=guided_result.input_grads if guided_result is not None else None,
    )
    if plain is None or not plain.layer_names:
        return [base]
    return [replace(base, layer=name, activation=plain.activations[name], grad=plain.grads[name])
            for name in plain.layer_names]


def target_pass(
    model: Model,
    inputs: Inputs,
    target: Target,
    *,
    eval_mode: bool = True,
    also: Sequence[Sequence[Tensor]] = (),
) -> tuple[Resolved, Tensor, list[Tensor]]:
    """One forward of ``inputs`` without gradients that resolves ``target`` for its ``B`` examples, for
    methods that then run the model on other batches (noisy copies, path points) and explain the same
    target in each. Returns the resolved target, the explained score per example ``[B]`` and, for each
    tensor list in ``also`` (other inputs of the same shapes, e.g. the baselines), its score ``[B]``.
    Raises if the output or a score is not finite."""
    batch = inputs.batch
    with guarded(model, inputs.first, eval_mode=eval_mode, grad=False), torch.no_grad():
        output = inputs.call(model, [t.clone() for t in inputs.tensors])  # a model may change its input
        resolved = resolve_target(target, output, batch)
        score = score_of(output, resolved, batch)
        check_finite(output if isinstance(output, Tensor) else score)
        others = []
        for tensors in also:
            other = inputs.call(model, [t.clone() for t in tensors])
            others.append(score_of(other, resolved, batch))
            check_finite(other if isinstance(other, Tensor) else others[-1])
    return resolved, score, others


@dataclass(frozen=True)
class ActivationPass:
    """The result of :func:`activation_pass`; every tensor detached.

    ``logits`` the model's output (``[B, classes]`` for a classifier); ``target`` resolved as in
    :class:`GradientPass`; ``layer`` the dotted name of the layer (resolving ``None``) and
    ``activation`` its output ``[B,K,h,w]``.
    """

    logits: Any
    target: Resolved
    layer: str
    activation: Tensor


def activation_pass(
    model: Model,
    x: InputLike | Inputs,
    target: Target = None,
    *,
    layer: LayerAddress | None,
    eval_mode: bool = True,
    layer_input: bool = False,
) -> ActivationPass:
    """One forward pass without gradients that records ``layer``'s output (for methods that only
    read activations, such as Score-CAM). ``layer=None`` and ``layer_input`` as in
    :func:`gradient_pass`. It also runs under ``torch.inference_mode()``: the recorded outputs must be
    ordinary tensors, whose in-place changes are tracked, so the pass itself runs outside it."""
    inputs = as_inputs(x)
    model = check_module(model, "a layer method")
    name = _layer_key(model, layer)
    model = hooks.unwrap(model)
    with guarded(model, inputs.first, eval_mode=eval_mode, grad=False), torch.inference_mode(False), \
            torch.no_grad():
        auto: AbstractContextManager[list[hooks.ModuleOutput]] = (
            hooks.feature_maps(model, inputs.first.dim()) if name is None else nullcontext([])
        )
        with hooks.capture(model, [] if name is None else [name], inputs=layer_input, grads=False) as rec, \
                auto as maps:
            logits = inputs.call(model, [t.clone() for t in inputs.tensors])
        if name is None:
            chosen = pick_feature_layer(maps, grad=False)
            name, output = chosen.name, chosen.output
            warn_user(f"layer=None: using {name!r}, the last spatial feature map")
        else:
            output = _single_call_output(rec, name)
        t = resolve_target(target, logits, inputs.batch)
        check_finite(logits if isinstance(logits, Tensor) else score_of(logits, t, inputs.batch))
    return ActivationPass(logits=logits, target=t, layer=name, activation=output)


def check_guidable(module: nn.Module) -> None:
    """Guided backprop rewrites ReLUs as they run in Python: a TorchScript model is refused."""
    if any(isinstance(m, torch.jit.ScriptModule) for m in hooks.submodules(hooks.unwrap(module))):
        raise TypeError(
            "guided backprop cannot see the ReLUs inside a TorchScript model (they run outside "
            "Python); pass the eager nn.Module"
        )


def _layer_key(model: nn.Module, layer: LayerAddress | None) -> str | None:
    """The recording key of ``layer``; for ``None`` on a ViT the last block's ``ln_1`` (with a
    warning), else ``None`` (the last spatial map, found during the pass)."""
    if layer is not None:
        return hooks.address(model, layer).key
    vit = layouts.vit_layer(model)
    if vit is not None:
        warn_user(
            f"layer=None: using {vit!r}, the last ViT block's normalised input (tokens [B,N,D], read as "
            "a patch grid by reshape='auto'); the final encoder.ln sees only the class token's gradient"
        )
    return vit


def _grad(score: Tensor, wanted: list[Tensor]) -> tuple[Tensor, ...]:
    try:
        return torch.autograd.grad(score, wanted)
    except RuntimeError as err:
        if "modified by an inplace operation" not in str(err):
            raise
        raise RuntimeError(
            "a tensor the backward pass needs was changed in place during the attribution: by the model "
            "itself, or by another thread (an optimizer step on the weights?). Training and explaining "
            "the same model concurrently is not supported: explain a copy, or use "
            "Monitor(..., background=True)"
        ) from err


def _single_call_output(rec: hooks.Recording, name: str) -> Tensor:
    if rec.calls[name] > 1:
        raise ValueError(
            f"layer {name!r} runs {rec.calls[name]} times per forward pass; its gradient would mix "
            "those calls — choose a module that runs once (e.g. its parent block)"
        )
    return rec.output(name)


def _warn_untreated(report: hooks.ActivationReport) -> None:
    seen = ", ".join(f"{name} ({n} calls)" for name, n in sorted(report.untreated.items()))
    warn_user(
        f"guided backprop only rewrites ReLU gradients; the model also uses {seen}, whose gradients "
        "pass through unchanged"
    )


def pick_feature_layer(maps: Sequence[hooks.ModuleOutput], *, grad: bool = True) -> hooks.ModuleOutput:
    """The last module (in order of finishing) whose output is a spatial map ``[B,K,h,w]`` (or
    ``[B,K,*spatial]`` of the input's rank) with more than one position, that ran once and whose
    output no later op changed in place — skipping dropout and identity modules, which only pass their
    input on. For torchvision's ResNet this is ``layer4``. With ``grad`` (a forward run with gradients
    on) the output must also depend on the input."""
    counts = Counter(seen.name for seen in maps)
    for seen in reversed(maps):
        if (
            counts[seen.name] == 1
            and not isinstance(seen.module, _PASS_THROUGH)
            and math.prod(seen.output.shape[2:]) > 1
            and seen.output._version == seen.version
            and (seen.output.requires_grad or not grad)
        ):
            return seen
    raise ValueError(
        "layer=None: no module of this model outputs a spatial feature map [B,K,h,w] with h*w > 1 "
        "that runs once per forward; pass layer= explicitly"
    )
