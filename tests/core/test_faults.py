"""Faults that used to pass silently: inf scores, NumPy targets refused, BatchNorm statistics moved by
``eval_mode=False``."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from conftest import options_for
from torch import Tensor, nn

from torchvis.methods import METHODS, explain
from torchvis.methods.gradient import saliency

CALLS = [*METHODS, "explain"]


def call(name: str, model: nn.Module, x: Tensor, target: Any = None, **kwargs: Any) -> dict[str, Tensor]:
    if name == "explain":
        options = {k: v for n in METHODS for k, v in options_for(n, layer="1").items() if k != "layer"}
        return explain(model, x, target, methods=list(METHODS), layer="1", **options, **kwargs)
    return {name: METHODS[name](model, x, target, **options_for(name, layer="1"), **kwargs)}


class Scaled(nn.Module):
    """The logits times a constant (float32 overflows to inf beyond about 3.4e38)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor


def small(last: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(3, 4), last).to(dtype).eval()


def x_of(batch: int = 2, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(batch, 2, 4, 4, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("name", CALLS)
def test_a_logit_that_overflows_to_inf_is_an_error(name: str) -> None:
    model, x = small(Scaled(1e39)), x_of()  # float32: every non-zero logit becomes +-inf
    assert torch.isinf(model(x)).any() and not torch.isnan(model(x)).any()
    with pytest.raises(ValueError, match="the model output contains NaN or inf"):
        call(name, model, x)


class InverseOfSmallest(nn.Module):
    """[B, 2] logits ``(1 / min|x|, 0)``: finite for the clean input, inf once a window of zeros
    covers the smallest value — which only occlusion's occluded images do."""

    def forward(self, x: Tensor) -> Tensor:
        score = 1 / x.abs().flatten(1).amin(dim=1)
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def test_occlusion_refuses_an_occluded_score_that_is_inf() -> None:
    x = x_of().abs() + 0.5
    with pytest.raises(ValueError, match="the target scores of some occluded images hold NaN or inf"):
        METHODS["occlusion"](InverseOfSmallest(), x, 0, window=2)
    # The same call with a baseline that keeps every value non-zero is fine.
    assert torch.isfinite(METHODS["occlusion"](InverseOfSmallest(), x, 0, window=2, baseline=1.0)).all()


class SquareRoot(nn.Module):
    """[B, 2] logits ``(sum sqrt|x|, 0)``: finite, but the gradient at x = 0 is inf * sign(0) = NaN."""

    def forward(self, x: Tensor) -> Tensor:
        score = x.abs().sqrt().flatten(1).sum(dim=1)
        return torch.stack([score, torch.zeros_like(score)], dim=1)


@pytest.mark.parametrize("name", ["saliency", "guided_backprop"])
def test_a_gradient_that_is_inf_is_an_error(name: str) -> None:
    x = x_of(dtype=torch.float64)
    x[0, 0, 0, 0] = 0.0
    with pytest.raises(ValueError, match="gradients of the target score hold NaN or inf"):
        METHODS[name](SquareRoot(), x, 0)


TARGETS = {
    "numpy-int64": (np.int64(2), 2), "numpy-uint8": (np.uint8(2), 2), "numpy-0d": (np.array(2), 2),
    "tensor-0d": (torch.tensor(2), 2), "numpy-array": (np.array([3, 1]), [3, 1]),
    "numpy-int32-array": (np.array([3, 1], dtype=np.int32), [3, 1]),
    "list-of-numpy": ([np.int64(3), np.int64(1)], [3, 1]),
}


@pytest.mark.parametrize("name", CALLS)
@pytest.mark.parametrize("case", TARGETS.values(), ids=TARGETS.keys())
def test_numpy_and_0d_targets_are_class_indices(name: str, case: tuple[Any, Any]) -> None:
    model, x = small(nn.Identity(), torch.float64), x_of(dtype=torch.float64)
    given, plain = case
    got, expected = call(name, model, x, given), call(name, model, x, plain)
    assert got.keys() == expected.keys()
    for key in got:
        assert torch.equal(got[key], expected[key]), key


def norm_net(norm: nn.Module, spatial: int = 4) -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), norm, nn.ReLU(), nn.Conv2d(3, 3, 1),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4)).double().train()
        with torch.no_grad():  # non-trivial running statistics
            model(torch.randn(8, 2, spatial, spatial, dtype=torch.float64) * 3 + 1)
    return model


NORMS = {
    "batchnorm": lambda: nn.BatchNorm2d(3),
    "batchnorm-cumulative": lambda: nn.BatchNorm2d(3, momentum=None),
    "instancenorm-tracking": lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
}


@pytest.mark.parametrize("name", CALLS)
@pytest.mark.parametrize("norm", NORMS.values(), ids=NORMS.keys())
def test_eval_mode_false_uses_batch_statistics_and_updates_none(name: str, norm: Any) -> None:
    model, x = norm_net(norm()), x_of(dtype=torch.float64)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    got = call(name, model, x, [0, 3], eval_mode=False)
    for key, value in model.named_buffers():
        assert torch.equal(value, buffers[key]), f"{key} changed"
    # Reference: the same train-mode model run by hand, in float64 (a copy, whose statistics may move).
    twin, t = copy.deepcopy(model), torch.tensor([[0], [3]])
    xi = x.clone().requires_grad_(True)
    act = twin[1](twin[0](xi))
    a_grad, x_grad = torch.autograd.grad(twin[2:](act).gather(1, t).sum(), [act, xi])
    cam = (a_grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1, keepdim=True).clamp_min(0)
    for key, expected in (("saliency", x_grad), ("grad_cam", cam)):
        if key in got:
            torch.testing.assert_close(got[key], expected.detach(), rtol=1e-10, atol=1e-12, msg=key)


def test_eval_mode_false_examples_interact_through_batch_statistics() -> None:
    # Documented: on batch statistics, one example's map depends on the others in the batch.
    model, x = norm_net(nn.BatchNorm2d(3)), x_of(batch=3, dtype=torch.float64)
    together = saliency(model, x, 0, eval_mode=False)
    changed = x.clone()
    changed[2] += 5
    assert not torch.allclose(saliency(model, changed, 0, eval_mode=False)[0], together[0])
    assert torch.equal(saliency(model, changed, 0)[0], saliency(model, x, 0)[0])  # eval mode: independent


def test_eval_mode_false_batch_of_one_fails_before_touching_statistics() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(32, 4), nn.BatchNorm1d(4)).double().train()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        saliency(model, x_of(batch=1, dtype=torch.float64), 0, eval_mode=False)
    for key, value in model.named_buffers():
        assert torch.equal(value, buffers[key]), f"{key} changed"
