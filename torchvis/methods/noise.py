"""SmoothGrad and VarGrad: any gradient method averaged (or its variance taken) over noisy copies of
the input. *How* the gradient is taken (plain, guided, Grad-CAM, integrated) is the wrapped method's
choice; *how* it is aggregated is this module's."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from torchvis.core.inputs import InputLike, Model, as_inputs, check_model, check_module
from torchvis.core.passes import target_pass
from torchvis.core.targets import Target, given_target, take_target
from torchvis.methods.cam import check_cam_options
from torchvis.methods.perturbation import batch_size_for
from torchvis.methods.spec import Look, MethodSpec, Need, extra_arguments, register, spec_of

_OWN_ARGUMENTS = ("model", "x", "target")


def wrapped_spec(method: str | Callable[..., Tensor] | MethodSpec, options: dict[str, Any]) -> MethodSpec:
    """The spec of the gradient method to smooth; a method that takes no gradient, or an option it
    does not take, is an error."""
    spec = spec_of(method)
    if Need.PERTURBATION in spec.needs:
        raise ValueError(
            f"SmoothGrad and VarGrad average a gradient method; {spec.name!r} runs forward passes of "
            "changed inputs only — choose e.g. 'saliency', 'guided_backprop', 'grad_cam' or "
            "'integrated_gradients'"
        )
    unknown = [o for o in options if o not in spec.parameters or o in _OWN_ARGUMENTS]
    if unknown:
        takes = [p for p in spec.parameters if p not in _OWN_ARGUMENTS]
        raise TypeError(f"method {spec.name!r} takes no option(s) {unknown}; it takes {takes}")
    return spec


def noisy_batches(
    xs: Sequence[Tensor], sigmas: Sequence[Tensor], samples: int, seed: int, batch_size: int
) -> Iterator[tuple[int, list[Tensor]]]:
    """``(first flat index, [x + sigma * eps for each input])`` in batches of ``batch_size`` rows, flat
    index ``k = sample * B + example``. Sample ``s``'s noise is, input after input, the next
    ``torch.randn(x.shape)`` of one generator on the first input's device seeded with ``seed``: the
    same whatever ``batch_size``, and at most one sample's noise beyond a batch held at a time."""
    generator = torch.Generator(device=xs[0].device).manual_seed(seed)
    pending: list[list[Tensor]] = [[] for _ in xs]
    held, first, batch = 0, 0, xs[0].shape[0]
    for _ in range(samples):
        for rows, x, sigma in zip(pending, xs, sigmas, strict=True):
            eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            rows.append(x + sigma * eps)
        held += batch
        while held >= batch_size:
            joined = [torch.cat(rows) for rows in pending]
            yield first, [rows[:batch_size] for rows in joined]
            pending = [[rows[batch_size:]] for rows in joined]
            held, first = held - batch_size, first + batch_size
    if held:
        yield first, [torch.cat(rows) for rows in pending]


class _Moments:
    """Running mean and sum of squared deviations per example (Welford), fed sample by sample."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.mean = self.m2 = torch.zeros(())

    def add(self, rows: slice, values: Tensor, count: int) -> None:
        """Add sample number ``count`` (from 1) of the examples ``rows``; the first sets the mean
        exactly (``0 + v``)."""
        if self.mean.dim() == 0:
            self.mean = values.new_zeros((self.batch, *values.shape[1:]))
            self.m2 = torch.zeros_like(self.mean)
        delta = values - self.mean[rows]
        self.mean[rows] += delta / count
        self.m2[rows] += delta * (values - self.mean[rows])


def _smoothed(
    model: Model,
    x: InputLike,
    target: Target,
    *,
    method: str | Callable[..., Tensor] | MethodSpec,
    samples: int,
    noise: float,
    seed: int,
    batch_size: int | None,
    eval_mode: bool,
    forward_args: Any,
    forward_kwargs: Mapping[str, Any] | None,
    options: dict[str, Any],
) -> tuple[InputLike, InputLike | None]:
    """The mean over ``samples`` noisy copies of ``method``'s map(s) and their population variance
    (``None`` when ``noise == 0``: every copy is ``x``, and the mean is one call of ``method``)."""
    inputs = as_inputs(x, forward_args, forward_kwargs)
    spec = wrapped_spec(method, options)
    check_cam_options([spec], options, inputs.first)  # before the clean forward, not after it
    check_model(model)
    if spec.needs_hooks:
        check_module(model, spec.name)
    extra = extra_arguments(spec, forward_args, forward_kwargs)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1; got {samples!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise ValueError(f"noise must be a number >= 0 (a fraction of each example's range); got {noise!r}")
    batch_size = batch_size_for(inputs, batch_size)
    if "eval_mode" in spec.parameters:
        options = {**options, "eval_mode": eval_mode}
    if noise == 0:
        return spec.function(model, x, target, **options, **extra), None
    batch = inputs.batch
    # The target explained is the one of the clean input, the same for every noisy copy; a given one
    # needs no forward of the clean input.
    resolved = given_target(target, batch)
    if resolved is None:
        resolved, _, _ = target_pass(model, inputs, target, eval_mode=eval_mode)
    xs = [t.detach() for t in inputs.tensors]
    sigmas = []
    for t in xs:
        dims = tuple(range(1, t.dim()))
        sigmas.append(noise * (t.amax(dim=dims, keepdim=True) - t.amin(dim=dims, keepdim=True)))
    flat = torch.arange(samples * batch, device=inputs.device)
    moments: list[_Moments] = []
    single = True
    for lo, noisy in noisy_batches(xs, sigmas, samples, seed, batch_size):
        hi = lo + noisy[0].shape[0]
        rows = flat[lo:hi] % batch
        taken = inputs.take(rows, noisy)  # the per-example forward arguments at each copy's example
        at_rows = {key: getattr(taken, key) for key in extra}
        result = spec.function(model, inputs.pack(noisy), take_target(resolved, rows), **options, **at_rows)
        single = not isinstance(result, tuple)
        maps = (result,) if single else result
        moments = moments or [_Moments(batch) for _ in maps]
        k = lo
        while k < hi:  # the rows of one sample are consecutive examples
            sample, first = divmod(k, batch)
            stop = min(hi, (sample + 1) * batch)
            for moment, part in zip(moments, maps, strict=True):
                moment.add(slice(first, first + stop - k), part[k - lo : stop - lo], sample + 1)
            k = stop
    means = tuple(m.mean for m in moments)
    variances = tuple(m.m2 / samples for m in moments)
    return (means[0], variances[0]) if single else (means, variances)


def smoothgrad(
    model: Model,
    x: InputLike,
    target: Target = None,
    *,
    method: str = "saliency",
    samples: int = 25,
    noise: float = 0.15,
    seed: int = 0,
    batch_size: int | None = None,
    eval_mode: bool = True,
    forward_args: Any = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> InputLike:
    """SmoothGrad: the mean of ``method`` over noisy copies of ``x``. Returns ``method``'s structure and
    shape (for a tuple ``x``: a tuple, one map per input, for the input-gradient methods).

    Smilkov, Thorat, Kim, Viégas & Wattenberg, "SmoothGrad: removing noise by adding noise",
    ICML-W 2017: the mean of ``method`` over ``samples`` inputs ``x + eps``, ``eps ~ N(0, sigma^2)``
    with ``sigma = noise * (max(x_i) - min(x_i))`` per example and per input (the paper's noise level;
    Captum's ``stdevs`` is an absolute sigma). ``x`` is a tensor ``[B, ...]`` or a tuple of them, every
    input noised at once; ``model`` may be any callable when ``method`` needs no hook;
    ``forward_args``/``forward_kwargs`` go to ``method`` with each batch of copies, a per-example tensor
    (first dimension ``B``) taken at each copy's example (see :mod:`torchvis.core.inputs`).
    ``method`` is any gradient method by name (``"saliency"``, ``"guided_backprop"``, ``"grad_cam"``,
    ``"integrated_gradients"``, a registered one), ``options`` go to it (e.g. ``layer=``); every copy
    explains the target of the clean ``x`` (resolved once; a callable target scores every copy). The
    noise comes from a generator seeded with ``seed`` (see :func:`noisy_batches`), never the global
    RNG: the same seed gives the same map. The ``samples * B`` noisy inputs go to ``method`` in
    batches of at most ``batch_size`` (default as :func:`torchvis.methods.perturbation.
    default_batch_size`). ``noise=0`` is ``method`` itself.
    """
    mean, _ = _smoothed(model, x, target, method=method, samples=samples, noise=noise, seed=seed,
                        batch_size=batch_size, eval_mode=eval_mode, forward_args=forward_args,
                        forward_kwargs=forward_kwargs, options=options)
    return mean


def vargrad(
    model: Model,
    x: InputLike,
    target: Target = None,
    *,
    method: str = "saliency",
    samples: int = 25,
    noise: float = 0.15,
    seed: int = 0,
    batch_size: int | None = None,
    eval_mode: bool = True,
    forward_args: Any = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> InputLike:
    """VarGrad: the variance of ``method`` over noisy copies of ``x``. Returns ``method``'s shape.

    Adebayo, Gilmer, Goodfellow & Kim, "Local Explanation Methods for Deep Neural Networks Lack
    Sensitivity to Parameter Values", ICLR-W 2018: as :func:`smoothgrad`, but the population variance
    (divided by ``samples``, as Captum's NoiseTunnel) instead of the mean; 0 for ``noise=0``.
    """
    mean, variance = _smoothed(model, x, target, method=method, samples=samples, noise=noise, seed=seed,
                               batch_size=batch_size, eval_mode=eval_mode, forward_args=forward_args,
                               forward_kwargs=forward_kwargs, options=options)
    if variance is not None:
        return variance
    return tuple(torch.zeros_like(m) for m in mean) if isinstance(mean, tuple) else torch.zeros_like(mean)


register("smoothgrad", smoothgrad, needs=Need.OWN, look=Look.SIGNED, title="SmoothGrad", wraps="method")
register("vargrad", vargrad, needs=Need.OWN, look=Look.HEAT_OVERLAY, title="VarGrad", wraps="method")
