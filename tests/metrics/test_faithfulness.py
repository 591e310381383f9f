"""Deletion and insertion: closed forms, a naive float64 reference, bad inputs, hygiene."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torchvis
from torchvis.core.inputs import as_inputs
from torchvis.methods.perturbation import batch_size_for
from torchvis.metrics.faithfulness import ranks


def sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def trapezoid(s: list[float]) -> float:
    """The AUC of points ``s_0..s_N`` evenly spread over [0, 1]."""
    n = len(s) - 1
    return sum((s[k] + s[k + 1]) / 2 for k in range(n)) / n


class LinearTwoClass(nn.Module):
    """Two classes with logits ``(w . x, 0)``: the probability of class 0 is ``sigmoid(w . x)``."""

    def __init__(self, w: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        z = x.flatten(1) @ self.w
        return torch.stack([z, torch.zeros_like(z)], dim=1)


W = [3.0, 2.0, 1.0, 0.0]  # pixels of a 1x2x2 image, row by row
ONES = torch.ones(1, 1, 2, 2, dtype=torch.float64)


def attr(values: list[float]) -> Tensor:
    return torch.tensor(values, dtype=torch.float64).view(1, 1, 2, 2)


# ---------------------------------------------------------------------------------------------
# Closed forms


def test_deletion_closed_form_perfect_and_reversed() -> None:
    model = LinearTwoClass(W)
    perfect = torchvis.deletion(model, ONES, attr(W), pixels_per_step=1, return_curves=True)
    # Removing the pixels of weight 3, 2, 1, 0 in turn leaves the logit 6, 3, 1, 0, 0.
    expected = [sig(6), sig(3), sig(1), sig(0), sig(0)]
    torch.testing.assert_close(perfect.scores[0], torch.tensor(expected, dtype=torch.float64))
    assert perfect.auc.item() == pytest.approx(trapezoid(expected), abs=1e-12)
    torch.testing.assert_close(perfect.fraction, torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64))
    reversed_ = torchvis.deletion(model, ONES, attr([0, 1, 2, 3]), pixels_per_step=1)
    assert reversed_.item() == pytest.approx(trapezoid([sig(6), sig(6), sig(5), sig(3), sig(0)]), abs=1e-12)
    assert perfect.auc.item() < reversed_.item()


def test_insertion_closed_form_perfect_and_reversed() -> None:
    model = LinearTwoClass(W)
    perfect = torchvis.insertion(model, ONES, attr(W), target=0, pixels_per_step=1, start=0.0,
                                 return_curves=True)
    expected = [sig(0), sig(3), sig(5), sig(6), sig(6)]
    torch.testing.assert_close(perfect.scores[0], torch.tensor(expected, dtype=torch.float64))
    assert perfect.auc.item() == pytest.approx(trapezoid(expected), abs=1e-12)
    reversed_ = torchvis.insertion(model, ONES, attr([0, 1, 2, 3]), pixels_per_step=1, start=0.0)
    assert reversed_.item() == pytest.approx(trapezoid([sig(0), sig(0), sig(1), sig(3), sig(6)]), abs=1e-12)
    assert perfect.auc.item() > reversed_.item()


def test_last_step_is_cut_at_the_image() -> None:
    # 3 pixels a step over 4 pixels: N = 2, points replace 0, 3 and 4 pixels.
    curves = torchvis.deletion(LinearTwoClass(W), ONES, attr(W), pixels_per_step=3, return_curves=True)
    expected = [sig(6), sig(0), sig(0)]
    torch.testing.assert_close(curves.scores[0], torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(curves.fraction, torch.tensor([0, 0.75, 1], dtype=torch.float64))
    assert curves.auc.item() == pytest.approx((sum(expected) - (expected[0] + expected[-1]) / 2) / 2)


def test_ties_are_broken_by_pixel_index() -> None:
    # Pixels 2 and 3 tie first, then 0 and 1: the order is 2, 3, 0, 1.
    curves = torchvis.deletion(LinearTwoClass(W), ONES, attr([0, 0, 1, 1]), pixels_per_step=1,
                               return_curves=True)
    expected = [sig(6), sig(5), sig(5), sig(2), sig(0)]
    torch.testing.assert_close(curves.scores[0], torch.tensor(expected, dtype=torch.float64))
    assert ranks(torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0]])).tolist() == [[3, 4, 0, 1, 2]]


def test_a_coarse_map_is_upsampled_bilinearly() -> None:
    # A 1x2 map [0, 5] becomes [[0, 5], [0, 5]] at 2x2: the order is 1, 3, 0, 2.
    coarse = torch.tensor([[[[0.0, 5.0]]]], dtype=torch.float64)
    curves = torchvis.deletion(LinearTwoClass(W), ONES, coarse, pixels_per_step=1, return_curves=True)
    expected = [sig(6), sig(4), sig(4), sig(1), sig(0)]
    torch.testing.assert_close(curves.scores[0], torch.tensor(expected, dtype=torch.float64))


def test_channels_are_reduced_by_the_sum_of_absolute_values() -> None:
    # Two channels, |.| summed: pixel importance [2, 3, 2, 0] -> order 1, 0, 2, 3; a pixel is
    # deleted in both channels at once.
    model = LinearTwoClass([3.0, 2.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    x = torch.ones(1, 2, 2, 2, dtype=torch.float64)
    a = torch.tensor([[1, -3, 0, 0], [-1, 0, 2, 0]], dtype=torch.float64).view(1, 2, 2, 2)
    curves = torchvis.deletion(model, x, a, pixels_per_step=1, return_curves=True)
    expected = [sig(10), sig(7), sig(3), sig(1), sig(0)]
    torch.testing.assert_close(curves.scores[0], torch.tensor(expected, dtype=torch.float64))


def test_baseline_tensor_and_target_per_example() -> None:
    model = LinearTwoClass(W)
    x = torch.ones(2, 1, 2, 2, dtype=torch.float64)
    baseline = torch.full((1, 1, 2, 2), -1.0, dtype=torch.float64)
    curves = torchvis.deletion(model, x, attr(W).expand(2, -1, -1, -1), [0, 1], baseline=baseline,
                               pixels_per_step=2, return_curves=True)
    logits = [6.0, 6.0 - 2 * 5, -6.0]  # removing 3 and 2 (to -1) subtracts 2*(3+2); then all: -6
    torch.testing.assert_close(curves.scores[0], torch.tensor([sig(v) for v in logits], dtype=torch.float64))
    torch.testing.assert_close(curves.scores[1], torch.tensor([sig(-v) for v in logits], dtype=torch.float64))


def test_default_steps_are_a_hundredth_of_the_pixels_rounded_up() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 3)).double()
    x = torch.rand(1, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    curves = torchvis.deletion(model, x, x, return_curves=True)
    assert curves.scores.shape == (1, 99)  # 8 pixels a step: ceil(784 / 8) = 98 steps
    assert curves.fraction[1].item() == pytest.approx(8 / 784)
    small = torch.rand(1, 1, 5, 5, dtype=torch.float64)
    model5 = nn.Sequential(nn.Flatten(), nn.Linear(25, 3)).double()
    assert torchvis.insertion(model5, small, small, return_curves=True).scores.shape == (1, 26)


# ---------------------------------------------------------------------------------------------
# A naive per-step reference, float64


def blur_reference(image: Tensor) -> Tensor:
    """RISE's substrate written out: an 11-tap Gaussian of sigma 5 per axis, reflected borders."""
    offsets = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(offsets**2) / (2 * 5.0**2))
    g = g / g.sum()
    channels = image.shape[1]
    padded = F.pad(image, (5, 5, 5, 5), mode="reflect")
    rows = F.conv2d(padded, g.view(1, 1, 11, 1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(rows, g.view(1, 1, 1, 11).repeat(channels, 1, 1, 1), groups=channels)


def curve_reference(model: nn.Module, x: Tensor, a: Tensor, target: list[int], per_step: int,
                    start: Tensor, end: Tensor) -> tuple[list[list[float]], list[float]]:
    """One image per forward pass: rank by sum |a| over channels (ties by index), replace in steps."""
    _, _, height, width = x.shape
    pixels = height * width
    n = math.ceil(pixels / per_step)
    curves, aucs = [], []
    for b in range(x.shape[0]):
        weight = a[b].abs().sum(dim=0).flatten().tolist()
        order = sorted(range(pixels), key=lambda p: (-weight[p], p))
        points = []
        for k in range(n + 1):
            image = start[b].clone()
            for p in order[: min(k * per_step, pixels)]:
                image[:, p // width, p % width] = end[b][:, p // width, p % width]
            with torch.no_grad():
                points.append(model(image[None]).softmax(dim=1)[0, target[b]].item())
        curves.append(points)
        aucs.append(trapezoid(points))
    return curves, aucs


@pytest.mark.parametrize("batch_size", [1, 7, None])
def test_deletion_matches_the_naive_reference(
    small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor], batch_size: int | None
) -> None:
    model, x, a = small_cnn(0), randn(1, 3, 3, 9, 8), randn(2, 3, 3, 9, 8)
    target = model(x).argmax(dim=1).tolist()
    baseline = randn(3, 1, 3, 1, 1)
    curves = torchvis.deletion(model, x, a, pixels_per_step=5, baseline=baseline, batch_size=batch_size,
                               return_curves=True)
    want_curves, want_auc = curve_reference(model, x, a, target, 5, x, baseline.expand_as(x))
    torch.testing.assert_close(curves.scores, torch.tensor(want_curves, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(curves.auc, torch.tensor(want_auc, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch_size", [1, 7, None])
def test_insertion_matches_the_naive_reference(
    small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor], batch_size: int | None
) -> None:
    model, x = small_cnn(1), randn(4, 3, 3, 12, 12)
    a = randn(5, 3, 1, 6, 6)  # a coarse single-channel map, upsampled
    upsampled = F.interpolate(a, size=(12, 12), mode="bilinear", align_corners=False)
    target = [2, 0, 4]
    curves = torchvis.insertion(model, x, a, target, pixels_per_step=7, batch_size=batch_size,
                                return_curves=True)
    want_curves, want_auc = curve_reference(model, x, upsampled, target, 7, blur_reference(x), x)
    torch.testing.assert_close(curves.scores, torch.tensor(want_curves, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(curves.auc, torch.tensor(want_auc, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)


def test_batches_are_bounded_and_forward_only(small_cnn: Callable[[int], nn.Module],
                                              randn: Callable[..., Tensor]) -> None:
    model, x = small_cnn(0), randn(1, 3, 3, 8, 8)
    sizes: list[int] = []
    modes: list[tuple[bool, bool]] = []

    def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        sizes.append(args[0].shape[0])
        modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))

    handle = model.register_forward_pre_hook(record)
    try:
        auc = torchvis.deletion(model, x, x, pixels_per_step=4, batch_size=5)
    finally:
        handle.remove()
    assert sizes[0] == 3 and sum(sizes[1:]) == 17 * 3 and max(sizes[1:]) == 5  # target pass, then chunks
    assert set(modes) == {(True, False)}
    assert not auc.is_inference() and not auc.requires_grad


def test_default_batch_is_occlusions() -> None:
    """The same forward-only work as occlusion, in the same chunks: 64 digits a forward on the CPU (a
    batch of 128 ran 25-45 % slower per image with one thread on a 2-core CPU), 8 of 3x224x224."""
    seen: list[int] = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 3))
    x = torch.randn(3, 1, 28, 28)
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    torchvis.deletion(model, x, x, pixels_per_step=8)  # 99 points of 3 digits: 297 images
    assert seen[1:] == [64, 64, 64, 64, 41]  # after the pass that resolves the target
    assert batch_size_for(as_inputs(torch.zeros(1, 3, 224, 224)), None) == 8


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_are_clear_errors() -> None:
    model, a = LinearTwoClass(W), attr(W)
    with pytest.raises(TypeError, match="torch.Tensor"):
        torchvis.deletion(model, [[1.0]], a)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[B,C,H,W\]"):
        torchvis.deletion(model, ONES[0], a)
    with pytest.raises(TypeError, match="attributions must be a tensor"):
        torchvis.deletion(model, ONES, W)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="B=1"):
        torchvis.deletion(model, ONES, a.expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match="one channel to be"):
        torchvis.deletion(model, ONES, torch.ones(1, 2, 1, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN or Inf"):
        torchvis.insertion(model, ONES, attr([0, math.nan, 0, 0]))
    with pytest.raises(ValueError, match="floating"):
        torchvis.deletion(model, ONES, a.long())
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="pixels_per_step"):
            torchvis.deletion(model, ONES, a, pixels_per_step=bad)  # type: ignore[arg-type]
    for bad in (0, 2.0, False):
        with pytest.raises(ValueError, match="batch_size"):
            torchvis.insertion(model, ONES, a, batch_size=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not broadcast"):
        torchvis.deletion(model, ONES, a, baseline=torch.zeros(3, 1, 1))
    with pytest.raises(ValueError, match="baseline contains NaN"):
        torchvis.deletion(model, ONES, a, baseline=math.nan)
    with pytest.raises(TypeError, match="baseline must be a number"):
        torchvis.deletion(model, ONES, a, baseline="zero")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="start must be 'blur'"):
        torchvis.insertion(model, ONES, a, start="noise")
    with pytest.raises(ValueError, match="start contains NaN"):
        torchvis.insertion(model, ONES, a, start=math.inf)
    with pytest.raises(ValueError, match="out of range"):
        torchvis.insertion(model, ONES, a, target=2)


class SqrtModel(nn.Module):
    """Logits ``(sum sqrt(x - 0.5), 0)``: finite on ``x`` of ones, NaN once a pixel is set to 0."""

    def forward(self, x: Tensor) -> Tensor:
        z = (x - 0.5).sqrt().flatten(1).sum(dim=1)
        return torch.stack([z, torch.zeros_like(z)], dim=1)


def test_a_model_without_class_logits_or_with_nan_is_an_error() -> None:
    x, a = torch.ones(2, 1, 2, 2), attr(W).float().expand(2, -1, -1, -1)
    with pytest.raises(ValueError, match=r"logits of shape \[B, classes\]"):
        torchvis.deletion(nn.Identity(), x, a)
    nan_model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        nan_model[1].bias.fill_(math.nan)
    with pytest.raises(ValueError, match="model output contains NaN"):
        torchvis.deletion(nan_model, x, a)
    with pytest.raises(ValueError, match="softmax scores contain NaN"):  # only the deleted images
        torchvis.deletion(SqrtModel(), x, a, target=0)


def test_a_constant_map_warns() -> None:
    model = LinearTwoClass(W)
    x = torch.ones(3, 1, 2, 2, dtype=torch.float64)
    a = torch.cat([attr(W), torch.zeros(2, 1, 2, 2, dtype=torch.float64)])
    with pytest.warns(torchvis.methods.cam.EmptyMapWarning, match="constant for 2 of 3 examples"):
        torchvis.deletion(model, x, a)


# ---------------------------------------------------------------------------------------------
# Hygiene


class Noisy(nn.Module):
    """Dropout and batch norm (train-mode behaviour differs), a forward that can be made to raise."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 6 * 6, 5)
        self.calls, self.raise_at = 0, -1

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.calls == self.raise_at:
            raise RuntimeError("boom")
        return self.fc(self.drop(self.bn(self.conv(x))).flatten(1))


# deletion_insertion: 1 target pass + 3 deletion chunks + 3 insertion chunks; call 6 raises in insertion's.
@pytest.mark.parametrize(
    ("metric", "raise_at"),
    [(m, r) for m in ("deletion", "insertion", "deletion_insertion") for r in (-1, 3)]
    + [("deletion_insertion", 6)],
)
def test_metrics_leave_everything_as_it_was(metric: str, raise_at: int) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Noisy()
        x = torch.randn(2, 3, 6, 6)
    model.train()
    model.drop.eval()  # a mix of modes, kept per module
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x_before, rng = x.clone(), torch.get_rng_state()
    model.raise_at = raise_at
    fn = getattr(torchvis, metric)
    if raise_at > 0:
        with pytest.raises(RuntimeError, match="boom"):
            fn(model, x, x, pixels_per_step=9, batch_size=4)
    else:
        fn(model, x, x, pixels_per_step=9, batch_size=4)
    assert model.training and model.bn.training and not model.drop.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BN statistics too
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters() if p.grad is not None)
    assert torch.equal(x, x_before) and torch.equal(torch.get_rng_state(), rng)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
