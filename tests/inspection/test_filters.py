"""torchvis.filters: one symmetric scale per layer, the three layouts, pixel positions, errors, logging."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from torchvis.apps.digits import DigitsCNN
from torchvis.inspection.conv_filters import (
    MAX_TILES,
    conv_layers,
    filter_grid,
    filters,
    log_filters,
    upscale,
)


def conv(cin: int, cout: int, k: int = 3) -> nn.Conv2d:
    layer = nn.Conv2d(cin, cout, k)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(cin)))
    return layer


def drawn(w: torch.Tensor, scale: float) -> torch.Tensor:
    return 0.5 + 0.5 * w / scale


def digits() -> DigitsCNN:
    return DigitsCNN(generator=torch.Generator().manual_seed(0))


def test_twice_the_weights_is_twice_as_far_from_grey() -> None:
    layer = nn.Conv2d(1, 2, 3, bias=False)
    base = torch.linspace(-0.25, 0.5, 9).view(1, 3, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.stack([base, 2 * base]))
    tiles = filters(layer)
    assert tiles.shape == (2, 1, 3, 3)
    torch.testing.assert_close(tiles[1] - 0.5, 2 * (tiles[0] - 0.5), rtol=0, atol=1e-7)
    assert tiles[1].max() == 1.0 and tiles[1].min() == 0.25  # the layer's max |w| (1.0) is white
    torch.testing.assert_close(tiles, drawn(layer.weight.detach(), 1.0), rtol=0, atol=0)


def test_rgb_first_layer_is_colour_with_one_scale() -> None:
    layer = conv(3, 4, 2)
    w = layer.weight.detach()
    tiles = filters(layer)
    assert tiles.shape == (4, 3, 2, 2)
    torch.testing.assert_close(tiles, drawn(w, w.abs().max().item()))


def test_deeper_layer_is_one_grey_tile_per_pair_filter_major() -> None:
    layer = conv(2, 3)
    w = layer.weight.detach()
    tiles = filters(layer)
    assert tiles.shape == (6, 1, 3, 3)
    scale = w.abs().max().item()
    for o in range(3):
        for i in range(2):
            torch.testing.assert_close(tiles[2 * o + i, 0], drawn(w[o, i], scale))


def test_selections_keep_the_layer_scale() -> None:
    layer = conv(3, 4)
    w = layer.weight.detach()
    scale = w.abs().max().item()
    picked = filters(layer, in_channel=1, out_channels=[3, 0])
    assert picked.shape == (2, 1, 3, 3)
    torch.testing.assert_close(picked[:, 0], drawn(w[[3, 0], 1], scale))


def test_zero_layer_is_grey_and_default_layer_is_the_first_conv() -> None:
    model = digits()
    assert conv_layers(model) == ["conv1", "conv2"]
    torch.testing.assert_close(filters(model), filters(model, "conv1"), rtol=0, atol=0)
    assert filters(model).shape == (32, 1, 3, 3)
    with torch.no_grad():
        model.conv2.weight.zero_()
    assert torch.equal(filters(model, model.conv2), torch.full((64 * 32, 1, 3, 3), 0.5))


def test_grid_pixels_are_nearest_neighbour_blocks() -> None:
    layer = conv(1, 2)
    tiles = filters(layer)
    image = filter_grid(layer, tile=24)  # 3x3 -> 24x24 blocks of 8, two tiles in one row
    assert image.shape == (3, 1 + 25, 1 + 2 * 25)
    for t in range(2):
        for r in range(3):
            for c in range(3):
                top, left = 1 + 8 * r, 1 + 25 * t + 8 * c
                block = image[:, top : top + 8, left : left + 8]
                assert torch.equal(block, tiles[t, 0, r, c].expand(3, 8, 8))
    assert torch.equal(image[:, 0], torch.ones(3, image.shape[2]))  # white padding


def test_pairs_layout_has_one_row_per_filter() -> None:
    layer = conv(2, 3)
    image = filter_grid(layer, tile=3)
    tiles = filters(layer)
    assert image.shape == (3, 1 + 3 * 4, 1 + 2 * 4)
    assert torch.equal(image[0, 1 + 4 * 2 : 4 * 3, 1 + 4 : 4 * 2], tiles[2 * 2 + 1, 0])  # filter 2, input 1


def test_upscale() -> None:
    x = torch.arange(6.0).view(1, 1, 2, 3)
    assert torch.equal(upscale(x, 7), x.repeat_interleave(2, 2).repeat_interleave(2, 3))
    assert torch.equal(upscale(x, 2), x)


def test_bad_layers_and_indices() -> None:
    model = digits()
    with pytest.raises(ValueError, match=r"'relu1' \(ReLU\) has no weights; Conv2d layers: 'conv1', 'conv2'"):
        filters(model, "relu1")
    with pytest.raises(ValueError, match=r"'pool' \(MaxPool2d\) has no weights"):
        filters(model, "pool")
    with pytest.raises(ValueError, match=r"'fc1' \(Linear\) is not an nn.Conv2d"):
        filters(model, "fc1")
    with pytest.raises(ValueError, match="unknown layer 'conv3'"):
        filters(model, "conv3")
    message = r"out channel 64 is out of range: layer 'conv2' has 64 out channels \(0..63\)"
    with pytest.raises(ValueError, match=message):
        filters(model, "conv2", out_channels=[0, 64])
    with pytest.raises(ValueError, match="in channel -1 is out of range"):
        filters(model, "conv2", in_channel=-1)
    with pytest.raises(ValueError, match="no out channels chosen; layer 'conv2' has 64"):
        filters(model, "conv2", out_channels=[])
    with pytest.raises(ValueError, match="has no nn.Conv2d layer"):
        filters(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=f"more than {MAX_TILES}"):
        filter_grid(nn.Conv2d(128, 64, 1))
    assert filter_grid(nn.Conv2d(128, 64, 1), in_channel=5).shape[0] == 3
    lazy = nn.Sequential(nn.LazyConv2d(4, 3))
    with pytest.raises(ValueError, match="not yet initialised"):
        filters(lazy)


def test_log_filters_round_trip(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model = digits()
    with SummaryWriter(str(tmp_path)) as writer:
        log_filters(writer, model, "conv2", step=5, in_channel=3)
    acc = EventAccumulator(str(tmp_path), size_guidance={IMAGES: 0})
    acc.Reload()
    (event,) = acc.Images("filters/conv2")
    assert event.step == 5
    pixels = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    expected = filter_grid(model, "conv2", in_channel=3).permute(1, 2, 0).numpy()
    assert pixels.shape == expected.shape
    assert np.array_equal(pixels, np.round(expected * 255).astype(np.uint8))
