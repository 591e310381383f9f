"""Integrated Gradients (Sundararajan, Taly & Yan, ICML 2017): gradients along the straight path from
a baseline to the input, integrated by a quadrature rule."""

from __future__ import annotations

from typing import Literal, overload

import numpy as np
import torch
from torch import Tensor, nn

from torchvis.core.forward import Target, check_finite, check_input, checked_logits, guarded, resolve_target
from torchvis.core.passes import gradient_pass
from torchvis.methods.perturbation import default_batch_size
from torchvis.methods.spec import Look, Need, register

Rule = Literal["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"]
RULES: tuple[str, ...] = (
    "gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid",
)


def quadrature(rule: str, steps: int) -> tuple[list[float], list[float]]:
    """Nodes ``alpha`` in [0, 1] and weights of ``rule`` with ``steps`` nodes, in float64.

    Captum's conventions: Gauss-Legendre on [0, 1]; Riemann sums of ``steps`` equal parts with the
    left end, right end or middle of each part as node and weight ``1/steps``. The trapezoid rule takes
    ``steps`` equally spaced nodes from 0 to 1 inclusive, weights ``1/(steps-1)`` halved at both ends
    (Captum uses the same nodes with weights ``1/steps``, halved, which sum to ``1 - 1/steps``: its
    result is ``(steps-1)/steps`` times this one, and misses completeness by that factor).
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1; got {steps!r}")
    n = steps
    if rule == "gausslegendre":
        t, w = np.polynomial.legendre.leggauss(n)
        return (0.5 * (1 + t)).tolist(), (0.5 * w).tolist()
    if rule == "riemann_trapezoid":
        if n < 2:
            raise ValueError("the trapezoid rule needs steps >= 2 (both ends of the path)")
        weights = [1 / (n - 1)] * n
        weights[0] = weights[-1] = 0.5 / (n - 1)
        return [k / (n - 1) for k in range(n)], weights
    shift = {"riemann_left": 0.0, "riemann_middle": 0.5, "riemann_right": 1.0}[rule]
    return [(k + shift) / n for k in range(n)], [1 / n] * n


def _baseline_like(baseline: float | Tensor, x: Tensor) -> Tensor:
    """``baseline`` as a tensor of ``x``'s dtype and device, expanded to ``x``'s shape."""
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float, Tensor)):
        raise TypeError(f"baseline must be a number or a tensor; got {type(baseline).__name__}")
    b = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    try:
        shape = torch.broadcast_shapes(b.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise ValueError(f"baseline of shape {list(b.shape)} does not broadcast to x's shape {list(x.shape)}")
    return b.expand_as(x)


def _end_scores(
    model: nn.Module, x: Tensor, baseline: Tensor, target: Target, eval_mode: bool, *, both: bool
) -> tuple[Tensor, Tensor]:
    """The target per example and, if ``both``, ``F(x) - F(baseline)`` (else zeros), from a forward
    pass of ``x`` (and one of the baseline)."""
    with guarded(model, x, eval_mode=eval_mode, grad=False), torch.no_grad():
        logits = checked_logits(model(x.clone()), x.shape[0])  # a model may change its input in place
        check_finite(logits)
        t = resolve_target(target, logits)
        if not both:
            return t, logits.new_zeros(x.shape[0])
        far = checked_logits(model(baseline.clone()), x.shape[0])
        check_finite(far)
        return t, (logits - far).gather(1, t[:, None])[:, 0]


@overload
def integrated_gradients(
    model: nn.Module, x: Tensor, target: Target = ..., *, baseline: float | Tensor = ..., steps: int = ...,
    rule: str = ..., batch_size: int | None = ..., return_delta: Literal[False] = ..., eval_mode: bool = ...,
) -> Tensor: ...


@overload
def integrated_gradients(
    model: nn.Module, x: Tensor, target: Target = ..., *, baseline: float | Tensor = ..., steps: int = ...,
    rule: str = ..., batch_size: int | None = ..., return_delta: Literal[True], eval_mode: bool = ...,
) -> tuple[Tensor, Tensor]: ...


def integrated_gradients(
    model: nn.Module,
    x: Tensor,
    target: Target = None,
    *,
    baseline: float | Tensor = 0.0,
    steps: int = 50,
    rule: str = "gausslegendre",
    batch_size: int | None = None,
    return_delta: bool = False,
    eval_mode: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Integrated Gradients. Returns the shape of ``x`` ``[B,C,H,W]`` (and ``[B]`` with ``return_delta``).

    Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep Networks", ICML 2017:
    ``(x - x') * integral_0^1 dF(x' + alpha (x - x'))/dx dalpha``, with ``x'`` the ``baseline`` (a number
    or a tensor broadcastable to ``x``) and the integral taken by ``rule`` with ``steps`` nodes
    (:func:`quadrature`: Captum's conventions, so the result equals Captum's
    ``IntegratedGradients(n_steps=steps, method=rule)`` — but for ``"riemann_trapezoid"``, whose
    Captum weights sum to ``1 - 1/steps``). The ``steps * B`` path points go through the model in
    batches of at most ``batch_size`` (default: as :func:`torchvis.methods.perturbation.
    default_batch_size` chooses), one forward and one ``torch.autograd.grad`` each. With
    ``return_delta``, also the completeness gap ``sum(IG) - (F(x) - F(x'))`` per example.
    """
    x = check_input(x).detach()
    nodes, weights = quadrature(rule, steps)
    if batch_size is None:
        batch_size = default_batch_size(x)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
    start = _baseline_like(baseline, x)
    # One forward pass of x (and of the baseline, for the gap) resolves the target for every step.
    targets, gap = _end_scores(model, x, start, target, eval_mode, both=return_delta)
    batch, path = x.shape[0], x - start
    alphas = torch.tensor(nodes, dtype=x.dtype, device=x.device)
    scales = torch.tensor(weights, dtype=x.dtype, device=x.device)
    shape = (-1,) + (1,) * (x.dim() - 1)
    total = torch.zeros_like(x)
    # Flat index k = step * B + example: a batch holds consecutive steps of consecutive examples.
    flat = torch.arange(steps * batch, device=x.device)
    for lo in range(0, steps * batch, batch_size):
        step, example = flat[lo : lo + batch_size] // batch, flat[lo : lo + batch_size] % batch
        points = start[example] + alphas[step].view(shape) * path[example]
        grads = gradient_pass(model, points, targets[example], input_grad=True, eval_mode=eval_mode)
        assert grads.input_grad is not None
        total.index_add_(0, example, grads.input_grad * scales[step].view(shape))
    attributions = path * total
    if not return_delta:
        return attributions
    return attributions, attributions.flatten(1).sum(dim=1) - gap


register("integrated_gradients", integrated_gradients, needs=Need.OWN, look=Look.SIGNED,
         title="integrated gradients")
