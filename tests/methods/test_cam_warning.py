"""A CAM that is exactly zero for some examples says so, with how many and what to try instead."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

import torchvis
from torchvis.methods.cam import EmptyMapWarning, warn_if_empty


class OffsetCNN(nn.Module):
    """A 1x1 convolution ``x - 10`` (negative unless a pixel exceeds 10), ReLU, average pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.relu = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 2))
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.fill_(-10.0)
            self.head[2].weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.head[2].bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.relu(self.conv(x)))


def batch() -> Tensor:
    """Three examples; only the second has a pixel above 10, so only its CAM for class 0 is non-zero."""
    x = torch.zeros(3, 1, 4, 4)
    x[1, 0, 1, 2] = 20.0
    return x


def test_grad_cam_before_the_relu_warns_with_the_count_and_the_layer_after() -> None:
    with pytest.warns(EmptyMapWarning, match=r"CAM at 'conv' is exactly zero for 2 of 3 examples") as caught:
        heat = torchvis.grad_cam(OffsetCNN(), batch(), target=0, layer="conv")
    message = str(caught[0].message)
    assert "outputs negative values" in message and "activation after it" in message
    assert caught[0].filename == __file__  # points at the caller
    assert [bool(h.any()) for h in heat] == [False, True, False]


def test_a_zero_map_at_a_non_negative_layer_warns_without_the_activation_hint() -> None:
    with pytest.warns(EmptyMapWarning, match="zero for 3 of 3") as caught:
        torchvis.grad_cam(OffsetCNN(), batch(), target=1, layer="relu")  # class 1 weighs the ReLU by -1
    assert "negative values" not in str(caught[0].message)


def test_explain_warns_too_and_an_informative_map_does_not() -> None:
    with pytest.warns(EmptyMapWarning, match="zero for 2 of 3"):
        torchvis.explain(OffsetCNN(), batch(), 0, methods=["grad_cam"], layer="conv")
    x = batch()[1:2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torchvis.grad_cam(OffsetCNN(), x, target=0, layer="conv")
        warn_if_empty(torch.ones(2, 1, 3, 3), -torch.ones(2, 4, 3, 3), "x")


def test_a_signed_map_is_empty_only_where_every_value_is_zero() -> None:
    heat = torch.zeros(4, 1, 2, 3)
    heat[0, 0, 1, 2] = -0.5  # relu=False keeps signs: negative somewhere is not empty
    heat[1, 0, 0, 0] = 2.0
    heat[2] = -1.0
    with pytest.warns(EmptyMapWarning, match="exactly zero for 1 of 4 examples"):
        warn_if_empty(heat, torch.ones(4, 2, 2, 3), "layer")
