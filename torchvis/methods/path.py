"""Integrated Gradients (Sundararajan, Taly & Yan, ICML 2017): gradients along the straight path from
a baseline to the input, integrated by a quadrature rule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, overload

import numpy as np
import torch
from torch import Tensor

from torchvis.core.inputs import InputLike, Model, PerInput, as_inputs, check_model, fills
from torchvis.core.passes import gradient_pass, target_pass
from torchvis.core.reads import one_host_read
from torchvis.core.targets import Target, given_target, take_target
from torchvis.methods.perturbation import batch_size_for
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


@overload
def integrated_gradients(
    model: Model, x: Tensor, target: Target = ..., *, baseline: PerInput = ..., steps: int = ...,
    rule: str = ..., batch_size: int | None = ..., return_delta: Literal[False] = ..., eval_mode: bool = ...,
    forward_args: Any = ..., forward_kwargs: Mapping[str, Any] | None = ...,
) -> Tensor: ...


@overload
def integrated_gradients(
    model: Model, x: tuple[Tensor, ...], target: Target = ..., *, baseline: PerInput = ..., steps: int = ...,
    rule: str = ..., batch_size: int | None = ..., return_delta: Literal[False] = ..., eval_mode: bool = ...,
    forward_args: Any = ..., forward_kwargs: Mapping[str, Any] | None = ...,
) -> tuple[Tensor, ...]: ...


@overload
def integrated_gradients(
    model: Model, x: InputLike, target: Target = ..., *, baseline: PerInput = ..., steps: int = ...,
    rule: str = ..., batch_size: int | None = ..., return_delta: Literal[True], eval_mode: bool = ...,
    forward_args: Any = ..., forward_kwargs: Mapping[str, Any] | None = ...,
) -> tuple[InputLike, Tensor]: ...


def integrated_gradients(
    model: Model,
    x: InputLike,
    target: Target = None,
    *,
    baseline: PerInput = 0.0,
    steps: int = 50,
    rule: str = "gausslegendre",
    batch_size: int | None = None,
    return_delta: bool = False,
    eval_mode: bool = True,
    forward_args: Any = None,
    forward_kwargs: Mapping[str, Any] | None = None,
) -> InputLike | tuple[InputLike, Tensor]:
    """Integrated Gradients. Returns the structure and shape of ``x`` (a tensor ``[B, ...]`` or a tuple
    of them, one map per input), and ``[B]`` with ``return_delta``.

    Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep Networks", ICML 2017:
    ``(x - x') * integral_0^1 dF(x' + alpha (x - x'))/dx dalpha``, with ``x'`` the ``baseline`` (a number,
    a tensor broadcastable to ``x``, or for a tuple ``x`` a tuple with one of them per input) and the
    integral taken by ``rule`` with ``steps`` nodes (:func:`quadrature`: Captum's conventions, so the
    result equals Captum's ``IntegratedGradients(n_steps=steps, method=rule)`` — but for
    ``"riemann_trapezoid"``, whose Captum weights sum to ``1 - 1/steps``). Every input moves along its
    own path with the same ``alpha``. The ``steps * B`` path points go through the model in batches of
    at most ``batch_size`` (default: as :func:`torchvis.methods.perturbation.default_batch_size`
    chooses for one example of all inputs), one forward and one ``torch.autograd.grad`` each; every
    point explains the target of its example, resolved once on ``x``. ``model`` may be any callable;
    ``forward_args``/``forward_kwargs`` go with every call, a per-example tensor (first dimension
    ``B``) taken at each point's example (see :mod:`torchvis.core.inputs`). With ``return_delta``,
    also the completeness gap ``sum(IG) - (F(x) - F(x'))`` per example, the sum over all inputs.
    """
    inputs = as_inputs(x, forward_args, forward_kwargs)
    check_model(model)
    nodes, weights = quadrature(rule, steps)
    batch_size = batch_size_for(inputs, batch_size)
    xs = [t.detach() for t in inputs.tensors]
    starts = fills(baseline, inputs)
    # One forward pass of x (and of the baseline, for the gap) resolves the target for every step; a
    # given target needs none unless the gap is asked for.
    targets = None if return_delta else given_target(target, inputs.batch)
    if targets is None:
        targets, score, far = target_pass(model, inputs, target, eval_mode=eval_mode,
                                          also=[starts] if return_delta else [])
    batch = inputs.batch
    paths = [t - start for t, start in zip(xs, starts, strict=True)]
    totals = [torch.zeros_like(t) for t in xs]
    # Flat index k = step * B + example: a batch holds consecutive steps of consecutive examples.
    # The quadrature's nodes and weights in each input's dtype, built once (not per batch).
    node_values = [torch.tensor(nodes, dtype=t.dtype, device=t.device) for t in xs]
    weight_values = [torch.tensor(weights, dtype=t.dtype, device=t.device) for t in xs]
    flat = torch.arange(steps * batch, device=inputs.device)
    for lo in range(0, steps * batch, batch_size):
        step, example = flat[lo : lo + batch_size] // batch, flat[lo : lo + batch_size] % batch
        points = [start[example] + alphas[step].view(_column(t)) * path[example]
                  for t, start, path, alphas in zip(xs, starts, paths, node_values, strict=True)]
        with one_host_read():  # the batch's target and finiteness checks: one host read
            grads = gradient_pass(model, inputs.take(example, points), take_target(targets, example),
                                  input_grad=True, eval_mode=eval_mode)
        assert grads.input_grads is not None
        for t, total, grad, scales in zip(xs, totals, grads.input_grads, weight_values, strict=True):
            total.index_add_(0, example, grad * scales[step].view(_column(t)))
    attributions = [path * total for path, total in zip(paths, totals, strict=True)]
    packed = inputs.pack(attributions)
    if not return_delta:
        return packed
    summed = sum(a.flatten(1).sum(dim=1) for a in attributions)
    return packed, summed - (score - far[0])


def _column(t: Tensor) -> tuple[int, ...]:
    return (-1,) + (1,) * (t.dim() - 1)


register("integrated_gradients", integrated_gradients, needs=Need.OWN, look=Look.SIGNED,
         title="integrated gradients")
