"""Occlusion over inputs of any shape and tuples of them: Captum in float64, closed forms, the window
rules, bad input."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch
from captum.attr import Occlusion
from conftest import seeded
from input_kinds import Signal, Tabular, ThreeInputs, TwoInputs, Volume
from torch import Tensor, nn

from torchvis.core.targets import class_logit, output_tensor
from torchvis.methods.perturbation import default_batch_size, occlusion

Randn = Callable[..., Tensor]


def captum(model: Callable[..., Tensor], x: Any, target: Any, windows: Any, strides: Any,
           baselines: Any = 0.0, args: Any = None) -> Any:
    """Captum's Occlusion in float64. Captum divides its float64 sums by the window counts after
    ``.float()`` (float32 rounding), so this takes its sums (``use_weights=False``) and its counts (the
    same call on a function that scores 1 for the clean input and 0 for any occluded one) and divides
    in float64."""
    many = isinstance(x, tuple)
    inputs = x if many else (x,)

    def changed(*values: Tensor) -> Tensor:
        same = [(v == c).flatten(1).all(dim=1) for v, c in zip(values, inputs, strict=False)]
        return torch.stack(same).all(dim=0).double()

    def sums(function: Callable[..., Tensor], target: Any) -> tuple[Tensor, ...]:
        occlusion = Occlusion(function)
        occlusion.use_weights = False
        out = occlusion.attribute(x, sliding_window_shapes=windows, strides=strides, baselines=baselines,
                                  target=target, additional_forward_args=args)
        return out if many else (out,)

    result = tuple(s / n for s, n in zip(sums(model, target), sums(changed, None), strict=True))
    return result if many else result[0]


# --- against Captum (float64) ----------------------------------------------------------------------


@pytest.mark.parametrize("window, stride", [((2,), (1,)), ((3,), (2,)), ((6,), (5,)), ((4,), (3,))])
@pytest.mark.parametrize("batch_size", [1, 5, None])
def test_tabular_equals_captum(window: Any, stride: Any, batch_size: int | None, randn: Randn) -> None:
    model = seeded(0, Tabular)
    x, scale, base = randn(1, 3, 6), randn(2, 3, 6).exp(), randn(3, 6)
    got = occlusion(model, x, [0, 2, 1], window=window, stride=stride, baseline=base,
                    forward_args=(scale,), batch_size=batch_size)
    expected = captum(model, x, [0, 2, 1], window, stride, base[None], (scale,))
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("window, stride", [((2, 3), (1, 2)), ((1, 4), (1, 3)), ((2, 9), 1)])
def test_signal_with_a_window_per_dimension_equals_captum(window: Any, stride: Any, randn: Randn) -> None:
    model = seeded(1, Signal)
    x, mask = randn(4, 2, 2, 9), randn(5, 2, 9).sigmoid()
    got = occlusion(model, x, 1, window=window, stride=stride, baseline=0.25, forward_args=mask, batch_size=3)
    expected = captum(model, x, 1, window, stride, 0.25, (mask,))
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_an_int_window_on_a_signal_covers_every_channel(randn: Randn) -> None:
    model = seeded(1, Signal)
    x, mask = randn(4, 2, 2, 9), randn(5, 2, 9).sigmoid()
    got = occlusion(model, x, 1, window=3, forward_args=(mask,))
    # Default stride: half the window; all channels at once is Captum's window (C, 3).
    expected = captum(model, x, 1, (2, 3), (1, 1), 0.0, (mask,))
    assert got.shape == (2, 1, 9)
    torch.testing.assert_close(got[:, 0], expected[:, 0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(expected[:, 0], expected[:, 1], rtol=0, atol=0)
    assert torch.equal(occlusion(model, x, 1, window=(3,), stride=1, forward_args=(mask,)), got)


def test_volume_cube_window_equals_captum(randn: Randn) -> None:
    model = seeded(2, Volume)
    x = randn(6, 2, 2, 4, 3, 5)
    got = occlusion(model, x, [2, 0], window=2, stride=(1, 2, 2), baseline=-0.5)
    expected = captum(model, x, [2, 0], (2, 2, 2, 2), (1, 1, 2, 2), -0.5)
    assert got.shape == (2, 1, 4, 3, 5)
    torch.testing.assert_close(got[:, 0], expected[:, 0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch_size", [4, 64])
def test_three_inputs_with_windows_strides_and_baselines_per_input_equal_captum(
    batch_size: int, randn: Randn
) -> None:
    model = seeded(3, ThreeInputs)
    x = (randn(7, 3, 2, 5, 5), randn(8, 3, 2, 7), randn(9, 3, 4))
    scale = randn(10, 3, 4).exp()
    windows = ((1, 2, 3), (2, 3), (2,))
    strides = ((1, 2, 2), (1, 2), 1)
    baselines = (0.5, randn(11, 1, 2, 1), randn(12, 3, 4))
    got = occlusion(model, x, None, window=windows, stride=strides, baseline=baselines,
                    forward_args=(scale,), batch_size=batch_size)
    target = model(*x, scale).argmax(dim=1)
    expected = captum(model, x, target, windows, strides, baselines, (scale,))
    assert isinstance(got, tuple) and len(got) == 3
    for ours, theirs, xi in zip(got, expected, x, strict=True):
        assert ours.shape == xi.shape
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_two_inputs_with_spatial_window_keyword_and_per_example_arguments(randn: Randn) -> None:
    model = seeded(4, TwoInputs)
    image, meta, gain = randn(13, 2, 2, 5, 5), randn(14, 2, 4), randn(15, 2).exp()
    bias = randn(16, 1, 3)  # shared: first dimension 1
    got = occlusion(model, (image, meta), 2, window=((2, 2), 1), stride=(1, 1), forward_args=(gain,),
                    forward_kwargs={"bias": bias}, batch_size=3)

    def with_bias(image: Tensor, meta: Tensor, gain: Tensor) -> Tensor:
        return model(image, meta, gain, bias=bias)

    # Captum 0.9 fails on a single number as the baseline of a tuple: one per input.
    expected = captum(with_bias, (image, meta), 2, ((2, 2, 2), (1,)), ((1, 1, 1), 1), (0.0, 0.0), (gain,))
    assert got[0].shape == (2, 1, 5, 5) and got[1].shape == (2, 4)
    torch.testing.assert_close(got[0][:, 0], expected[0][:, 0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-10, atol=1e-12)


# --- closed forms ----------------------------------------------------------------------------------


def linear_features(w: Tensor) -> nn.Module:
    """logits = x @ w.T for features ``[B,N]``, float64."""
    fc = nn.Linear(w.shape[1], w.shape[0], bias=False).double()
    with torch.no_grad():
        fc.weight.copy_(w)
    return fc.eval()


def test_zero_occlusion_of_linear_features_is_the_mean_window_sum() -> None:
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5, 4.0], [0.0, 1.0, 0.0, -1.0, 2.0]], dtype=torch.float64)
    x = torch.tensor([[2.0, 1.0, -1.0, 4.0, 0.5]], dtype=torch.float64)
    model = linear_features(w)
    share = (w[0] * x[0]).tolist()  # [2, -2, -3, 2, 2]
    single = occlusion(model, x, 0, window=1)
    assert single.tolist() == [share]
    # Windows of 2 with the default stride 1: [0,1], [1,2], [2,3], [3,4] sum to 0, -5, -1, 4.
    pairs = occlusion(model, x, 0, window=2)
    assert pairs.tolist() == [[0.0, -2.5, -3.0, 1.5, 4.0]]
    # Window 3, stride 2: [0..2] = -3, [2..4] = 1; the middle element is covered by both.
    triples = occlusion(model, x, 0, window=3, stride=2)
    assert triples.tolist() == [[-3.0, -3.0, -1.0, 1.0, 1.0]]


def test_a_window_covering_the_whole_input_runs_once_whatever_the_stride(randn: Randn) -> None:
    calls: list[int] = []

    def model(x: Tensor) -> Tensor:
        calls.append(x.shape[0])
        return x.flatten(1)[:, :3] * 2.0

    x = randn(17, 2, 3, 4)
    got = occlusion(model, x, 1, window=(3, 4), stride=(50, 7))
    assert calls == [2, 2]  # the clean pass and one window for both examples
    assert torch.equal(got, (2 * x[:, 0, 1])[:, None, None].expand(2, 3, 4))
    calls.clear()
    spatial = occlusion(model, x, 1, window=(4,), stride=9)
    assert calls == [2, 2] and spatial.shape == (2, 1, 4)


def test_callable_target_and_plain_function_model(randn: Randn) -> None:
    w = randn(18, 3, 5)
    fc = linear_features(w)
    x = randn(19, 2, 5)
    expected = occlusion(fc, x, 2, window=2, stride=1)

    def as_dict(x: Tensor) -> dict[str, Tensor]:
        return {"logits": fc(x)}

    got = occlusion(as_dict, x, output_tensor("logits", class_logit(2)), window=2, stride=1, batch_size=3)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # A tuple target indexes a larger output [B, 3, 2].
    stacked = occlusion(lambda x: torch.stack([fc(x), -fc(x)], dim=2), x, (2, 1), window=2, stride=1)
    torch.testing.assert_close(stacked, -expected, rtol=0, atol=1e-15)


def test_default_stride_is_half_the_window_per_dimension(randn: Randn) -> None:
    model = seeded(1, Signal)
    x, mask = randn(20, 1, 2, 9), randn(21, 1, 9).sigmoid()
    got = occlusion(model, x, 0, window=(2, 4), forward_args=(mask,))
    expected = captum(model, x, 0, (2, 4), (1, 2), 0.0, (mask,))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_incremental_is_only_for_one_image_input_of_a_module(
    randn: Randn, caplog: pytest.LogCaptureFixture
) -> None:
    model = seeded(0, Tabular)
    x, scale = randn(22, 2, 6), randn(23, 2, 6)
    with pytest.raises(ValueError, match=r"incremental occlusion cannot run here: it takes one image input"):
        occlusion(model, x, 0, window=2, forward_args=(scale,), incremental=True)
    with caplog.at_level(logging.DEBUG, logger="torchvis"):
        auto = occlusion(model, x, 0, window=2, forward_args=(scale,), incremental=None)
    assert "does not apply: it takes one image input" in caplog.text
    assert torch.equal(auto, occlusion(model, x, 0, window=2, forward_args=(scale,)))
    image = randn(24, 1, 2, 5, 5)
    with pytest.raises(ValueError, match="a window over height and width"):
        occlusion(nn.Sequential(nn.Flatten(), nn.Linear(50, 2)).double(), image, 0, window=(2, 2, 2),
                  incremental=True)


# --- bad input: clear errors before any work --------------------------------------------------------


class Untouchable(nn.Module):
    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        raise AssertionError("the model ran")


@pytest.mark.parametrize(
    "x, window, stride, baseline, error, match",
    [
        ("tab", (2, 2), None, 0.0, TypeError, r"window must be an int or a tuple of 1 int .*\[B, 6\]"),
        ("sig", (1, 2, 3), None, 0.0, TypeError, r"window must be an int or a tuple of 1 ints \(length: all"),
        ("img", (1, 2, 3, 4), None, 0.0, TypeError, r"window must be an int or a pair of ints"),
        ("two", 2, ((1, 1, 1), 1), 0.0, TypeError, r"stride\[0\] must be an int or a pair of ints"),
        ("two", ((1, 2, 2, 2), 1), None, 0.0, TypeError, r"window\[0\] must be an int or a pair .*5, 5\]"),
        ("two", (2,), None, 0.0, TypeError, r"tuple of 2 inputs, so window must be one per input"),
        ("two", ((2, 2), (5,)), None, 0.0, ValueError, r"window \(5,\) must be positive and fit x\[1\]"),
        ("two", ((2, 2), 2), (1, 3), 0.0, ValueError, r"stride \(3,\) larger than the window \(2,\)"),
        ("two", 2, None, torch.zeros(4), TypeError, r"one per input"),
        ("two", 2, None, (0.0, torch.zeros(5)), ValueError, r"baseline\[1\] of shape \[5\] does not"),
        ("two", 2, None, (0.0,), TypeError, r"one per input; got 1 entries for 2 inputs"),
        ("tab", 2, None, "zero", TypeError, r"baseline must be a number or a tensor"),
        ("sig", 3, 0, 0.0, ValueError, r"stride must be positive"),
    ],
)
def test_bad_windows_strides_and_baselines(
    x: str, window: Any, stride: Any, baseline: Any, error: type[Exception], match: str, randn: Randn
) -> None:
    inputs = {"tab": randn(0, 2, 6), "sig": randn(0, 2, 2, 9), "img": randn(0, 2, 3, 5, 5),
              "two": (randn(0, 2, 2, 5, 5), randn(1, 2, 4))}[x]
    with pytest.raises(error, match=match):
        occlusion(Untouchable(), inputs, 0, window=window, stride=stride, baseline=baseline)


def test_tuples_of_different_batch_sizes_and_bad_forward_args(randn: Randn) -> None:
    with pytest.raises(ValueError, match=r"share the batch size B; got \[2, 3\]"):
        occlusion(Untouchable(), (randn(0, 2, 4), randn(1, 3, 4)), 0, window=1)
    with pytest.raises(ValueError, match=r"forward_args\[0\] has shape \[3, 4\]"):
        occlusion(Untouchable(), randn(0, 2, 4), 0, window=1, forward_args=(randn(1, 3, 4),))


def test_the_default_batch_counts_every_input_of_a_tuple() -> None:
    image = torch.zeros(1, 3, 224, 224)
    assert default_batch_size(image) == 8
    assert default_batch_size((image, torch.zeros(1, 40_000))) == 6  # 1.2 M values / 190,528 a row
