"""SmoothGrad and VarGrad: any gradient method averaged (or its variance taken) over noisy copies of
the input. *How* the gradient is taken (plain, guided, Grad-CAM, integrated) is the wrapped method's
choice; *how* it is aggregated is this module's."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from torchvis.core.forward import Target, check_finite, check_input, checked_logits, guarded, resolve_target
from torchvis.methods.perturbation import default_batch_size
from torchvis.methods.spec import Look, MethodSpec, Need, register, spec_of

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
    x: Tensor, sigma: Tensor, samples: int, seed: int, batch_size: int
) -> Iterator[tuple[int, Tensor]]:
    """``(first flat index, x + sigma * eps)`` in batches of ``batch_size``, flat index
    ``k = sample * B + example``. Sample ``s``'s noise is the ``s``-th ``torch.randn(x.shape)`` of a
    generator on ``x``'s device seeded with ``seed``: the same whatever ``batch_size``, and at most one
    sample's noise beyond a batch held at a time."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    pending: list[Tensor] = []
    held, first = 0, 0
    for _ in range(samples):
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        pending.append(x + sigma * eps)
        held += x.shape[0]
        while held >= batch_size:
            rows = torch.cat(pending)
            yield first, rows[:batch_size]
            pending, held, first = [rows[batch_size:]], held - batch_size, first + batch_size
    if held:
        yield first, torch.cat(pending)


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
    model: nn.Module,
    x: Tensor,
    target: Target,
    *,
    method: str | Callable[..., Tensor] | MethodSpec,
    samples: int,
    noise: float,
    seed: int,
    batch_size: int | None,
    eval_mode: bool,
    options: dict[str, Any],
) -> tuple[Tensor, Tensor | None]:
    """The mean over ``samples`` noisy copies of ``method``'s map and their population variance
    (``None`` when ``noise == 0``: every copy is ``x``, and the mean is one call of ``method``)."""
    x = check_input(x).detach()
    spec = wrapped_spec(method, options)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1; got {samples!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise ValueError(f"noise must be a number >= 0 (a fraction of each example's range); got {noise!r}")
    if batch_size is None:
        batch_size = default_batch_size(x)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
    if "eval_mode" in spec.parameters:
        options = {**options, "eval_mode": eval_mode}
    if noise == 0:
        return spec.function(model, x, target, **options), None
    batch = x.shape[0]
    # The class explained is the one of the clean input, the same for every noisy copy.
    with guarded(model, x, eval_mode=eval_mode, grad=False), torch.no_grad():
        logits = checked_logits(model(x.clone()), batch)  # a model may change its input in place
        check_finite(logits)
        t = resolve_target(target, logits)
    dims = tuple(range(1, x.dim()))
    sigma = noise * (x.amax(dim=dims, keepdim=True) - x.amin(dim=dims, keepdim=True))
    moments, targets = _Moments(batch), t.repeat(samples)
    for lo, noisy in noisy_batches(x, sigma, samples, seed, batch_size):
        maps = spec.function(model, noisy, targets[lo : lo + noisy.shape[0]], **options)
        k, hi = lo, lo + noisy.shape[0]
        while k < hi:  # the rows of one sample are consecutive examples
            sample, first = divmod(k, batch)
            stop = min(hi, (sample + 1) * batch)
            moments.add(slice(first, first + stop - k), maps[k - lo : stop - lo], sample + 1)
            k = stop
    return moments.mean, moments.m2 / samples


def smoothgrad(
    model: nn.Module,
    x: Tensor,
    target: Target = None,
    *,
    method: str = "saliency",
    samples: int = 25,
    noise: float = 0.15,
    seed: int = 0,
    batch_size: int | None = None,
    eval_mode: bool = True,
    **options: Any,
) -> Tensor:
    """SmoothGrad: the mean of ``method`` over noisy copies of ``x``. Returns ``method``'s shape.

    Smilkov, Thorat, Kim, Viégas & Wattenberg, "SmoothGrad: removing noise by adding noise",
    ICML-W 2017: the mean of ``method`` over ``samples`` inputs ``x + eps``, ``eps ~ N(0, sigma^2)``
    with ``sigma = noise * (max(x_i) - min(x_i))`` per example (the paper's noise level; Captum's
    ``stdevs`` is an absolute sigma). ``method`` is any gradient method by name (``"saliency"``,
    ``"guided_backprop"``, ``"grad_cam"``, ``"integrated_gradients"``, a registered one), ``options``
    go to it (e.g. ``layer=``); every copy explains the class of the clean ``x``. The noise comes from
    a generator seeded with ``seed`` (see :func:`noisy_batches`), never the global RNG: the same seed
    gives the same map. The ``samples * B`` noisy inputs go to ``method`` in batches of at most
    ``batch_size`` (default as :func:`torchvis.methods.perturbation.default_batch_size`). ``noise=0``
    is ``method`` itself.
    """
    mean, _ = _smoothed(model, x, target, method=method, samples=samples, noise=noise, seed=seed,
                        batch_size=batch_size, eval_mode=eval_mode, options=options)
    return mean


def vargrad(
    model: nn.Module,
    x: Tensor,
    target: Target = None,
    *,
    method: str = "saliency",
    samples: int = 25,
    noise: float = 0.15,
    seed: int = 0,
    batch_size: int | None = None,
    eval_mode: bool = True,
    **options: Any,
) -> Tensor:
    """VarGrad: the variance of ``method`` over noisy copies of ``x``. Returns ``method``'s shape.

    Adebayo, Gilmer, Goodfellow & Kim, "Local Explanation Methods for Deep Neural Networks Lack
    Sensitivity to Parameter Values", ICLR-W 2018: as :func:`smoothgrad`, but the population variance
    (divided by ``samples``, as Captum's NoiseTunnel) instead of the mean; 0 for ``noise=0``.
    """
    mean, variance = _smoothed(model, x, target, method=method, samples=samples, noise=noise, seed=seed,
                               batch_size=batch_size, eval_mode=eval_mode, options=options)
    return torch.zeros_like(mean) if variance is None else variance


register("smoothgrad", smoothgrad, needs=Need.OWN, look=Look.SIGNED, title="SmoothGrad")
register("vargrad", vargrad, needs=Need.OWN, look=Look.HEAT_OVERLAY, title="VarGrad")
