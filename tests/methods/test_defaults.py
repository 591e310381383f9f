"""Occlusion's default stride, pinned against the naive reference with the stride written out."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import references as ref
import torch
from torch import Tensor, nn

from torchvis.methods.perturbation import occlusion


@pytest.mark.parametrize(
    "window, half",
    [((5, 6), (2, 3)), ((3, 3), (1, 1)), ((1, 1), (1, 1))],
    ids=["rectangular", "odd-rounds-down", "one-pixel-still-moves"],
)
def test_occlusion_default_stride_is_half_the_window(
    window: tuple[int, int],
    half: tuple[int, int],
    small_cnn: Callable[[int], nn.Module],
    randn: Callable[..., Tensor],
) -> None:
    # 11x12 with a (5, 6) window: rows start at 0, 2, 4, 6 and columns at 0, 3, 6 only at half-window
    # steps; a stride of the whole window, rounding up, or the axes swapped give other windows.
    model, x = small_cnn(0), randn(0, 2, 3, 11, 12)
    with torch.no_grad():
        target = model(x).argmax(dim=1)
    expected = ref.occlusion(model, x, target, window, half)
    got = occlusion(model, x, window=window if window[0] != window[1] else window[0])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
