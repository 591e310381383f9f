"""Every kind of input on tiny hand-weighted models, where the answer is known: tabular [B,N], signals
[B,C,L], volumes [B,C,D,H,W], two inputs, extra forward arguments (per example and shared), plain
functions as the model; hook methods refuse plain functions; CAMs take tuples and forward_args."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import torchvis
from torchvis.methods import METHODS, SPECS
from torchvis.methods.path import RULES
from torchvis.targets import class_logit

SHAPES = {"tabular": [(7,)], "signal": [(2, 9)], "volume": [(1, 3, 4, 4)], "two-input": [(3, 4, 4), (5,)]}
BATCH = 3


def draw(seed: int, *shape: int) -> Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


class Linear(nn.Module):
    """``logits[b, k] = sum_i <W_i[k], x_i[b]> + bias[k]`` over the inputs ``x_i``."""

    def __init__(self, weights: list[Tensor]) -> None:
        super().__init__()
        self.weights = nn.ParameterList([nn.Parameter(w) for w in weights])
        self.bias = nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))

    def forward(self, *xs: Tensor) -> Tensor:
        return sum((x.flatten(1) @ w.flatten(1).T for x, w in zip(xs, self.weights, strict=True)),
                   self.bias)  # type: ignore[return-value]


def linear_case(kind: str) -> tuple[Linear, list[Tensor], list[Tensor]]:
    shapes = SHAPES[kind]
    weights = [draw(10 + i, 3, *s) for i, s in enumerate(shapes)]
    xs = [draw(20 + i, BATCH, *s) for i, s in enumerate(shapes)]
    return Linear(weights), weights, xs


def as_x(xs: list[Tensor]) -> Any:
    return tuple(xs) if len(xs) > 1 else xs[0]


def maps_of(result: Any) -> tuple[Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


TARGET = [2, 0, 1]


@pytest.mark.parametrize("as_function", [False, True], ids=["module", "function"])
@pytest.mark.parametrize("kind", list(SHAPES))
def test_linear_model_closed_forms(kind: str, as_function: bool) -> None:
    """saliency = w, gradient x input = w * x, integrated gradients from 0 = w * x for every rule (its
    gap 0), SmoothGrad of saliency = w and VarGrad = 0 (a constant gradient) — with the module or a
    plain function wrapping it."""
    module, weights, xs = linear_case(kind)
    model = (lambda *args: module(*args)) if as_function else module
    x = as_x(xs)
    rows = torch.tensor(TARGET)
    w_rows = [w[rows] for w in weights]
    checks: dict[str, list[Tensor]] = {
        "saliency": w_rows,
        "gradient_x_input": [w * t for w, t in zip(w_rows, xs, strict=True)],
    }
    for name, expected in checks.items():
        for got, want in zip(maps_of(METHODS[name](model, x, TARGET)), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    for rule in RULES:
        got, delta = torchvis.integrated_gradients(model, x, TARGET, rule=rule, steps=3, return_delta=True)
        for g, w, t in zip(maps_of(got), w_rows, xs, strict=True):
            torch.testing.assert_close(g, w * t, rtol=1e-13, atol=1e-14)
        assert delta.shape == (BATCH,) and float(delta.abs().max()) < 1e-12
    for got, want in zip(maps_of(torchvis.smoothgrad(model, x, TARGET, samples=3)), w_rows, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-15)
    for got in maps_of(torchvis.vargrad(model, x, TARGET, samples=3)):
        assert float(got.abs().max()) < 1e-28


def test_integrated_gradients_with_a_baseline_per_input() -> None:
    """A linear model's IG from x' is w * (x - x') for each input, with a number for one input and a
    broadcast tensor for the other; the gap is 0."""
    module, weights, (image, meta) = linear_case("two-input")
    image_base, meta_base = 0.25, draw(3, 1, 5)
    got, delta = torchvis.integrated_gradients(module, (image, meta), 1, baseline=(image_base, meta_base),
                                               steps=2, return_delta=True)
    torch.testing.assert_close(got[0], weights[0][1] * (image - image_base), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(got[1], weights[1][1] * (meta - meta_base), rtol=1e-13, atol=1e-14)
    assert float(delta.abs().max()) < 1e-12
    one_number = torchvis.integrated_gradients(module, (image, meta), 1, baseline=0.25, steps=2)
    torch.testing.assert_close(one_number[1], weights[1][1] * (meta - 0.25), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize(
    "baseline, error, match",
    [((0.0,), TypeError, "1 entries for 2 inputs"), ([0.0, 0.0], TypeError, "a tuple, not a list"),
     (torch.zeros(1, 3, 4, 4), TypeError, "give the baselines as a tuple"),
     ((0.0, torch.zeros(2, 5)), ValueError, r"does not broadcast to x\[1\]'s shape \[3, 5\]"),
     ((0.0, "zero"), TypeError, "number or a tensor")],
)
def test_bad_baselines(baseline: Any, error: type[Exception], match: str) -> None:
    module, _, xs = linear_case("two-input")
    with pytest.raises(error, match=match):
        torchvis.integrated_gradients(module, tuple(xs), 0, baseline=baseline)


class Gated(nn.Module):
    """A linear model of ``x`` gated per example by ``mask`` ``[B, N]`` and scaled by a shared ``scale``
    (a number, a 0-d tensor or a ``[1, N]`` tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(draw(1, 3, 6))

    def forward(self, x: Tensor, mask: Tensor, scale: Any = 1.0, *, shift: Tensor | None = None) -> Tensor:
        out = (x * mask * scale) @ self.weight.T
        return out if shift is None else out + shift


@pytest.mark.parametrize("scale", [2.0, torch.tensor(2.0), torch.full((1, 6), 2.0, dtype=torch.float64)],
                         ids=["number", "0-d", "first-dim-1"])
@pytest.mark.parametrize("method", ["saliency", "gradient_x_input", "integrated_gradients", "smoothgrad"])
def test_per_example_and_shared_forward_arguments(method: str, scale: Any) -> None:
    """Gradient of a gated linear model: ``w * mask * scale`` — the mask taken at each row's example in
    the enlarged batches of IG (batches splitting examples) and SmoothGrad, the shared scale as it is."""
    model, x = Gated().eval(), draw(2, 4, 6)
    mask = (draw(3, 4, 6) > 0).double()
    shift = draw(4, 4, 3)  # per example, by keyword
    options: dict[str, Any] = {"integrated_gradients": {"steps": 3, "batch_size": 5},
                               "smoothgrad": {"samples": 3, "batch_size": 5}}.get(method, {})
    got = METHODS[method](model, x, [0, 2, 1, 2], forward_args=(mask, scale), forward_kwargs={"shift": shift},
                          **options)
    gradient = model.weight.detach()[[0, 2, 1, 2]] * mask * 2.0
    expected = gradient * x if method in ("gradient_x_input", "integrated_gradients") else gradient
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-14)


def test_smoothgrad_noise_is_per_example_and_per_input() -> None:
    """The copies the model sees: x_i + noise * (max - min of x_i[b]) * eps, eps the seeded generator's
    draws, input after input, sample after sample."""
    seen: list[tuple[Tensor, Tensor]] = []

    def model(image: Tensor, meta: Tensor) -> Tensor:
        seen.append((image.detach().clone(), meta.detach().clone()))
        return image.flatten(1).sum(dim=1, keepdim=True) * meta.sum(dim=1, keepdim=True).expand(-1, 2)

    image = draw(0, 2, 1, 3, 3) * torch.tensor([1.0, 100.0], dtype=torch.float64).view(2, 1, 1, 1)
    meta = draw(1, 2, 4) * 0.01
    torchvis.smoothgrad(model, (image, meta), 0, samples=2, noise=0.1, seed=3, batch_size=4)
    # A given target needs no clean pass: the model sees the noisy copies only.
    noisy_image = torch.cat([s[0] for s in seen])
    noisy_meta = torch.cat([s[1] for s in seen])
    generator = torch.Generator().manual_seed(3)
    expected_image, expected_meta = [], []
    for _ in range(2):
        for t, out in ((image, expected_image), (meta, expected_meta)):
            sigma = 0.1 * (t.flatten(1).amax(dim=1) - t.flatten(1).amin(dim=1))
            eps = torch.randn(t.shape, generator=generator, dtype=t.dtype)
            out.append(t + sigma.view(-1, *([1] * (t.dim() - 1))) * eps)
    torch.testing.assert_close(noisy_image, torch.cat(expected_image), rtol=0, atol=0)
    torch.testing.assert_close(noisy_meta, torch.cat(expected_meta), rtol=0, atol=0)


# --- plain functions and hook methods --------------------------------------------------------------


HOOK_METHODS = [name for name, spec in SPECS.items() if spec.needs_hooks]


@pytest.mark.parametrize("name", HOOK_METHODS)
def test_hook_methods_refuse_a_plain_function(name: str) -> None:
    from conftest import SmallCNN, options_for

    module = SmallCNN().double().eval()
    calls = []

    def model(x: Tensor) -> Tensor:
        calls.append(1)
        return module(x)

    with pytest.raises(TypeError, match=r"needs an nn.Module.*plain function"):
        METHODS[name](model, draw(0, 2, 3, 8, 8), **options_for(name, layer="conv2"))
    assert calls == []


@pytest.mark.parametrize("method", ["guided_backprop", "grad_cam"])
def test_smoothgrad_of_a_hook_method_refuses_a_plain_function_before_any_call(method: str) -> None:
    calls = []

    def model(x: Tensor) -> Tensor:
        calls.append(1)
        return x.flatten(1)

    options = {"layer": "conv"} if method == "grad_cam" else {}
    with pytest.raises(TypeError, match=f"{method} needs an nn.Module"):
        torchvis.smoothgrad(model, draw(0, 2, 3), method=method, **options)
    assert calls == []


def test_smoothgrad_refuses_forward_args_for_a_method_that_takes_none() -> None:
    def plain_gradient(model: Any, x: Tensor, target: Any = None) -> Tensor:
        return torchvis.saliency(model, x, target)

    with pytest.raises(TypeError, match="takes no forward_args"):
        torchvis.smoothgrad(nn.Linear(3, 2).double(), draw(0, 2, 3), method=plain_gradient,
                            forward_args=(torch.ones(2),))


# --- CAMs over several inputs ----------------------------------------------------------------------


class ImageAndMeta(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.meta = nn.Linear(5, 4)
        self.head = nn.Linear(8, 3)

    def forward(self, image: Tensor, meta: Tensor, mask: Tensor | None = None) -> Tensor:
        meta = meta if mask is None else meta * mask
        features = self.pool(self.relu(self.conv(image))).flatten(1)
        return self.head(torch.cat([features, torch.relu(self.meta(meta))], dim=1))


class MetaAsArgument(nn.Module):
    def __init__(self, inner: ImageAndMeta) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, image: Tensor, meta: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.inner(image, meta, mask)


CAMS = ["grad_cam", "grad_cam_pp", "xgrad_cam", "layer_cam", "hires_cam", "guided_grad_cam"]


@pytest.mark.parametrize("name", CAMS)
def test_cams_on_a_tuple_are_drawn_over_the_first_input(name: str) -> None:
    """A CAM of (image, meta) equals the CAM of the image with meta passed as a forward argument, and
    a callable target equals the class index; it has the first input's spatial size."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ImageAndMeta().double().eval()
    wrapped = MetaAsArgument(model).eval()
    image, meta, mask = draw(0, 2, 3, 6, 6), draw(1, 2, 5), (draw(2, 2, 5) > 0).double()
    got = METHODS[name](model, (image, meta), [1, 2], layer="relu", forward_args=(mask,))
    assert isinstance(got, Tensor) and got.shape[0] == 2 and got.shape[2:] == (6, 6)
    same = METHODS[name](wrapped, image, [1, 2], layer="inner.relu", forward_args=(meta, mask))
    torch.testing.assert_close(got, same, rtol=0, atol=0)
    by_callable = METHODS[name](model, (image, meta), lambda out: out[:, 1], layer="relu",
                                forward_kwargs={"mask": mask})
    by_index = METHODS[name](model, (image, meta), 1, layer="relu", forward_kwargs={"mask": mask})
    torch.testing.assert_close(by_callable, by_index, rtol=0, atol=0)
    assert got.abs().sum() > 0


def test_smoothgrad_of_grad_cam_on_a_tuple() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ImageAndMeta().double().eval()
    image, meta = draw(0, 2, 3, 6, 6), draw(1, 2, 5)
    got = torchvis.smoothgrad(model, (image, meta), 1, method="grad_cam", layer="relu", samples=3, noise=0.0)
    torch.testing.assert_close(got, torchvis.grad_cam(model, (image, meta), 1, layer="relu"), rtol=0, atol=0)
    noisy = torchvis.smoothgrad(model, (image, meta), class_logit(1), method="grad_cam", layer="relu",
                                samples=3)
    assert isinstance(noisy, Tensor) and noisy.shape == (2, 1, 6, 6) and noisy.abs().sum() > 0


def test_explain_on_two_inputs_with_forward_args() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ImageAndMeta().double().eval()
    image, meta, mask = draw(0, 2, 3, 6, 6), draw(1, 2, 5), (draw(2, 2, 5) > 0).double()
    x, extra = (image, meta), {"forward_args": (mask,)}
    got = torchvis.explain(model, x, [0, 2], methods=["saliency", "grad_cam", "integrated_gradients",
                                                       "smoothgrad", "guided_backprop"], layer="relu",
                           steps=3, samples=2, **extra)
    own = {"integrated_gradients": {"steps": 3}, "smoothgrad": {"samples": 2}}
    for name in ("saliency", "integrated_gradients", "smoothgrad", "guided_backprop"):
        alone = METHODS[name](model, x, [0, 2], **extra, **own.get(name, {}))
        assert isinstance(got[name], tuple) and len(got[name]) == 2
        for mine, theirs in zip(got[name], alone, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    torch.testing.assert_close(got["grad_cam"], torchvis.grad_cam(model, x, [0, 2], layer="relu", **extra))


@pytest.mark.parametrize("method", ["integrated_gradients", "occlusion"])
def test_baselines_mean_the_same_to_every_method(method: str) -> None:
    """One reading of ``baseline`` (core.inputs.fills): a 0-d tensor is a number, a list or a tensor for
    a tuple of inputs is refused, NaN is refused."""
    module, _, xs = linear_case("two-input")
    x = tuple(xs)
    options: dict[str, Any] = {"window": 1} if method == "occlusion" else {}
    run = METHODS[method]
    as_number = run(module, x, 0, baseline=0.5, **options)
    as_tensor = run(module, x, 0, baseline=torch.tensor(0.5, dtype=xs[0].dtype), **options)
    for a, b in zip(as_number, as_tensor, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    bad_ones = (([0.0, 0.0], "a tuple, not a list"), (torch.zeros(3, 4), "give the baselines as a tuple"),
                ((0.0, math.nan), "NaN or Inf"))
    for bad, match in bad_ones:
        with pytest.raises((TypeError, ValueError), match=match):
            run(module, x, 0, baseline=bad, **options)
