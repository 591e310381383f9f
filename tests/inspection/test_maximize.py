"""Activation maximization: closed-form optima, rising activations, hygiene, errors."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from torchvis.apps.digits import MNIST_MEAN, MNIST_STD, DigitsCNN
from torchvis.inspection.activation_maximization import (
    Channel,
    Logit,
    Param,
    Unit,
    maximize,
    parse_unit,
    to_images,
    unit_activations,
)


def linear_model(shape: tuple[int, int, int], classes: int = 3, seed: int = 1) -> tuple[nn.Module, Tensor]:
    """``Flatten -> Linear`` in float64 and its weight ``[classes, C*H*W]`` (detached)."""
    n = shape[0] * shape[1] * shape[2]
    linear = nn.Linear(n, classes).double()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        linear.weight.copy_(0.1 * torch.randn(classes, n, generator=g, dtype=torch.float64))
        linear.bias.copy_(torch.randn(classes, generator=g, dtype=torch.float64))
    return nn.Sequential(nn.Flatten(), linear), linear.weight.detach()


def two_convs(seed: int = 0) -> nn.Sequential:
    """Two convs, weights from a private generator; conv1's biases positive so that its ReLUs are
    alive at the near-zero start image."""
    conv1 = nn.Conv2d(1, 3, 3)
    model = nn.Sequential(conv1, nn.ReLU(), nn.Conv2d(3, 4, 3))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        assert conv1.bias is not None
        conv1.bias.abs_()
    return model


# --- closed forms ------------------------------------------------------------------------------


@pytest.mark.parametrize("param", ["pixel", "fourier"])
def test_linear_unit_under_l2_converges_to_weight_direction(param: Param) -> None:
    # max_x w.x + b - l2 * mean(x**2)  =>  x* = N w / (2 l2); both parameterisations reach it.
    shape = (2, 5, 6)
    n, l2 = 60, 5.0
    model, weight = linear_model(shape)
    x = maximize(model, [Logit(0), Logit(2)], shape=shape, steps=200, lr=0.05, l2=l2, tv=0.0,
                 jitter=0, param=param)
    assert x.shape == (2, *shape) and x.dtype == torch.float64
    for row, k in enumerate([0, 2]):
        optimum = n * weight[k] / (2 * l2)
        got = x[row].flatten()
        assert torch.cosine_similarity(got, optimum, dim=0) > 1 - 1e-8
        assert got.norm() / optimum.norm() == pytest.approx(1, abs=1e-4)


def test_linear_unit_under_tv_solves_the_quadratic() -> None:
    # TV = sum over vertical pairs of (a-b)^2 / n_vertical + the same horizontally, built here pair by pair.
    c, h, w = 1, 4, 5
    n, l2, tv = c * h * w, 2.0, 3.0
    model, weights = linear_model((c, h, w))
    index = torch.arange(n).view(c, h, w)
    hessian = torch.zeros(n, n, dtype=torch.float64)
    for pairs in (
        list(zip(index[:, 1:].flatten().tolist(), index[:, :-1].flatten().tolist(), strict=True)),
        list(zip(index[:, :, 1:].flatten().tolist(), index[:, :, :-1].flatten().tolist(), strict=True)),
    ):
        for i, j in pairs:
            d = torch.zeros(n, dtype=torch.float64)
            d[i], d[j] = 1, -1
            hessian += 2 * torch.outer(d, d) / len(pairs)
    # Gradient zero: w - 2 l2 / n x - tv H x = 0.
    expected = torch.linalg.solve(2 * l2 / n * torch.eye(n, dtype=torch.float64) + tv * hessian, weights[1])
    x = maximize(model, Logit(1), shape=(c, h, w), steps=300, lr=0.05, l2=l2, tv=tv, jitter=0)
    torch.testing.assert_close(x[0].flatten(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_unit_activations_match_a_direct_computation() -> None:
    model = nn.Sequential(*two_convs()[:2], nn.Flatten(), nn.Linear(48, 3))
    x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    got = unit_activations(model, [Channel("0", 1), Channel(model[1], 2), Logit(2), Channel("3", 0)], x)
    with torch.no_grad():
        conv = model[0](x)
        logits = model(x)
    expected = torch.stack([conv[:, 1].mean((1, 2)), conv[:, 2].relu().mean((1, 2)), logits[:, 2],
                            logits[:, 0]], dim=1)
    torch.testing.assert_close(got, expected)


# --- the digits CNN: rising units, each row its own unit, hygiene -------------------------------

UNITS: list[Unit] = [Logit(3), Logit(7), Channel("conv2", 5), Channel("conv2", 9)]


@dataclass
class Run:
    start: Tensor  # [U,U]: unit (column) on start image (row)
    end: Tensor
    noise_std: Tensor  # [U]: each unit's spread over 64 uniform-random pictures
    x: Tensor
    model: DigitsCNN
    sentinel: Tensor
    rng_before: Tensor
    rng_after: Tensor


@pytest.fixture(scope="module")
def run() -> Run:
    model = DigitsCNN(generator=torch.Generator().manual_seed(0))
    model.train()
    model.dropout1.eval()  # a mixed state that must survive
    sentinel = torch.full_like(model.conv1.weight, 7.0)
    model.conv1.weight.grad = sentinel.clone()
    rng_before = torch.get_rng_state()
    x0, x = (maximize(model, UNITS, shape=(1, 28, 28), steps=steps, l2=0.01, tv=0.01, mean=MNIST_MEAN,
                      std=MNIST_STD) for steps in (0, 30))
    rng_after = torch.get_rng_state()
    noise = (torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(1)) - MNIST_MEAN) / MNIST_STD
    return Run(
        start=unit_activations(model, UNITS, x0),
        end=unit_activations(model, UNITS, x),
        noise_std=unit_activations(model, UNITS, noise).std(dim=0),
        x=x,
        model=model,
        sentinel=sentinel,
        rng_before=rng_before,
        rng_after=rng_after,
    )


def test_every_unit_rises_well_above_its_start(run: Run) -> None:
    rise = run.end.diagonal() - run.start.diagonal()
    # At least 10 standard deviations of what random pictures do to the unit.
    assert (rise > 10 * run.noise_std).all(), (rise, run.noise_std)


def test_each_row_maximises_its_own_unit(run: Run) -> None:
    for u in range(len(UNITS)):
        others = torch.cat([run.end[:u, u], run.end[u + 1 :, u]])
        assert (run.end[u, u] > others).all(), run.end


def test_pictures_stay_in_the_input_range(run: Run) -> None:
    picture = run.x * MNIST_STD + MNIST_MEAN  # no clamp: the sigmoid keeps it in [0, 1]
    assert picture.min() >= 0 and picture.max() <= 1
    assert picture.max() - picture.min() > 0.5  # a picture, not the grey start
    torch.testing.assert_close(to_images(run.x, MNIST_MEAN, MNIST_STD), picture)


def test_model_left_as_it_was(run: Run) -> None:
    model = run.model
    assert model.training and model.conv2.training and not model.dropout1.training
    assert torch.equal(model.conv1.weight.grad, run.sentinel)  # type: ignore[arg-type]
    assert all(p.grad is None for name, p in model.named_parameters() if name != "conv1.weight")
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
    assert torch.equal(run.rng_before, run.rng_after)
    fresh = DigitsCNN(generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True))


def test_channel_before_an_inplace_relu(small_cnn: Callable[[int], nn.Module]) -> None:
    # conftest's SmallCNN: conv1 -> ReLU(inplace=True); the unit is the conv output, before the ReLU.
    model = small_cnn(0)
    units = [Channel("conv1", 2), Channel("conv1", 4)]
    x0, x = (maximize(model, units, shape=(3, 8, 8), steps=steps) for steps in (0, 20))
    start, end = unit_activations(model, units, x0), unit_activations(model, units, x)
    conv1 = model.get_submodule("conv1")
    with torch.no_grad():
        conv = conv1(x0)
    torch.testing.assert_close(start[:, 0], conv[:, 2].mean((1, 2)))
    assert (start < 0).any()  # a ReLU'd value would be >= 0
    assert (end.diagonal() > start.diagonal() + 0.5).all(), (start, end)


def test_optimises_in_eval_mode() -> None:
    class ModeSpy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[bool] = []

        def forward(self, x: Tensor) -> Tensor:
            self.seen.append(self.training)
            return x

    spy = ModeSpy()
    model = nn.Sequential(two_convs(), spy).train()
    maximize(model, Channel("0.2", 0), shape=(1, 8, 8), steps=3)
    assert spy.seen == [False] * 3 and model.training and spy.training


def test_same_seed_same_image_other_seed_other_image() -> None:
    model = two_convs()
    units = [Channel("2", 0), Channel("2", 3)]
    state = torch.get_rng_state()
    a, b, c = (maximize(model, units, shape=(1, 9, 9), steps=10, jitter=2, seed=seed) for seed in (5, 5, 6))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.equal(torch.get_rng_state(), state)


def test_blur_and_fourier_also_raise_the_unit() -> None:
    model = two_convs()
    unit = Channel("2", 1)
    start = unit_activations(model, unit, maximize(model, unit, shape=(1, 12, 12), steps=0))
    noise = torch.randn(64, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    noise_std = unit_activations(model, unit, noise).std()
    param: Param
    for param, blur_every in (("pixel", 4), ("fourier", 0)):
        x = maximize(model, unit, shape=(1, 12, 12), steps=30, l2=0.01, tv=0.01, param=param,
                     blur_every=blur_every)
        rise = unit_activations(model, unit, x) - start
        assert rise > 3 * noise_std, (param, rise, noise_std)


def blur_by_hand(x: Tensor, sigma: float) -> Tensor:
    """A Gaussian cut at ``ceil(2 sigma)`` pixels, mirrored at the borders, pixel by pixel."""
    radius = max(1, math.ceil(2 * sigma))
    taps = {d: math.exp(-d * d / (2 * sigma * sigma)) for d in range(-radius, radius + 1)}
    norm = sum(taps.values()) ** 2
    h, w = x.shape[-2:]

    def mirror(i: int, n: int) -> int:
        return -i if i < 0 else 2 * (n - 1) - i if i >= n else i

    out = torch.zeros_like(x)
    for i in range(h):
        for j in range(w):
            for a, ka in taps.items():
                for b, kb in taps.items():
                    out[..., i, j] += ka * kb / norm * x[..., mirror(i + a, h), mirror(j + b, w)]
    return out


def test_one_adam_step_then_blur_by_hand() -> None:
    # Adam's first step moves every pixel by lr * g / (|g| + eps): bias-corrected, m = g and v = g*g.
    # A linear unit's gradient is its weight row. Then the blur.
    shape, lr, sigma = (2, 5, 6), 0.05, 0.8
    model, weight = linear_model(shape)
    start = maximize(model, Logit(1), shape=shape, steps=0)
    got = maximize(model, Logit(1), shape=shape, steps=1, lr=lr, l2=0.0, tv=0.0, jitter=0, blur_every=1,
                   blur_sigma=sigma)
    stepped = start + lr * (weight[1] / (weight[1].abs() + 1e-8)).view(1, *shape)
    torch.testing.assert_close(got, blur_by_hand(stepped, sigma), rtol=1e-6, atol=1e-9)


# --- errors ------------------------------------------------------------------------------------


def test_out_of_range_units_say_so_and_leave_no_trace() -> None:
    model = DigitsCNN(generator=torch.Generator().manual_seed(0)).train()
    with pytest.raises(ValueError, match=r"Logit\(index=10\) is out of range: the model has 10 outputs"):
        maximize(model, [Logit(1), Logit(10)], shape=(1, 28, 28), steps=5)
    with pytest.raises(ValueError, match=r"Channel\('conv2', 64\) is out of range: layer 'conv2' has 64"):
        maximize(model, Channel("conv2", 64), shape=(1, 28, 28), steps=0)
    with pytest.raises(ValueError, match="unknown layer 'conv3'.*'conv2'"):
        maximize(model, Channel("conv3", 0), shape=(1, 28, 28))
    assert all(m.training for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())


def test_bad_arguments() -> None:
    model, _ = linear_model((1, 2, 2))
    with pytest.raises(ValueError, match=">= 0"):
        Logit(-1)
    with pytest.raises(TypeError, match="int"):
        Channel("1", True)
    with pytest.raises(TypeError, match="parse_unit"):
        maximize(model, ["logit:0"], shape=(1, 2, 2))  # type: ignore[list-item]
    with pytest.raises(ValueError, match="no units"):
        maximize(model, [], shape=(1, 2, 2))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        maximize(model, Logit(0), shape=(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="param"):
        maximize(model, Logit(0), shape=(1, 2, 2), param="wavelet")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="blur_every"):
        maximize(model, Logit(0), shape=(1, 2, 2), param="fourier", blur_every=2)
    with pytest.raises(ValueError, match="both mean and std"):
        maximize(model, Logit(0), shape=(1, 2, 2), mean=0.5)
    with pytest.raises(ValueError, match="std entries must be positive"):
        maximize(model, Logit(0), shape=(1, 2, 2), mean=0.5, std=0.0)
    with pytest.raises(ValueError, match="mean needs one value per input channel \\(1\\); got 2"):
        maximize(model, Logit(0), shape=(1, 2, 2), mean=(0.5, 0.5), std=1.0)


def test_a_raising_model_leaves_no_hook_and_its_modes() -> None:
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)

        def forward(self, x: Tensor) -> Tensor:
            self.conv(x)
            raise RuntimeError("boom")

    model = Boom().train()
    with pytest.raises(RuntimeError, match="boom"):
        maximize(model, Channel("conv", 0), shape=(1, 3, 3), steps=3)
    assert model.training and model.conv.training
    assert not model.conv._forward_hooks and model.conv.weight.grad is None


def test_a_layer_that_runs_twice_is_refused() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(self.conv(x)).flatten(1)

    with pytest.raises(ValueError, match="runs 2 times"):
        maximize(Twice(), Channel("conv", 0), shape=(1, 3, 3), steps=1)


def test_parse_unit() -> None:
    assert parse_unit("logit:3") == Logit(3)
    assert parse_unit("layer4.1.conv2:12") == Channel("layer4.1.conv2", 12)
    for bad in ("conv2", "conv2:", ":3", "conv2:-1", "conv2:x"):
        with pytest.raises(ValueError, match="LAYER:N"):
            parse_unit(bad)


def test_to_images_without_normalisation_stretches_each_image() -> None:
    x = torch.tensor([[[[-2.0, 0.0], [1.0, 2.0]]], [[[3.0, 3.0], [3.0, 3.0]]]])
    expected = torch.tensor([[[[0.0, 0.5], [0.75, 1.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    torch.testing.assert_close(to_images(x), expected)
    torch.testing.assert_close(to_images(x, (0.5,), (0.25,)), (x * 0.25 + 0.5).clamp(0, 1))
