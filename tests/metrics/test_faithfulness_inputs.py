"""Deletion and insertion on features, signals and tuples of inputs: closed forms, a naive per-step
float64 reference, callable targets, bad input."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import seeded
from input_kinds import Signal, Tabular, TwoInputs, Volume
from torch import Tensor, nn

import torchvis
from torchvis.core.targets import class_logit

Randn = Callable[..., Tensor]


def sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def trapezoid(s: list[float]) -> float:
    n = len(s) - 1
    return sum((s[k] + s[k + 1]) / 2 for k in range(n)) / n


# --- closed forms ----------------------------------------------------------------------------------


def two_class(w: list[float]) -> nn.Module:
    """Logits ``(w . x, 0)`` over features ``[B,N]``: class 0's probability is ``sigmoid(w . x)``."""
    fc = nn.Linear(len(w), 2, bias=False).double()
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([w, [0.0] * len(w)], dtype=torch.float64))
    return fc.eval()


def test_deletion_and_insertion_of_features_by_hand() -> None:
    model = two_class([3.0, 1.0, 2.0, 0.0])
    x = torch.ones(1, 4, dtype=torch.float64)
    perfect = torch.tensor([[3.0, 1.0, 2.0, 0.0]], dtype=torch.float64)  # order: 0, 2, 1, 3
    curves = torchvis.deletion(model, x, perfect, 0, pixels_per_step=1, return_curves=True)
    expected = [sig(6), sig(3), sig(1), sig(0), sig(0)]
    torch.testing.assert_close(curves.scores[0], torch.tensor(expected, dtype=torch.float64))
    assert curves.auc.item() == pytest.approx(trapezoid(expected), abs=1e-12)
    # Two features a step, inserted into zeros: logits 0, 5, 6.
    inserted = torchvis.insertion(model, x, -perfect, 0, pixels_per_step=2, start=0.0, return_curves=True)
    torch.testing.assert_close(inserted.scores[0],
                               torch.tensor([sig(0), sig(5), sig(6)], dtype=torch.float64))
    torch.testing.assert_close(inserted.fraction, torch.tensor([0, 0.5, 1], dtype=torch.float64))
    # A callable target is scored by its own value: the logit itself.
    raw = torchvis.deletion(model, x, perfect, class_logit(0), pixels_per_step=1, return_curves=True)
    torch.testing.assert_close(raw.scores[0], torch.tensor([6.0, 3.0, 1.0, 0.0, 0.0], dtype=torch.float64))


def test_a_signal_step_is_a_time_step_across_channels_and_a_coarse_map_is_upsampled_linearly() -> None:
    # Logits (sum over channels and time of w * x, 0) with w = 1 at t=0, 2 at t=1, 3 at t=2.
    w = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], dtype=torch.float64)

    def model(x: Tensor) -> Tensor:
        z = (x * w).sum(dim=(1, 2))
        return torch.stack([z, torch.zeros_like(z)], dim=1)

    x = torch.ones(1, 2, 3, dtype=torch.float64)
    coarse = torch.tensor([[[0.0, 1.0]]], dtype=torch.float64)  # [B,1,2], increasing in time
    assert torch.equal(F.interpolate(coarse, size=3, mode="linear", align_corners=False).argsort(dim=2),
                       torch.tensor([[[0, 1, 2]]]))
    curves = torchvis.deletion(model, x, coarse, 0, pixels_per_step=1, return_curves=True)
    # The last step goes first, both channels at once: 12 -> 6 -> 2 -> 0.
    torch.testing.assert_close(curves.scores[0], torch.tensor([sig(12), sig(6), sig(2), sig(0)],
                                                              dtype=torch.float64))


# --- a naive per-step reference ------------------------------------------------------------------


def features_of(t: Tensor) -> int:
    return t.shape[1] if t.dim() == 2 else math.prod(t.shape[2:])


def set_feature(t: Tensor, p: int, source: Tensor) -> None:
    """Feature ``p`` of one example ``t`` (no batch dimension): an element, or a position across channels."""
    if t.dim() == 1:
        t[p] = source[p]
    else:
        flat, src = t.view(t.shape[0], -1), source.reshape(source.shape[0], -1)
        flat[:, p] = src[:, p]


def curve_reference(call: Callable[[list[Tensor], int], Tensor], xs: list[Tensor], maps: list[Tensor],
                    score: Callable[[Tensor, int], float], per_step: int, start: list[Tensor],
                    end: list[Tensor]) -> tuple[list[list[float]], list[float]]:
    """One input per forward pass: features of all inputs ranked together by |map| (summed over the
    channels of inputs with channels), ties by input then position; ``per_step`` replaced a step."""
    curves, aucs = [], []
    for b in range(xs[0].shape[0]):
        weights: list[tuple[float, int, int]] = []
        for i, (x, m) in enumerate(zip(xs, maps, strict=True)):
            values = m[b].abs() if x.dim() == 2 else m[b].abs().sum(dim=0).flatten()
            weights += [(-float(v), i, p) for p, v in enumerate(values.tolist())]
        order = [(i, p) for _, i, p in sorted(weights)]  # the input index then the position break ties
        total = len(order)
        n = math.ceil(total / per_step)
        points = []
        for k in range(n + 1):
            current = [s[b].clone() for s in start]
            for i, p in order[: min(k * per_step, total)]:
                set_feature(current[i], p, end[i][b])
            with torch.no_grad():
                points.append(score(call(current, b), b))
        curves.append(points)
        aucs.append(trapezoid(points))
    return curves, aucs


def check(curves: Any, want: tuple[list[list[float]], list[float]]) -> None:
    for got, expected in ((curves.scores, want[0]), (curves.auc, want[1])):
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch_size", [1, 5, None])
@pytest.mark.parametrize("metric", ["deletion", "insertion"])
def test_tabular_matches_the_naive_reference(metric: str, batch_size: int | None, randn: Randn) -> None:
    model = seeded(0, Tabular)
    x, a, scale = randn(1, 3, 6), randn(2, 3, 6), randn(3, 3, 6).exp()
    fill = randn(4, 1, 6)
    target = [0, 2, 1]
    kwargs = {"baseline": fill} if metric == "deletion" else {"start": fill}
    curves = getattr(torchvis, metric)(model, x, a, target, pixels_per_step=4, batch_size=batch_size,
                                       forward_args=(scale,), return_curves=True, **kwargs)
    ends = [fill.expand_as(x)], [x]
    start, end = (ends[1], ends[0]) if metric == "deletion" else ends
    want = curve_reference(lambda ts, b: model(ts[0][None], scale[b : b + 1]), [x], [a],
                           lambda out, b: out.softmax(dim=1)[0, target[b]].item(), 4, start, end)
    check(curves, want)


def test_a_volume_step_is_a_voxel_across_channels_and_a_coarse_map_is_upsampled_trilinearly(
    randn: Randn
) -> None:
    model = seeded(2, Volume)
    x, coarse = randn(14, 2, 2, 3, 4, 4), randn(15, 2, 1, 2, 2, 2)
    curves = torchvis.deletion(model, x, coarse, [1, 2], pixels_per_step=5, baseline=-1.0, batch_size=6,
                               return_curves=True)
    upsampled = F.interpolate(coarse, size=(3, 4, 4), mode="trilinear", align_corners=False)
    want = curve_reference(lambda ts, b: model(ts[0][None]), [x], [upsampled],
                           lambda out, b: out.softmax(dim=1)[0, [1, 2][b]].item(), 5, [x],
                           [torch.full_like(x, -1.0)])
    check(curves, want)


@pytest.mark.parametrize("metric", ["deletion", "insertion"])
def test_two_inputs_rank_their_features_jointly_like_the_naive_reference(metric: str, randn: Randn) -> None:
    model = seeded(4, TwoInputs)
    image, meta, gain, bias = randn(5, 2, 2, 5, 5), randn(6, 2, 4), randn(7, 2).exp(), randn(8, 1, 3)
    maps = (randn(9, 2, 2, 5, 5), randn(10, 2, 4) * 3)  # the metadata's weights compete with the pixels'

    def margin(output: Tensor) -> Tensor:
        return output[:, 2] - output[:, 0]

    fills = (0.5, randn(11, 2, 4))
    kwargs = {"baseline": fills} if metric == "deletion" else {"start": fills}
    curves = getattr(torchvis, metric)(model, (image, meta), maps, margin, pixels_per_step=3, batch_size=4,
                                       forward_args=gain, forward_kwargs={"bias": bias}, return_curves=True,
                                       **kwargs)
    xs = [image, meta]
    filled = [torch.full_like(image, 0.5), fills[1]]
    start, end = (xs, filled) if metric == "deletion" else (filled, xs)
    want = curve_reference(lambda ts, b: model(ts[0][None], ts[1][None], gain[b : b + 1], bias=bias), xs,
                           list(maps), lambda out, b: margin(out)[0].item(), 3, start, end)
    assert curves.scores.shape == (2, math.ceil(29 / 3) + 1)
    check(curves, want)


def test_a_tuple_of_images_may_start_from_their_blur_and_a_number(randn: Randn) -> None:
    def model(a: Tensor, b: Tensor) -> Tensor:
        return torch.stack([a.mean(dim=(1, 2, 3)) - b.mean(dim=(1, 2, 3)), torch.zeros(a.shape[0])], dim=1)

    a, b = randn(12, 1, 1, 6, 6), randn(13, 1, 1, 6, 6)
    got = torchvis.insertion(model, (a, b), (a, b), 0, start=("blur", 0.0), return_curves=True)
    single = torchvis.insertion(lambda a: model(a, torch.zeros_like(a)), a, a, 0, return_curves=True)
    # At step 0 the first image is its blur and the second 0: the same as one image blurred.
    assert got.scores[0, 0].item() == pytest.approx(single.scores[0, 0].item(), abs=1e-12)


# --- bad input -------------------------------------------------------------------------------------


def test_bad_inputs_are_clear_errors(randn: Randn) -> None:
    model = seeded(0, Tabular)
    x, a = randn(0, 2, 6), randn(1, 2, 6)
    with pytest.raises(ValueError, match=r"start='blur' blurs images \[B,C,H,W\]; x has shape \[2, 6\]"):
        torchvis.insertion(model, x, a, forward_args=a)
    signal = randn(2, 2, 2, 9)
    with pytest.raises(ValueError, match=r"start\[1\]='blur' blurs images.*x\[1\] has shape \[2, 2, 9\]"):
        torchvis.insertion(model, (randn(3, 2, 1, 4, 4), signal), (randn(3, 2, 1, 4, 4), signal))
    with pytest.raises(ValueError, match=r"attributions must be \[B,N\] like x \[2, 6\] with B=2"):
        torchvis.deletion(model, x, a[:, None], forward_args=a)
    with pytest.raises(TypeError, match="attributions must be a tuple with one map per input"):
        torchvis.deletion(model, (x, x), a)
    with pytest.raises(TypeError, match=r"one per input; got 3"):
        torchvis.deletion(model, (x, x), (a, a), baseline=(0.0, 0.0, 0.0))
    with pytest.raises(TypeError, match=r"pass baseline as a number or one per input"):
        torchvis.deletion(model, (x, x), (a, a), baseline=torch.zeros(6))
    with pytest.raises(ValueError, match=r"share the batch size"):
        torchvis.deletion(model, (x, x[:1]), (a, a[:1]))
    with pytest.raises(ValueError, match=r"a map at another resolution .* one channel"):
        torchvis.deletion(Signal(), signal, randn(4, 2, 2, 4), forward_args=torch.ones(2, 9))
