"""Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM and Score-CAM against naive float64 references written from
the papers' formulas, closed forms on a conv -> GAP -> linear model, and the shared pass of explain."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import references as ref
import torch
from torch import Tensor, nn

import torchvis
from torchvis.methods import explain
from torchvis.methods.cam_variants import grad_cam_pp, grad_cam_pp_heat, hires_cam, layer_cam, xgrad_cam
from torchvis.methods.score import score_cam

VARIANTS: dict[str, Callable[..., Tensor]] = {
    "grad_cam_pp": grad_cam_pp, "xgrad_cam": xgrad_cam, "layer_cam": layer_cam, "hires_cam": hires_cam,
}


def predicted(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).argmax(dim=1)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layer", ["conv1", "relu2", "conv3"])
def test_cam_variants_match_references(
    variant: str, layer: str, small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    """conv1 has signed activations; relu2 feeds a max-pool, so most of its gradient is exactly 0
    (Grad-CAM++'s zero denominators)."""
    for seed in (0, 1):
        model, x = small_cnn(seed), randn(seed, 3, 3, 8, 8)
        t = torch.tensor([1, 4, 0])
        for relu, upsample in ((True, True), (False, False)):
            got = VARIANTS[variant](model, x, t, layer=layer, relu=relu, upsample=upsample)
            expected = ref.layer_cam_family(model, x, t, layer, variant, relu=relu, upsample=upsample)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        assert expected.abs().sum() > 0 and got.dtype == torch.float64


def dead_and_constant(model: nn.Module) -> nn.Module:
    """``conv1``'s channel 0 is dead after the ReLU (sum of A = 0) and channel 1 is the constant 2."""
    with torch.no_grad():
        model.conv1.bias[0] = -1e3  # type: ignore[index, union-attr]
        model.conv1.weight[1] = 0  # type: ignore[index, union-attr]
        model.conv1.bias[1] = 2.0  # type: ignore[index, union-attr]
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cam_variants_with_a_dead_channel(
    variant: str, small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    """A channel whose activations sum to 0 gets weight 0 (XGrad-CAM), never NaN."""
    model, x = dead_and_constant(small_cnn(2)), randn(2, 2, 3, 8, 8)
    t = predicted(model, x)
    got = VARIANTS[variant](model, x, t, layer="relu1", relu=False)
    torch.testing.assert_close(got, ref.layer_cam_family(model, x, t, "relu1", variant, relu=False))
    assert torch.isfinite(got).all()


def test_grad_cam_pp_differs_from_torchcams_divide_on_a_copy(
    small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    """torchcam 0.5 computes ``alpha = g**2; alpha[mask].div_(denominator[mask])``: boolean indexing
    makes a copy, so alpha stays g**2. That variant is far from the paper's formula, which the
    reference comparison above would therefore catch."""
    model, x = small_cnn(3), randn(3, 2, 3, 8, 8)
    t = predicted(model, x)
    shared = torchvis.shared_passes(model, x, t, layers=["conv2"])[0]
    a, g = shared.activation, shared.grad
    assert a is not None and g is not None
    g2 = g * g
    denominator = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g2 * g
    alpha = g2.clone()
    mask = g2 > 0
    alpha[mask].div_(denominator[mask])  # the bug: divides a copy
    assert torch.equal(alpha, g2)
    buggy = ((alpha * g.clamp_min(0)).sum(dim=(2, 3), keepdim=True) * a).sum(dim=1, keepdim=True)
    expected = ref.layer_cam_family(model, x, t, "conv2", "grad_cam_pp", relu=False, upsample=False)
    ours = grad_cam_pp_heat(a, g)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    assert (buggy - expected).abs().max() > 0.1 * expected.abs().max()


class ConvGapLinear(nn.Module):
    """conv -> ReLU -> global average pool -> linear, with hand-set linear weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            weights = [[1.0, -2.0, 0.5, 3.0], [-1.0, 0.25, 2.0, -0.5], [0.0, 1.0, -1.0, 2.0]]
            self.fc.weight.copy_(torch.tensor(weights))
            self.fc.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


def test_closed_forms_on_conv_gap_linear(
    seeded_model: Callable[[int, Callable[[], nn.Module]], nn.Module], randn: Callable[..., Tensor]
) -> None:
    """With ``A`` the ReLU output ``[B,K,h,w]`` and ``W`` the linear weights, the gradient is
    ``g_k = W[c,k] / (h w)`` everywhere: Grad-CAM, XGrad-CAM and HiResCAM are all ``sum_k W[c,k] A_k / (h w)``
    (CAM), LayerCAM is ``sum_k ReLU(W[c,k]) A_k / (h w)``, and Grad-CAM++'s weight is
    ``ReLU(g_k) / (2 + g_k sum A_k) * h w``."""
    model = seeded_model(0, ConvGapLinear)
    x = randn(5, 3, 2, 6, 5)
    t = torch.tensor([0, 1, 2])
    a = model.relu(model.conv(x)).detach()  # type: ignore[operator]
    hw = a.shape[2] * a.shape[3]
    w = model.fc.weight.detach()[t][:, :, None, None] / hw  # type: ignore[index, union-attr]
    cam = (w * a).sum(dim=1, keepdim=True)
    options = {"layer": "relu", "relu": False, "upsample": False}
    for method in (torchvis.grad_cam, xgrad_cam, hires_cam):
        torch.testing.assert_close(method(model, x, t, **options), cam, rtol=1e-12, atol=1e-14)
    positive = (w.clamp_min(0) * a).sum(dim=1, keepdim=True)
    torch.testing.assert_close(layer_cam(model, x, t, **options), positive, rtol=1e-12, atol=1e-14)
    alpha_weight = w.clamp_min(0) / (2 + w * a.sum(dim=(2, 3), keepdim=True)) * hw
    plus_plus = (alpha_weight * a).sum(dim=1, keepdim=True)
    torch.testing.assert_close(grad_cam_pp(model, x, t, **options), plus_plus, rtol=1e-12, atol=1e-14)
    assert cam.abs().min() > 0 and not torch.allclose(cam, positive)


def test_explain_runs_the_five_cams_from_one_forward_and_backward(
    small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    calls = []
    model, x = small_cnn(4), randn(4, 2, 3, 8, 8)
    handle = model.register_forward_pre_hook(lambda module, inputs: calls.append(1))
    try:
        cams = ["grad_cam", "grad_cam_pp", "xgrad_cam", "layer_cam", "hires_cam"]
        maps = explain(model, x, methods=[*cams, "saliency", "gradient_x_input"], layer=["conv2", "conv3"])
    finally:
        handle.remove()
    assert len(calls) == 1
    for name in cams:
        for layer in ("conv2", "conv3"):
            alone = torchvis.METHODS[name](model, x, layer=layer)
            torch.testing.assert_close(maps[f"{name}/{layer}"], alone, rtol=0, atol=0)
    torch.testing.assert_close(maps["gradient_x_input"], torchvis.gradient_x_input(model, x), rtol=0, atol=0)


# --- Score-CAM -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", ["relu1", "pool", "relu3"])
@pytest.mark.parametrize("batch_size", [1, 7, None])
def test_score_cam_matches_the_per_channel_loop(
    layer: str, batch_size: int | None, small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    model, x = dead_and_constant(small_cnn(5)), randn(5, 2, 3, 8, 8)
    t = torch.tensor([3, 1])
    got = score_cam(model, x, t, layer=layer, batch_size=batch_size)
    torch.testing.assert_close(got, ref.score_cam(model, x, t, layer), rtol=1e-10, atol=1e-12)
    assert got.shape == (2, 1, 8, 8) and got.abs().sum() > 0
    if batch_size is None:
        expected = ref.score_cam(model, x, predicted(model, x), layer)
        torch.testing.assert_close(score_cam(model, x, layer=layer), expected)


def test_score_cam_rectifies_after_upsampling(
    small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    """At a signed layer (conv3, 4x4 for an 8x8 input) the sum changes sign inside the image: the ReLU
    comes after the upsampling, as in the authors' code, and the two orders differ there."""
    model, x = small_cnn(2), randn(2, 2, 3, 8, 8)
    t = predicted(model, x)
    got = score_cam(model, x, t, layer="conv3")
    torch.testing.assert_close(got, ref.score_cam(model, x, t, "conv3"), rtol=1e-10, atol=1e-12)
    assert 0.2 < float((got > 0).double().mean()) < 0.8


def test_score_cam_skips_constant_channels_and_warns_when_all_are() -> None:
    """A channel constant at the layer carries no location (its mask would be 0/0): weight 0. When every
    channel is, the map is 0 and a warning says so."""
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 16, 3)).double().eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([-1.0, 2.0]))
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"every channel of layer '1' is constant.*\[0, 1\]"):
        assert torch.equal(score_cam(model, x, layer="1"), torch.zeros(2, 1, 4, 4, dtype=torch.float64))
    with torch.no_grad():
        model[0].weight[0] = 1.0  # channel 0 now follows the input
        model[0].bias[0] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = score_cam(model, x, 0, layer="1")
    torch.testing.assert_close(got, ref.score_cam(model, x, torch.tensor([0, 0]), "1"))
    assert got.abs().sum() > 0


def test_cam_family_refuses_a_layer_that_is_not_a_feature_map(
    small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    model, x = small_cnn(0), randn(0, 2, 3, 8, 8)
    for method, title in ((grad_cam_pp, "Grad-CAM\\+\\+"), (xgrad_cam, "XGrad-CAM"), (layer_cam, "LayerCAM"),
                          (hires_cam, "HiResCAM"), (score_cam, "Score-CAM")):
        with pytest.raises(ValueError, match=rf"{title} needs a layer whose output is a feature map"):
            method(model, x, layer="head.2")
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        score_cam(model, x, layer="conv2", batch_size=0)
