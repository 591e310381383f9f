"""torchvis.features: activations equal a manual hook's, channel choice, top-k, tile pixels, logging."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from torchvis.apps.digits import DigitsCNN
from torchvis.inspection.features import feature_grid, feature_maps, log_feature_maps, top_channels


def digits() -> DigitsCNN:
    return DigitsCNN(generator=torch.Generator().manual_seed(0))


def inputs(b: int = 2) -> Tensor:
    return torch.randn(b, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def manual(model: nn.Module, x: Tensor, layer: nn.Module) -> Tensor:
    """What a plain forward hook sees, in eval mode."""
    seen: list[Tensor] = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[-1]


@pytest.mark.parametrize("layer", ["conv1", "relu2", "pool"])
def test_equals_a_manual_forward_hook(layer: str) -> None:
    model, x = digits(), inputs()
    got = feature_maps(model, x, layer)
    assert torch.equal(got, manual(model, x, dict(model.named_modules())[layer]))


def test_equals_manual_hook_with_in_place_relu() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(inplace=True), nn.Conv2d(3, 2, 1))
    x = inputs(1)
    expected = manual(model, x, model[0])  # pre-ReLU values: the in-place ReLU must not change them
    assert (expected < 0).any()
    assert torch.equal(feature_maps(model, x, "0"), expected)


def test_channels_pick_in_order() -> None:
    model, x = digits(), inputs()
    full = feature_maps(model, x, "conv2")
    assert torch.equal(feature_maps(model, x, "conv2", channels=[5, 0, 63]), full[:, [5, 0, 63]])


def test_top_k_per_example_by_mean_activation() -> None:
    # An identity model: the maps are the input, with chosen channel means per example.
    means = torch.tensor([[1.0, 5.0, 3.0, 5.0], [4.0, -1.0, 0.0, 2.0]])
    x = means[:, :, None, None] + torch.tensor([[1.0, -1.0], [-1.0, 1.0]])  # zero-mean pattern
    model = nn.Sequential(nn.Identity())
    assert top_channels(x, 4).tolist() == [[1, 3, 2, 0], [0, 3, 2, 1]]  # tie 1/3: lower index first
    top = feature_maps(model, x, "0", top_k=2)
    assert torch.equal(top, torch.stack([x[0, [1, 3]], x[1, [0, 3]]]))


def test_grid_tiles_are_min_max_scaled_per_channel() -> None:
    maps = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]], [[7.0, 7.0], [7.0, 7.0]], [[-2.0, 0.0], [0.0, -1.0]]]])
    assert feature_grid(maps, tile=4).shape == (1, 3, 1 + 5, 1 + 3 * 5)  # by default 3 tiles fill one row
    image = feature_grid(maps, tile=4, nrow=2)  # 2x2 -> 4x4 blocks of 2; 3 tiles, nrow 2
    assert image.shape == (1, 3, 1 + 2 * 5, 1 + 2 * 5)
    expected = [torch.tensor([[0, 1 / 3], [2 / 3, 1]]), torch.zeros(2, 2), torch.tensor([[0, 1], [1, 0.5]])]
    for t, tile in enumerate(expected):
        top, left = 1 + 5 * (t // 2), 1 + 5 * (t % 2)
        got = image[0, :, top : top + 4 : 2, left : left + 4 : 2]
        torch.testing.assert_close(got, tile.expand(3, 2, 2), rtol=0, atol=1e-7)
        assert torch.equal(image[0, :, top : top + 4, left : left + 4],
                           got.repeat_interleave(2, 1).repeat_interleave(2, 2))
    assert torch.equal(image[0, :, 6:, 6:], torch.ones(3, 5, 5))  # the empty fourth cell is padding


def test_grid_colour_map_and_bad_maps() -> None:
    maps = torch.arange(8.0).view(2, 1, 2, 2)
    image = feature_grid(maps, tile=2, cmap="gray")
    assert torch.equal(image[0, :, 1:3, 1:3], image[1, :, 1:3, 1:3])  # each example scaled on its own
    torch.testing.assert_close(image[0, :, 2, 2], torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        feature_grid(torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match=r"\[B,K,h,w\]"):
        feature_grid(torch.zeros(1, 2, 2))


def test_bad_input_messages() -> None:
    model, x = digits(), inputs(1)
    message = r"channel 32 is out of range: layer 'conv1' has 32 channels \(0..31\)"
    with pytest.raises(ValueError, match=message):
        feature_maps(model, x, "conv1", channels=[0, 32])
    with pytest.raises(ValueError, match="channel -1 is out of range"):
        feature_maps(model, x, "conv1", channels=[-1])
    with pytest.raises(ValueError, match="no channels chosen; layer 'conv1' has 32"):
        feature_maps(model, x, "conv1", channels=[])
    with pytest.raises(ValueError, match="top_k must be between 1 and the layer's 32 channels, got 33"):
        feature_maps(model, x, "conv1", top_k=33)
    with pytest.raises(ValueError, match="channels or top_k, not both"):
        feature_maps(model, x, "conv1", channels=[1], top_k=1)
    with pytest.raises(ValueError, match=r"'fc1' outputs shape \[1, 128\], not a feature map.*'pool'"):
        feature_maps(model, x, "fc1")
    with pytest.raises(ValueError, match="unknown layer 'conv'"):
        feature_maps(model, x, "conv")
    with pytest.raises(ValueError, match=r"add a batch dimension"):
        feature_maps(model, x[0], "conv1")


def test_model_left_as_it_was() -> None:
    model, x = digits(), inputs()
    model.train()
    model.conv2.eval()
    modes = [m.training for m in model.modules()]
    x0, rng = x.clone(), torch.get_rng_state()
    feature_maps(model, x, "relu2", top_k=3)
    assert [m.training for m in model.modules()] == modes
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(x, x0) and torch.equal(torch.get_rng_state(), rng)


def test_log_feature_maps_round_trip(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model, x = digits(), inputs()
    with SummaryWriter(str(tmp_path)) as writer:
        log_feature_maps(writer, model, x, "conv2", step=2, top_k=4)
    acc = EventAccumulator(str(tmp_path), size_guidance={IMAGES: 0})
    acc.Reload()
    assert sorted(acc.Tags()["images"]) == ["features/conv2/0", "features/conv2/1"]
    grids = feature_grid(feature_maps(model, x, "conv2", top_k=4))
    for b in range(2):
        (event,) = acc.Images(f"features/conv2/{b}")
        assert event.step == 2
        pixels = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        assert np.array_equal(pixels, np.round(grids[b].permute(1, 2, 0).numpy() * 255).astype(np.uint8))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_maps_and_logging(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    model, x = digits(), inputs()
    expected = feature_maps(model, x, "conv2", top_k=3)
    got = feature_maps(model.cuda(), x.cuda(), "conv2", top_k=3)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)
    with SummaryWriter(str(tmp_path)) as writer:
        log_feature_maps(writer, model, x.cuda(), "conv2", top_k=3)


def test_png_writer_sink(tmp_path: Path) -> None:
    from torchvis.tracking.tensorboard import PNGWriter

    model, x = digits(), inputs(1)
    with PNGWriter(tmp_path) as writer:
        log_feature_maps(writer, model, x, "pool", step=7, channels=[0, 1, 2])
    (png,) = tmp_path.rglob("*.png")
    pixels = np.asarray(Image.open(png).convert("RGB"))
    grid = feature_grid(feature_maps(model, x, "pool", channels=[0, 1, 2]))[0]
    assert np.array_equal(pixels, np.round(grid.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
