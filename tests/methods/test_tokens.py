"""Layer methods on token and channels-last layers: ``reshape=None | "auto" | callable``, on a
hand-built token model, torchvision's vit_b_16 and swin_t (random weights) and a small ViT."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import swin_t, vit_b_16
from torchvision.models.vision_transformer import VisionTransformer

import torchvis
from torchvis.core import layouts
from torchvis.methods import METHODS, explain

GRADIENT_CAMS = ["grad_cam", "grad_cam_pp", "xgrad_cam", "layer_cam", "hires_cam"]


def randn(seed: int, *shape: int) -> Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build().double().eval()
        head = getattr(getattr(model, "heads", None), "head", None)
        if isinstance(head, nn.Linear):
            nn.init.normal_(head.weight)  # torchvision zeroes a ViT's head: every gradient would be 0
        return model


class Tokens(nn.Module):
    """Patches (conv_proj) -> [B,N,D] tokens behind a class token -> ``block`` -> head on the token mean."""

    def __init__(self, patch: int = 4, dim: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.block = nn.Identity()
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        patches = self.conv_proj(x).flatten(2).transpose(1, 2)
        tokens = self.block(torch.cat([self.cls.expand(x.shape[0], -1, -1), patches], dim=1))
        return self.head(tokens.mean(dim=1))


def tokens_to_map(grid: tuple[int, int]) -> Callable[[Tensor], Tensor]:
    """The manual reshape: drop the class token, lay the patches on their grid, channels first."""
    return lambda t: t[:, 1:].reshape(t.shape[0], *grid, t.shape[2]).permute(0, 3, 1, 2)


def test_token_model_grad_cam_has_the_closed_form() -> None:
    # Score = w_c . mean over 1+N tokens: the gradient at every token is w_c / (N+1), so Grad-CAM at the
    # tokens is ReLU(w_c . patch_embedding(i,j)) / (N+1) on the patch grid.
    model, x = seeded(0, Tokens), randn(1, 2, 3, 12, 16)
    patches = model.conv_proj(x).detach()  # [2, 6, 3, 4]
    w = model.head.weight[2].detach()
    expected = F.relu((w[None, :, None, None] * patches).sum(dim=1, keepdim=True) / (3 * 4 + 1))
    for reshape in ["auto", tokens_to_map((3, 4))]:
        got = torchvis.grad_cam(model, x, 2, layer="block", reshape=reshape, upsample=None)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    up = F.interpolate(expected, size=(12, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(torchvis.grad_cam(model, x, 2, layer="block", reshape="auto"), up,
                               rtol=1e-12, atol=1e-12)


def test_auto_layout_reads_tokens_and_channels_last_maps() -> None:
    t = randn(2, 2, 1 + 3 * 4, 5)
    torch.testing.assert_close(layouts.auto_layout(t, (12, 16), "x"), tokens_to_map((3, 4))(t))
    torch.testing.assert_close(layouts.auto_layout(t[:, 1:], (12, 16), "x"), tokens_to_map((3, 4))(t))
    # With the model's patch size: 13 tokens for 8x8 patches of 24x32 is 3x4 after a class token.
    torch.testing.assert_close(layouts.auto_layout(t, (24, 32), "x", patch=8), tokens_to_map((3, 4))(t))
    channels_last = randn(3, 2, 7, 7, 96)  # a Swin stage on 224x224
    assert torch.equal(layouts.auto_layout(channels_last, (224, 224), "x"), channels_last.permute(0, 3, 1, 2))
    conv = randn(4, 2, 64, 56, 56)  # read channels first, though (64, 56) would fit too
    assert layouts.auto_layout(conv, (224, 224), "x") is conv
    cube = randn(4, 2, 7, 7, 7)  # either way is as good: channels first
    assert layouts.auto_layout(cube, (28, 28), "x") is cube
    first_stage = randn(5, 1, 56, 56, 96)  # (56, 96) fits 224x224 within 2x, (56, 56) exactly
    assert layouts.auto_layout(first_stage, (224, 224), "x").shape == (1, 96, 56, 56)
    assert layouts.patch_size(vit_b_16(weights=None, image_size=32)) == 16
    assert layouts.patch_size(seeded(0, Tokens)) == 4


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    return seeded(1, lambda: vit_b_16(weights=None, image_size=32))


def vit_layers(model: nn.Module) -> list[str]:
    return ["encoder.layers.encoder_layer_10", "encoder.layers.encoder_layer_11.ln_1"]


def test_vit_b_16_every_gradient_cam_auto_equals_manual(vit: nn.Module) -> None:
    x = randn(2, 2, 3, 32, 32)
    methods = [*GRADIENT_CAMS, "guided_grad_cam"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GELUs are not rewritten by guided backprop; it says so
        auto = explain(vit, x, 1, methods=methods, layer=vit_layers(vit), reshape="auto")
        manual = explain(vit, x, 1, methods=methods, layer=vit_layers(vit), reshape=tokens_to_map((2, 2)))
    assert auto.keys() == manual.keys() and len(auto) == 2 * len(methods)
    for key in auto:
        assert auto[key].shape[-2:] == (32, 32)
        assert torch.equal(auto[key], manual[key]), key
    assert any(bool(auto[key].abs().sum() > 0) for key in auto)
    # Each method alone gives the same map as explain's shared pass.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = torchvis.layer_cam(vit, x, 1, layer=vit_layers(vit)[1], reshape="auto")
    assert torch.equal(alone, auto[f"layer_cam/{vit_layers(vit)[1]}"])


def test_vit_layer_none_takes_the_last_block_norm(vit: nn.Module) -> None:
    x = randn(3, 1, 3, 32, 32)  # one example: the map at the last block is not empty for it
    with pytest.warns(UserWarning, match=r"layer=None: using 'encoder\.layers\.encoder_layer_11\.ln_1'"):
        picked = torchvis.grad_cam(vit, x, 4)
    explicit = torchvis.grad_cam(vit, x, 4, layer="encoder.layers.encoder_layer_11.ln_1", reshape="auto")
    assert torch.equal(picked, explicit) and bool(picked.sum() > 0)
    with pytest.warns(UserWarning, match=r"layer=None: using 'encoder\.layers\.encoder_layer_11\.ln_1'"):
        maps = explain(vit, x, 4, methods=["grad_cam", "hires_cam"])
    assert torch.equal(maps["grad_cam"], explicit)
    # The final encoder norm sees only the class token's gradient: its patch tokens give a zero map.
    with pytest.warns(torchvis.methods.cam.EmptyMapWarning):
        zero = torchvis.grad_cam(vit, x, 4, layer="encoder.ln", reshape="auto")
    assert not zero.any()


def test_swin_t_stages_auto_equals_manual() -> None:
    model = seeded(2, lambda: swin_t(weights=None, num_classes=5))
    x = randn(4, 1, 3, 64, 64)
    layers = ["features.1", "features.5", "norm"]
    auto = explain(model, x, 2, methods=GRADIENT_CAMS, layer=layers, reshape="auto", upsample=None)
    manual = explain(model, x, 2, methods=GRADIENT_CAMS, layer=layers,
                     reshape=lambda t: t.permute(0, 3, 1, 2), upsample=None)
    for key in auto:
        assert torch.equal(auto[key], manual[key]), key
    assert auto["grad_cam/features.1"].shape == (1, 1, 16, 16)
    assert auto["grad_cam/norm"].shape == (1, 1, 2, 2)


def small_vit() -> nn.Module:
    """Like the digits ViT: blocks named encoder.layers.encoder_layer_{i} with ln_1, patch 7 on 28x28."""
    return VisionTransformer(image_size=28, patch_size=7, num_layers=2, num_heads=2, hidden_dim=8,
                             mlp_dim=16, num_classes=4)


def test_small_vit_every_layer_method_auto_equals_manual() -> None:
    model, x = seeded(3, small_vit), randn(5, 2, 3, 28, 28)
    layer = "encoder.layers.encoder_layer_1.ln_1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in [*GRADIENT_CAMS, "guided_grad_cam", "score_cam"]:
            auto = METHODS[name](model, x, 3, layer=layer, reshape="auto")
            manual = METHODS[name](model, x, 3, layer=layer, reshape=tokens_to_map((4, 4)))
            assert torch.equal(auto, manual), name
            assert torch.equal(auto, METHODS[name](model, x, 3)), name  # layer=None picks it, reads it "auto"


def test_reshape_errors_leave_the_model_untouched() -> None:
    model, x = seeded(4, Tokens), randn(6, 2, 3, 12, 16)
    wrong_rank = (r"reshape of layer 'block' \(output \[2, 13, 6\]\) gave shape \[2, 6, 12\]; "
                  r"it must give \[B,K,\*spatial\] with B=2 and 2 spatial")
    with pytest.raises(ValueError, match=wrong_rank):
        torchvis.grad_cam(model, x, layer="block", reshape=lambda t: t[:, 1:].transpose(1, 2))
    with pytest.raises(ValueError, match=r"gave list"):
        torchvis.grad_cam(model, x, layer="block",
                          reshape=lambda t: [t])  # type: ignore[arg-type, return-value]
    with pytest.raises(ValueError, match=r"cannot infer the token grid of layer 'block': output \[2, 10, 6\] "
                                         r"\(10 tokens\) for an input of 12x15 \(patch size 4\)"):
        torchvis.grad_cam(model, x[..., :15], layer="block", reshape="auto")
    with pytest.raises(ValueError, match=r"cannot read layer 'up': output \[2, 6, 40, 40\] is neither"):
        layouts.auto_layout(randn(7, 2, 6, 40, 40), (12, 16), "up")
    with pytest.raises(ValueError, match=r"reshape must be None, 'auto' or a callable; got 'tokens'"):
        torchvis.grad_cam(model, x, layer="block", reshape="tokens")
    # Without reshape, tokens [B,N,D] would read as N channels along D: a 1-D map of an image.
    rank = (r"input's 2 spatial dimension\(s\), \[B,K,\*spatial\]; got shape \[2, 13, 6\] from layer "
            r"'block' for an input of shape \[2, 3, 12, 16\]. Tokens \[B,N,D\] or a channels-last map\? "
            r"pass reshape='auto'")
    with pytest.raises(ValueError, match=rank):
        torchvis.grad_cam(model, x, layer="block")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(not m.training for m in model.modules()) and all(p.grad is None for p in model.parameters())


def test_smoothgrad_of_grad_cam_in_explain_on_a_vit_reads_the_tokens() -> None:
    """SmoothGrad of Grad-CAM beside Grad-CAM, ``layer=None``, on a ViT: the automatic layer is the
    last block's ``ln_1`` read with ``reshape='auto'``, for the smoothed CAM as for the plain one;
    and the CAM's options (``relu``) reach both."""
    model, x = seeded(3, small_vit), randn(4, 2, 3, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        maps = torchvis.explain(model, x, methods=["grad_cam", "smoothgrad"], method="grad_cam", samples=2,
                                relu=False)
        direct = torchvis.smoothgrad(model, x, method="grad_cam", samples=2, relu=False)
    assert torch.equal(maps["smoothgrad"], direct)
    assert torch.equal(maps["grad_cam"], torchvis.grad_cam(model, x, relu=False))
    assert (maps["smoothgrad"] < 0).any()  # relu=False reached the smoothed CAM too
