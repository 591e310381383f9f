"""One forward and one backward pass that serve every gradient method at once.

Saliency needs the gradient at the input, Grad-CAM the activation and gradient at a layer, guided
backprop the input gradient under the guided ReLU rule. :func:`gradient_pass` computes exactly the
gradients asked for with ``torch.autograd.grad`` — no weight gradient, no ``.grad`` written, and a
backward that stops at the deepest tensor requested.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from torchvis.core import hooks
from torchvis.core.forward import (
    Target,
    check_finite,
    check_input,
    checked_logits,
    class_score,
    grad_leaf,
    guarded,
    resolve_target,
)
from torchvis.core.hooks import LayerRef

_PASS_THROUGH = (nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)


@dataclass(frozen=True)
class GradientPass:
    """The result of :func:`gradient_pass`; every tensor detached.

    ``logits`` ``[B, classes]``; ``target`` ``[B]`` int64; ``input_grad`` shaped like ``x`` (if asked);
    ``activations`` and ``grads`` map each layer's dotted name to ``[B,K,h,w]``; ``layer_names`` gives
    the name of each requested layer, in the order asked (resolving ``None``).
    """

    logits: Tensor
    target: Tensor
    input_grad: Tensor | None
    activations: dict[str, Tensor]
    grads: dict[str, Tensor]
    layer_names: tuple[str, ...]


def gradient_pass(
    model: nn.Module,
    x: Tensor,
    target: Target = None,
    *,
    layers: Sequence[LayerRef | None] = (),
    input_grad: bool = False,
    guided: bool = False,
    eval_mode: bool = True,
) -> GradientPass:
    """Gradients of the target logit at the input and/or at ``layers``, from one forward and one backward.

    A ``None`` layer means the last module whose output is still a spatial feature map (see
    :func:`pick_feature_layer`). With ``guided``, every ReLU's backward follows guided backprop.
    """
    check_input(x)
    if guided and any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        raise TypeError(
            "guided backprop cannot see the ReLUs inside a TorchScript model (they run outside "
            "Python); pass the eager nn.Module"
        )
    requested = [None if layer is None else hooks.resolve_layer(model, layer)[0] for layer in layers]
    named = [name for name in requested if name is not None]
    with guarded(model, x, eval_mode=eval_mode):
        xi = grad_leaf(x)
        guide: AbstractContextManager[hooks.ActivationReport | None] = (
            hooks.guided_relus() if guided else nullcontext()
        )
        auto: AbstractContextManager[list[hooks.ModuleOutput]] = (
            hooks.feature_maps(model) if None in requested else nullcontext([])
        )
        with hooks.capture(model, named) as rec, guide as report, auto as maps:
            # A copy: a model that changes its input in place must not hit the leaf (an autograd error).
            logits = checked_logits(model(xi.clone()), x.shape[0])
        if report is not None and report.untreated:
            _warn_untreated(report)
        outputs = {name: _single_call_output(rec, name) for name in named}
        if None in requested:
            chosen = pick_feature_layer(maps)
            outputs.setdefault(chosen.name, chosen.output)
            warnings.warn(f"layer=None: using {chosen.name!r}, the last spatial feature map", stacklevel=3)
        t = resolve_target(target, logits)
        wanted = ([xi] if input_grad else []) + list(outputs.values())
        computed = _grad(class_score(logits, t), wanted) if wanted else ()
        check_finite(logits, *computed)
        grads = iter(computed)
    return GradientPass(
        logits=logits.detach(),
        target=t,
        input_grad=next(grads) if input_grad else None,
        activations={name: out.detach() for name, out in outputs.items()},
        grads={name: next(grads) for name in outputs},
        layer_names=tuple(chosen.name if name is None else name for name in requested),
    )


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
    warnings.warn(
        f"guided backprop only rewrites ReLU gradients; the model also uses {seen}, whose gradients "
        "pass through unchanged",
        stacklevel=4,
    )


def pick_feature_layer(maps: Sequence[hooks.ModuleOutput]) -> hooks.ModuleOutput:
    """The last module (in order of finishing) whose output is a spatial map ``[B,K,h,w]`` with
    ``h*w > 1``, that ran once and whose output no later op changed in place — skipping dropout and
    identity modules, which only pass their input on. For torchvision's ResNet this is ``layer4``."""
    counts = Counter(seen.name for seen in maps)
    for seen in reversed(maps):
        if (
            counts[seen.name] == 1
            and not isinstance(seen.module, _PASS_THROUGH)
            and seen.output.shape[-1] * seen.output.shape[-2] > 1
            and seen.output._version == seen.version
            and seen.output.requires_grad
        ):
            return seen
    raise ValueError(
        "layer=None: no module of this model outputs a spatial feature map [B,K,h,w] with h*w > 1 "
        "that runs once per forward; pass layer= explicitly"
    )
