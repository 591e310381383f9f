"""Score-CAM over tuple inputs with extra forward arguments and callable targets, against a per-example,
per-channel float64 reference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import seeded
from input_kinds import TwoInputs
from torch import Tensor, nn

from torchvis.methods.score import score_cam

Randn = Callable[..., Tensor]


def reference(model: nn.Module, image: Tensor, meta: Tensor, gain: Tensor, bias: Tensor,
              score: Callable[[Tensor, int], Tensor]) -> Tensor:
    """Wang et al. 2020 one example and one channel at a time: the layer ``conv``'s channel upsampled
    bilinearly and min-max normalised masks the image; ``score(output, b)`` weighs it."""
    stored: list[Tensor] = []
    handle = model.conv.register_forward_hook(lambda m, i, out: stored.append(out.detach().clone()))
    try:
        with torch.no_grad():
            model(image, meta, gain, bias=bias)
    finally:
        handle.remove()
    activation = stored[0]
    maps = []
    for b in range(image.shape[0]):
        heat = torch.zeros(1, 1, *image.shape[2:], dtype=image.dtype)
        for k in range(activation.shape[1]):
            channel = activation[b, k]
            if channel.max() == channel.min():
                continue
            up = F.interpolate(channel[None, None], size=image.shape[2:], mode="bilinear",
                               align_corners=False)
            mask = (up - up.min()) / (up.max() - up.min())
            with torch.no_grad():
                out = model(image[b : b + 1] * mask, meta[b : b + 1], gain[b : b + 1], bias=bias)
            heat += score(out, b) * up
        maps.append(heat.clamp_min(0)[0])
    return torch.stack(maps)


@pytest.mark.parametrize("batch_size", [1, 4, None])
def test_two_inputs_mask_the_first_and_take_the_arguments_per_row(
    batch_size: int | None, randn: Randn
) -> None:
    model = seeded(5, TwoInputs)
    image, meta, gain, bias = randn(1, 3, 2, 5, 5), randn(2, 3, 4), randn(3, 3).exp(), randn(4, 1, 3)
    target = [0, 2, 1]
    got = score_cam(model, (image, meta), target, layer="conv", batch_size=batch_size, forward_args=(gain,),
                    forward_kwargs={"bias": bias})
    expected = reference(model, image, meta, gain, bias, lambda out, b: out.softmax(dim=1)[0, target[b]])
    assert got.shape == (3, 1, 5, 5)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_a_callable_target_weighs_channels_by_its_own_score(randn: Randn) -> None:
    model = seeded(6, TwoInputs)
    image, meta, gain, bias = randn(5, 2, 2, 5, 5), randn(6, 2, 4), randn(7, 2).exp(), randn(8, 1, 3)

    def margin(output: Any) -> Tensor:
        return output[:, 1] - output[:, 0]

    got = score_cam(model, (image, meta), margin, layer="conv", batch_size=3, forward_args=gain,
                    forward_kwargs={"bias": bias})
    expected = reference(model, image, meta, gain, bias, lambda out, b: margin(out)[0])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_a_plain_function_is_refused_with_what_to_pass(randn: Randn) -> None:
    model = seeded(5, TwoInputs)
    x = (randn(1, 2, 2, 5, 5), randn(2, 2, 4))
    with pytest.raises(TypeError, match=r"needs an nn.Module"):
        score_cam(lambda image, meta: model(image, meta, torch.ones(2)), x, layer="conv")


def test_an_index_into_a_larger_output_weighs_channels_by_the_raw_value(randn: Randn) -> None:
    model = seeded(7, TwoInputs)
    image, meta, gain, bias = randn(9, 2, 2, 5, 5), randn(10, 2, 4), randn(11, 2).exp(), randn(12, 1, 3)

    class Columns(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, image: Tensor, meta: Tensor, gain: Tensor, *, bias: Tensor) -> Tensor:
            return self.inner(image, meta, gain, bias=bias)[:, :, None]  # [B, 3, 1]

    got = score_cam(Columns(), (image, meta), (1, 0), layer="inner.conv", forward_args=(gain,),
                    forward_kwargs={"bias": bias})
    expected = reference(model, image, meta, gain, bias, lambda out, b: out[0, 1])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
