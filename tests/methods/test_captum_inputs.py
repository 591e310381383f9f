"""Saliency, guided backprop, gradient x input and integrated gradients against Captum in float64 on
the kinds of model Captum's own tests use — a tabular MLP [B,N], a Conv1d signal network [B,C,L], a
Conv3d volume network [B,C,D,H,W], an image + metadata model (two inputs) — each with a per-example
mask tensor and a shared flag passed as extra forward arguments (Captum's
``additional_forward_args``). SmoothGrad and VarGrad against a float64 per-sample reference (Captum's
NoiseTunnel draws other noise)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from captum.attr import GuidedBackprop, InputXGradient, IntegratedGradients, Saliency
from torch import Tensor, nn

import torchvis
from torchvis.methods import path
from torchvis.methods.path import RULES, quadrature


class Tabular(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: Tensor, mask: Tensor, scale: float = 1.0, negate: bool = False) -> Tensor:
        out = self.net(x * mask) * scale
        return -out if negate else out


class Signal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Conv1d(4, 5, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(5, 3),
        )

    def forward(self, x: Tensor, mask: Tensor, scale: float = 1.0, negate: bool = False) -> Tensor:
        out = self.net(x * mask) * scale
        return -out if negate else out


class Volume(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2), nn.Conv3d(3, 4, 3, padding=1),
            nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 3),
        )

    def forward(self, x: Tensor, mask: Tensor, scale: float = 1.0, negate: bool = False) -> Tensor:
        out = self.net(x * mask) * scale
        return -out if negate else out


class ImageAndMeta(nn.Module):
    """An image CNN and a metadata MLP whose features are concatenated before the head."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                   nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                   nn.Flatten())
        self.meta = nn.Sequential(nn.Linear(5, 4), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, image: Tensor, meta: Tensor, mask: Tensor, scale: float = 1.0,
                negate: bool = False) -> Tensor:
        out = self.head(torch.cat([self.image(image), self.meta(meta * mask)], dim=1)) * scale
        return -out if negate else out


def build(kind: str, seed: int = 0) -> tuple[nn.Module, tuple[Tensor, ...], Tensor]:
    """The model in float64 eval mode, its inputs (a tuple) and a per-example mask for the last one."""
    generator = torch.Generator().manual_seed(seed + 100)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, dtype=torch.float64, generator=generator)

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = {"tabular": Tabular, "signal": Signal, "volume": Volume, "two-input": ImageAndMeta}[kind]()
    batch = 3
    inputs = {
        "tabular": (randn(batch, 6),),
        "signal": (randn(batch, 2, 12),),
        "volume": (randn(batch, 1, 4, 6, 6),),
        "two-input": (randn(batch, 3, 8, 8), randn(batch, 5)),
    }[kind]
    mask = (torch.rand(inputs[-1].shape, generator=generator, dtype=torch.float64) > 0.3).double()
    return model.double().eval(), inputs, mask


KINDS = ["tabular", "signal", "volume", "two-input"]
TARGET = torch.tensor([2, 0, 1])


@pytest.fixture
def float64_default(default_dtype: torch.dtype) -> Iterator[None]:
    """Captum builds its Riemann nodes in the default dtype; in float64 both integrate at one set."""
    torch.set_default_dtype(torch.float64)
    yield


def ours_and_theirs(kind: str, seed: int = 0) -> tuple[nn.Module, Any, tuple[Any, ...], Any]:
    """model, x as the user passes it (a tensor for one input), the extra arguments, Captum's inputs."""
    model, inputs, mask = build(kind, seed)
    x = inputs if len(inputs) > 1 else inputs[0]
    return model, x, (mask, 1.5), inputs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method, captum", [("saliency", Saliency), ("guided_backprop", GuidedBackprop),
                                            ("gradient_x_input", InputXGradient)])
def test_input_gradient_methods_equal_captum(kind: str, method: str, captum: type) -> None:
    model, x, extra, inputs = ours_and_theirs(kind)
    options = {"abs": False} if captum is Saliency else {}
    theirs = captum(model).attribute(inputs, target=TARGET, additional_forward_args=extra, **options)
    got = torchvis.METHODS[method](model, x, TARGET, forward_args=extra)
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(theirs)
    for mine, their in zip(got, theirs, strict=True):
        assert mine.shape == their.shape
        torch.testing.assert_close(mine, their.detach(), rtol=1e-12, atol=1e-15)
    assert sum(float(t.abs().sum()) for t in got) > 0
    # The flag as a keyword, and as a tuple of one input for one-input models: the same maps.
    again = torchvis.METHODS[method](model, x if isinstance(x, tuple) else (x,), TARGET,
                                     forward_args=extra[:1], forward_kwargs={"scale": 1.5})
    for mine, their in zip(again, got, strict=True):
        torch.testing.assert_close(mine, their, rtol=0, atol=0)


def captum_quadrature(rule: str, steps: int) -> tuple[list[float], list[float]]:
    """Our nodes with Captum's weights (cast to float32; its trapezoid weights sum to 1 - 1/steps)."""
    nodes, weights = quadrature(rule, steps)
    if rule == "riemann_trapezoid":
        weights = [w * (steps - 1) / steps for w in weights]
    return nodes, torch.tensor(weights, dtype=torch.float64).float().double().tolist()


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rule", RULES)
def test_integrated_gradients_equals_captum(kind: str, rule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rule, per-input baselines (a number and a broadcast tensor), the path points in batches
    that split examples and steps (batch_size=4 for 3 examples), the mask taken at each point's
    example; the completeness gap summed over the inputs as Captum's convergence delta."""
    model, x, extra, inputs = ours_and_theirs(kind, seed=1)
    steps = 5
    baselines = tuple(0.1 * torch.ones_like(t[:1]) if i % 2 else 0.0 for i, t in enumerate(inputs))
    ours_baseline = baselines if isinstance(x, tuple) else baselines[0]
    shipped = torchvis.integrated_gradients(model, x, TARGET, baseline=ours_baseline, steps=steps, rule=rule,
                                            batch_size=4, forward_args=extra)
    with monkeypatch.context() as patch:
        patch.setattr(path, "quadrature", captum_quadrature)
        got, delta = torchvis.integrated_gradients(model, x, TARGET, baseline=ours_baseline, steps=steps,
                                                   rule=rule, batch_size=4, forward_args=extra,
                                                   return_delta=True)
    expanded = tuple(torch.as_tensor(b).expand_as(t).contiguous()
                     for b, t in zip(baselines, inputs, strict=True))
    theirs, their_delta = IntegratedGradients(model).attribute(
        inputs, expanded, target=TARGET, additional_forward_args=extra, n_steps=steps, method=rule,
        return_convergence_delta=True,
    )
    got_t, shipped_t = (got, shipped) if isinstance(got, tuple) else ((got,), (shipped,))
    scale = steps / (steps - 1) if rule == "riemann_trapezoid" else 1.0
    for mine, as_shipped, their in zip(got_t, shipped_t, theirs, strict=True):
        torch.testing.assert_close(mine, their.detach(), rtol=1e-10, atol=1e-14)
        largest = float(their.abs().max())
        torch.testing.assert_close(as_shipped, their.detach() * scale, rtol=3e-7, atol=3e-7 * largest)
    torch.testing.assert_close(delta, their_delta.detach(), rtol=1e-8, atol=1e-12)
    assert sum(float(t.abs().sum()) for t in got_t) > 0


def reference_smoothgrad(
    model: nn.Module, inputs: tuple[Tensor, ...], extra: tuple[Any, ...], target: Tensor, samples: int,
    noise: float, seed: int,
) -> tuple[list[Tensor], list[Tensor]]:
    """Mean and population variance of the gradient over noisy copies, one example and one sample at
    a time; sample s's noise is the next randn of each input in turn from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    sigmas = [noise * (t.flatten(1).amax(dim=1) - t.flatten(1).amin(dim=1)) for t in inputs]
    grads: list[list[Tensor]] = [[] for _ in inputs]
    for _ in range(samples):
        eps = [torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in inputs]
        per_input: list[list[Tensor]] = [[] for _ in inputs]
        for b in range(target.shape[0]):
            leaves = [(t[b:b + 1] + s[b] * e[b:b + 1]).requires_grad_(True)
                      for t, s, e in zip(inputs, sigmas, eps, strict=True)]
            mask, flag = extra
            out = model(*leaves, mask[b:b + 1], flag)
            for i, g in enumerate(torch.autograd.grad(out[0, target[b]], leaves)):
                per_input[i].append(g)
        for i, rows in enumerate(per_input):
            grads[i].append(torch.cat(rows))
    stacked = [torch.stack(g) for g in grads]
    return [s.mean(dim=0) for s in stacked], [s.var(dim=0, unbiased=False) for s in stacked]


@pytest.mark.parametrize("kind", KINDS)
def test_smoothgrad_and_vargrad_equal_the_per_sample_reference(kind: str) -> None:
    model, x, extra, inputs = ours_and_theirs(kind, seed=2)
    settings: dict[str, Any] = {"samples": 4, "noise": 0.2, "seed": 7, "batch_size": 5, "forward_args": extra}
    mean, variance = reference_smoothgrad(model, inputs, extra, TARGET, 4, 0.2, 7)
    got = torchvis.smoothgrad(model, x, TARGET, **settings)
    spread = torchvis.vargrad(model, x, TARGET, **settings)
    got_t, spread_t = (got, spread) if isinstance(got, tuple) else ((got,), (spread,))
    for mine, theirs in zip(got_t, mean, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-13)
    for mine, theirs in zip(spread_t, variance, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-13)
    assert all(float(v.abs().sum()) > 0 for v in spread_t)
