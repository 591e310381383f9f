"""Targets beyond a class index: tuple indices into a larger output, per-example indices, callables
(torchvis.targets), a [B] output — through every input-gradient and path/noise method, against the
gradient of the same score taken by hand."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import torchvis
from torchvis.core.targets import resolve_target, score_of, take_target
from torchvis.targets import class_in_region, class_logit, output_tensor

METHODS = ("saliency", "gradient_x_input", "integrated_gradients", "smoothgrad", "vargrad")


def grid_model(seed: int = 0) -> nn.Module:
    """[B, 6] -> [B, 5, 2] (tanh, so the gradient depends on the point)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Unflatten(1, (5, 2))).double().eval()


def features(seed: int, batch: int = 3) -> Tensor:
    return torch.randn(batch, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def by_hand(model: Callable[[Tensor], Any], x: Tensor, score: Callable[[Any], Tensor]) -> Tensor:
    leaf = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(score(model(leaf)).sum(), leaf)
    return grad


def test_tuple_target_indexes_every_example_the_same_way() -> None:
    model, x = grid_model(), features(0)
    got = torchvis.saliency(model, x, (3, 1))
    torch.testing.assert_close(got, by_hand(model, x, lambda out: out[:, 3, 1]), rtol=0, atol=0)


def test_per_example_index_b_by_k() -> None:
    model, x = grid_model(), features(1)
    index = torch.tensor([[0, 1], [4, 0], [2, 1]])
    expected = by_hand(model, x, lambda out: out[torch.arange(3), index[:, 0], index[:, 1]])
    torch.testing.assert_close(torchvis.saliency(model, x, index), expected, rtol=0, atol=0)
    as_list = torchvis.saliency(model, x, [(0, 1), (4, 0), (2, 1)])
    torch.testing.assert_close(as_list, expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_index_and_callable_targets_agree_in_every_method(method: str) -> None:
    """The same score as a tuple, as a [B, 2] index and as a callable: the same maps — through the
    enlarged batches of integrated gradients and SmoothGrad too (take_target)."""
    model, x = grid_model(), features(2)
    options: dict[str, Any] = {"integrated_gradients": {"steps": 4, "batch_size": 5},
                               "smoothgrad": {"samples": 3, "batch_size": 4},
                               "vargrad": {"samples": 3, "batch_size": 4}}.get(method, {})
    run = torchvis.METHODS[method]
    as_tuple = run(model, x, (4, 1), **options)
    as_index = run(model, x, torch.tensor([[4, 1]] * 3), **options)
    as_callable = run(model, x, lambda out: out[:, 4, 1], **options)
    torch.testing.assert_close(as_index, as_tuple, rtol=0, atol=0)
    torch.testing.assert_close(as_callable, as_tuple, rtol=0, atol=0)
    assert as_tuple.abs().sum() > 0


def test_callable_class_logit_equals_the_class_index() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double().eval()
    x = features(3)
    for method in METHODS:
        options = {"steps": 3} if method == "integrated_gradients" else {}
        torch.testing.assert_close(torchvis.METHODS[method](model, x, class_logit(2), **options),
                                   torchvis.METHODS[method](model, x, 2, **options), rtol=0, atol=0)


def test_a_single_score_per_example_is_explained_as_it_is() -> None:
    w = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0, 1.5], dtype=torch.float64)

    def model(x: Tensor) -> Tensor:
        return x @ w

    x = features(4)
    torch.testing.assert_close(torchvis.saliency(model, x), w.expand(3, 6), rtol=0, atol=0)
    ig, delta = torchvis.integrated_gradients(model, x, steps=2, return_delta=True)
    torch.testing.assert_close(ig, w * x, rtol=1e-14, atol=1e-14)
    assert delta.abs().max() < 1e-13
    torch.testing.assert_close(torchvis.smoothgrad(model, x, samples=3), w.expand(3, 6), rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="explained as it is, so target must be None"):
        torchvis.saliency(model, x, 1)


@pytest.fixture(scope="module", params=["fcn_resnet50", "deeplabv3_resnet50"])
def segmentation(request: pytest.FixtureRequest) -> nn.Module:
    """A torchvision segmentation model with random weights (nothing downloaded), 4 classes."""
    from torchvision.models import segmentation as seg

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return getattr(seg, request.param)(weights=None, weights_backbone=None, num_classes=4).eval()


def _region_target() -> tuple[Tensor, Callable[[Any], Tensor]]:
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[16:40, 8:30] = True
    return mask, output_tensor("out", class_in_region(2, mask))


def test_callable_on_a_segmentation_model_is_the_masked_sum_gradient(segmentation: nn.Module) -> None:
    model, (mask, target) = segmentation, _region_target()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    got = torchvis.saliency(model, x, target)
    leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((model(leaf)["out"][:, 2] * mask).sum(), leaf)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7 * float(expected.abs().max()))
    assert got.abs().sum() > 0


def test_callable_on_a_segmentation_model_through_cam_occlusion_and_deletion(segmentation: nn.Module) -> None:
    """Grad-CAM at the backbone's last stage, occlusion and deletion of the masked class-2 sum, each
    against the computation written out by hand (deletion scores the callable's own value)."""
    model, (mask, target) = segmentation, _region_target()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))

    def region_score(images: Tensor) -> Tensor:
        with torch.no_grad():
            return (model(images)["out"][:, 2] * mask).sum(dim=(1, 2))

    # Grad-CAM: A and dS/dA at backbone.layer4, weights = spatial mean of the gradient.
    seen: list[Tensor] = []
    handle = model.backbone.layer4.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        score = (model(x)["out"][:, 2] * mask).sum()
    finally:
        handle.remove()
    (g,) = torch.autograd.grad(score, seen[0])
    heat = (g.mean(dim=(2, 3), keepdim=True) * seen[0].detach()).sum(dim=1, keepdim=True).clamp_min(0)
    expected_cam = torch.nn.functional.interpolate(heat, size=(64, 64), mode="bilinear", align_corners=False)
    got_cam = torchvis.grad_cam(model, x, target, layer="backbone.layer4")
    torch.testing.assert_close(got_cam, expected_cam, rtol=1e-4, atol=1e-5 * float(expected_cam.abs().max()))

    # Occlusion, 16x16 windows without overlap: each pixel's value is its window's score drop.
    clean = region_score(x)
    expected_occ = torch.zeros(1, 1, 64, 64)
    for top in range(0, 64, 16):
        for left in range(0, 64, 16):
            hidden = x.clone()
            hidden[:, :, top : top + 16, left : left + 16] = 0
            expected_occ[:, :, top : top + 16, left : left + 16] = clean - region_score(hidden)
    got_occ = torchvis.occlusion(model, x, target, window=16, stride=16)
    torch.testing.assert_close(got_occ, expected_occ, rtol=1e-4, atol=1e-5 * float(expected_occ.abs().max()))

    # Deletion in 4 steps of 1,024 pixels, ranked by |occlusion map| (stable), scored by the callable.
    order = got_occ.abs().flatten().argsort(descending=True, stable=True)
    scores = [clean]
    for k in range(1, 5):
        deleted = x.clone().flatten(2)
        deleted[:, :, order[: k * 1024]] = 0
        scores.append(region_score(deleted.view_as(x)))
    curve = torch.cat(scores)
    expected_auc = (curve.sum() - (curve[0] + curve[-1]) / 2) / 4
    got_auc = torchvis.deletion(model, x, got_occ, target, pixels_per_step=1024)
    torch.testing.assert_close(got_auc, expected_auc.view(1), rtol=1e-4, atol=1e-6 * float(curve.abs().max()))


def test_callable_returning_the_wrong_shape_is_a_clear_error() -> None:
    model, x = grid_model(), features(5)
    calls = []

    def whole_output(out: Tensor) -> Tensor:
        calls.append(1)
        return out.sum(dim=2)  # [B, 5]: not one score per example

    for method in METHODS:
        with pytest.raises(ValueError, match=r"one score per example \[B=\d+\].*shape \[\d+, 5\]"):
            torchvis.METHODS[method](model, x, whole_output)
    with pytest.raises(ValueError, match="floating tensor"):
        torchvis.saliency(model, x, lambda out: out[:, 0, 0].long())
    with pytest.raises(ValueError, match="does not depend on the inputs"):
        torchvis.saliency(model, x, lambda out: out[:, 0, 0].detach())


def test_helpers_say_what_they_needed() -> None:
    with pytest.raises(ValueError, match=r"class_logit\(1\) needs an output \[B, classes\]"):
        class_logit(1)(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="dense output"):
        class_in_region(1)(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="must match the output's spatial shape"):
        class_in_region(1, torch.ones(4, 4))(torch.zeros(2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"output_tensor\('aux'\).*keys \['out'\]"):
        output_tensor("aux", class_logit(0))({"out": torch.zeros(2, 3)})
    out = torch.arange(24.0).reshape(2, 3, 2, 2)
    torch.testing.assert_close(class_in_region(1)(out), out[:, 1].sum(dim=(1, 2)))


@pytest.mark.parametrize(
    "target, match",
    [(5, r"output of shape \[B, classes\].*tuple target"), ((3,), "needs 2 indices per example"),
     ((5, 0), "out of range for dimension 1"), ((0, 2), "out of range for dimension 2"),
     (torch.tensor([[1, 0]] * 2), r"got shape \[2, 2\]"), ((1.0, 0), "integer indices"),
     ((True, 0), "integer indices"), ([1, 2, 0], "one index tuple per example")],
)
def test_bad_index_targets(target: Any, match: str) -> None:
    model, x = grid_model(), features(6)
    with pytest.raises((ValueError, TypeError), match=match):
        torchvis.saliency(model, x, target)


def test_resolve_take_and_score() -> None:
    out = torch.arange(30.0).reshape(3, 5, 2)
    resolved = resolve_target((2, 1), out, 3)
    assert isinstance(resolved, Tensor) and resolved.tolist() == [[2, 1]] * 3
    torch.testing.assert_close(score_of(out, resolved, 3), out[:, 2, 1])
    rows = torch.tensor([1, 1, 0])
    taken = take_target(resolve_target(torch.tensor([[0, 0], [1, 1], [2, 0]]), out, 3), rows)
    assert isinstance(taken, Tensor) and taken.tolist() == [[1, 1], [1, 1], [0, 0]]
    assert take_target(class_logit(1), rows) is not None
