"""Layer methods beyond Conv2d feature maps: Conv1d and Conv3d layers, upsampling modes, one element
of a tuple output, a layer's input, wrapped models (torch.compile, DataParallel) and mixed precision."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from captum.attr import GuidedGradCam, LayerAttribution, LayerGradCam
from torch import Tensor, nn

import torchvis
from torchvis.core import hooks
from torchvis.methods import METHODS, explain

GRADIENT_CAMS = ["grad_cam", "grad_cam_pp", "xgrad_cam", "layer_cam", "hires_cam"]
LAYER_METHODS = [*GRADIENT_CAMS, "guided_grad_cam", "score_cam"]


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build().double().eval()


def randn(seed: int, *shape: int) -> Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def signal_net() -> nn.Module:
    """[B,2,L] -> conv1d -> ReLU -> conv1d -> ReLU -> GAP -> linear(3)."""
    return nn.Sequential(
        nn.Conv1d(2, 5, 3, padding=1), nn.ReLU(), nn.Conv1d(5, 4, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 3),
    )


def volume_net() -> nn.Module:
    """[B,1,D,H,W] -> conv3d -> ReLU -> conv3d -> ReLU -> GAP -> linear(3)."""
    return nn.Sequential(
        nn.Conv3d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv3d(3, 4, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 3),
    )


class Recurrent(nn.Module):
    """[B,C,L] -> LSTM over L (batch first) -> linear head on the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x.transpose(1, 2))
        return self.head(out[:, -1])


def layer_and_grad(model: nn.Module, x: Tensor, target: int, module: nn.Module, *, inputs: bool = False,
                   pick: Callable[[Any], Tensor] = lambda t: t) -> tuple[Tensor, Tensor]:
    """Reference: a layer's output (or first input) and the target logit's gradient there, by a plain
    forward hook and autograd."""
    seen: dict[str, Tensor] = {}
    handle = module.register_forward_hook(
        lambda m, i, o: seen.update(a=i[0] if inputs else pick(o)))
    try:
        out = model(x.clone().requires_grad_(True))
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(out[:, target].sum(), seen["a"])
    return seen["a"].detach(), grad


def naive_heat(name: str, a: Tensor, g: Tensor) -> Tensor:
    """The papers' formulas, written out for any number of spatial dimensions (float64)."""
    dims = tuple(range(2, a.dim()))
    if name == "grad_cam":
        w = g.mean(dim=dims, keepdim=True)
    elif name == "grad_cam_pp":
        den = 2 * g**2 + a.sum(dim=dims, keepdim=True) * g**3
        alpha = torch.where(den != 0, g**2 / torch.where(den != 0, den, 1.0), 0.0)
        w = (alpha * F.relu(g)).sum(dim=dims, keepdim=True)
    elif name == "xgrad_cam":
        total = a.sum(dim=dims, keepdim=True)
        weighted = (a * g).sum(dim=dims, keepdim=True)
        w = torch.where(total != 0, weighted / torch.where(total != 0, total, 1.0), 0.0)
    elif name == "layer_cam":
        return (F.relu(g) * a).sum(dim=1, keepdim=True)
    else:
        return (g * a).sum(dim=1, keepdim=True)
    return (w * a).sum(dim=1, keepdim=True)


# --- N-d CAMs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GRADIENT_CAMS)
@pytest.mark.parametrize("kind", ["signal", "volume"])
def test_every_cam_on_conv1d_and_conv3d_layers_matches_the_formula(name: str, kind: str) -> None:
    model, x = (seeded(1, signal_net), randn(2, 2, 2, 19)) if kind == "signal" else (
        seeded(0, volume_net), randn(1, 2, 1, 5, 7, 6))
    a, g = layer_and_grad(model, x, 1, model[3])
    heat = F.relu(naive_heat(name, a, g))
    got = METHODS[name](model, x, 1, layer="3", upsample=None)
    assert got.shape == (2, 1, *a.shape[2:])
    torch.testing.assert_close(got, heat, rtol=1e-12, atol=1e-12)
    mode = "linear" if kind == "signal" else "trilinear"
    up = F.interpolate(heat, size=x.shape[2:], mode=mode, align_corners=False)
    torch.testing.assert_close(METHODS[name](model, x, 1, layer="3"), up, rtol=1e-12, atol=1e-12)


def test_grad_cam_of_a_gap_linear_head_is_cam_on_a_signal() -> None:
    # Score = w_c . mean_l A[:, l] + b: the gradient at A is w_c / L everywhere, so
    # Grad-CAM = sum_k w_ck A_k / L.
    model, x = seeded(2, signal_net), randn(3, 2, 2, 16)
    a = model[:4](x)
    w = model[6].weight[2]
    expected = F.relu((w[None, :, None] * a).sum(dim=1, keepdim=True) / a.shape[-1])
    torch.testing.assert_close(torchvis.grad_cam(model, x, 2, layer="3", upsample=False), expected.detach(),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["signal", "volume"])
@pytest.mark.parametrize("layer_input", [False, True])
def test_grad_cam_matches_captum_layer_grad_cam(kind: str, layer_input: bool) -> None:
    model, x = (seeded(4, signal_net), randn(5, 3, 2, 23)) if kind == "signal" else (
        seeded(4, volume_net), randn(5, 2, 1, 6, 5, 7))
    captum = LayerGradCam(model, model[2]).attribute(
        x, target=2, relu_attributions=True, attribute_to_layer_input=layer_input)
    ours = torchvis.grad_cam(model, x, 2, layer="2", layer_input=layer_input, upsample=None)
    torch.testing.assert_close(ours, captum, rtol=1e-10, atol=1e-12)
    for mode, upsample in [("nearest", "nearest"), ("linear" if kind == "signal" else "trilinear", True)]:
        up = LayerAttribution.interpolate(captum, tuple(x.shape[2:]), interpolate_mode=mode)
        got = torchvis.grad_cam(model, x, 2, layer="2", layer_input=layer_input, upsample=upsample)
        torch.testing.assert_close(got, up, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["image", "signal"])
@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")
@pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU")
def test_guided_grad_cam_matches_captum_with_nearest_interpolation(kind: str) -> None:
    if kind == "image":
        model = seeded(6, lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)))
        x = randn(7, 2, 3, 9, 9)
    else:
        model, x = seeded(6, signal_net), randn(7, 2, 2, 21)
    captum = GuidedGradCam(model, model[3]).attribute(x, target=0, interpolate_mode="nearest")
    ours = torchvis.guided_grad_cam(model, x, 0, layer="3", upsample="nearest")
    torch.testing.assert_close(ours, captum, rtol=1e-10, atol=1e-12)
    # The default: the natural interpolation for the rank (bilinear for images, as before).
    cam = torchvis.grad_cam(model, x, 0, layer="3")
    torch.testing.assert_close(torchvis.guided_grad_cam(model, x, 0, layer="3"),
                               torchvis.guided_backprop(model, x, 0) * cam, rtol=1e-12, atol=1e-12)


def test_upsample_options() -> None:
    model, x = seeded(8, signal_net), randn(9, 2, 2, 17)
    layer = torchvis.grad_cam(model, x, 0, layer="3", upsample=None)
    assert layer.shape == (2, 1, 8)
    assert torch.equal(torchvis.grad_cam(model, x, 0, layer="3", upsample=False), layer)
    linear = F.interpolate(layer, size=17, mode="linear", align_corners=False)
    assert torch.equal(torchvis.grad_cam(model, x, 0, layer="3"), linear)
    assert torch.equal(torchvis.grad_cam(model, x, 0, layer="3", upsample="bilinear"), linear)
    assert torch.equal(torchvis.grad_cam(model, x, 0, layer="3", upsample="nearest"),
                       F.interpolate(layer, size=17, mode="nearest"))
    with pytest.raises(ValueError, match="upsample must be True, 'bilinear', 'nearest', None or False"):
        torchvis.grad_cam(model, x, 0, layer="3", upsample="bicubic")
    with pytest.raises(ValueError, match="upsample cannot be None"):
        torchvis.guided_grad_cam(model, x, 0, layer="3", upsample=None)


def test_score_cam_on_a_signal_matches_a_reference() -> None:
    model, x = seeded(10, signal_net), randn(11, 2, 2, 12)
    a = model[:4](x).detach()  # [2,4,5]
    probs = []
    for k in range(a.shape[1]):
        up = F.interpolate(a[:, k:k + 1], size=12, mode="linear", align_corners=False)
        low, high = up.amin(dim=2, keepdim=True), up.amax(dim=2, keepdim=True)
        mask = torch.where(high > low, (up - low) / (high - low), 0.0)
        s = model(x * mask).softmax(dim=1)[:, 1].detach()
        probs.append(torch.where((a[:, k].amax(dim=1) > a[:, k].amin(dim=1)), s, 0.0))
    heat = (torch.stack(probs, dim=1)[:, :, None] * a).sum(dim=1, keepdim=True)
    expected = F.relu(F.interpolate(heat, size=12, mode="linear", align_corners=False))
    torch.testing.assert_close(torchvis.score_cam(model, x, 1, layer="3"), expected, rtol=1e-10, atol=1e-12)


def test_layer_none_on_a_signal_model_takes_the_last_spatial_map() -> None:
    model, x = seeded(12, signal_net), randn(13, 2, 2, 15)
    with pytest.warns(UserWarning, match=r"layer=None: using '3'"):
        got = torchvis.grad_cam(model, x, 1)
    assert torch.equal(got, torchvis.grad_cam(model, x, 1, layer="3"))


def test_a_layer_without_spatial_dimensions_is_an_error_naming_it() -> None:
    model, x = seeded(14, signal_net), randn(15, 2, 2, 15)
    for name in LAYER_METHODS:
        with pytest.raises(ValueError, match=r"got shape \[2, 4\] from layer '5', without spatial dim"):
            METHODS[name](model, x, 1, layer="5")


# --- tuple outputs and layer inputs ------------------------------------------------------------------


def test_one_element_of_a_tuple_output() -> None:
    model, x = seeded(20, Recurrent), randn(21, 2, 3, 9)
    a, g = layer_and_grad(model, x, 1, model.lstm, pick=lambda o: o[0])
    a, g = a.transpose(1, 2), g.transpose(1, 2)  # [B, hidden, steps]
    expected = F.relu((g.mean(dim=2, keepdim=True) * a).sum(dim=1, keepdim=True))
    channels_first = lambda t: t.transpose(1, 2)  # noqa: E731
    for layer in [("lstm", 0), "lstm[0]", (model.lstm, 0), ("lstm", -2)]:
        got = torchvis.grad_cam(model, x, 1, layer=layer, reshape=channels_first, upsample=None)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    maps = explain(model, x, 1, methods=["grad_cam", "layer_cam"], layer=("lstm", 0),
                   reshape=channels_first, upsample=None)
    torch.testing.assert_close(maps["grad_cam"], expected, rtol=1e-12, atol=1e-12)
    keyed = explain(model, x, 1, methods=["grad_cam"], layer=["lstm[0]"], reshape=channels_first)
    assert list(keyed) == ["grad_cam/lstm[0]"]


def test_tuple_output_errors_come_before_any_gradient() -> None:
    model, x = seeded(22, Recurrent), randn(23, 2, 3, 9)
    listing = r"\(\[0\] Tensor\[2, 9, 5\], \[1\] tuple\(\[0\] Tensor\[1, 2, 5\]"
    with pytest.raises(ValueError, match=rf"'lstm' returned a tuple of 2 {listing}.*"
                                         r"layer=\('lstm', 0\) or layer='lstm\[0\]'"):
        torchvis.grad_cam(model, x, layer="lstm")
    with pytest.raises(ValueError, match=r"index 2 is out of range for the 2 elements"):
        torchvis.grad_cam(model, x, layer="lstm[2]")
    with pytest.raises(ValueError, match=r"'lstm\[1\]' is tuple\(.*not a tensor"):
        torchvis.grad_cam(model, x, layer=("lstm", 1))
    with pytest.raises(ValueError, match=r"an index needs a tuple, but layer 'head' returned Tensor"):
        torchvis.grad_cam(model, x, layer="head[0]")
    with pytest.raises(TypeError, match=r"a tuple layer is \(name or module, index\)"):
        torchvis.grad_cam(model, x, layer=("lstm", "0"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown layer 'lstn'"):
        torchvis.grad_cam(model, x, layer="lstn[0]")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class TwoInputs(nn.Module):
    """A block called with two tensors; the method takes the second by index."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a * b


class Mixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.gate = nn.Conv1d(2, 3, 1)
        self.mix = TwoInputs()
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.mix(torch.relu(self.conv(x)), torch.sigmoid(self.gate(x))).mean(dim=2))


def test_layer_input_by_index() -> None:
    model, x = seeded(24, Mixer), randn(25, 2, 2, 8)
    for element in [0, 1]:
        seen: dict[str, Tensor] = {}

        def keep(m: nn.Module, i: tuple[Tensor, ...], seen: dict[str, Tensor] = seen, e: int = element
                 ) -> None:
            seen["a"] = i[e]

        handle = model.mix.register_forward_pre_hook(keep)
        try:
            out = model(x.clone().requires_grad_(True))
        finally:
            handle.remove()
        (g,) = torch.autograd.grad(out[:, 0].sum(), seen["a"])
        expected = F.relu(naive_heat("grad_cam", seen["a"].detach(), g))
        got = torchvis.grad_cam(model, x, 0, layer=("mix", element), layer_input=True, upsample=None)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # layer_input without an index: the first input, recorded under the layer's own name.
    assert torch.equal(torchvis.grad_cam(model, x, 0, layer="mix", layer_input=True),
                       torchvis.grad_cam(model, x, 0, layer="mix[0]", layer_input=True))
    maps = explain(model, x, 0, methods=["grad_cam", "score_cam"], layer="mix", layer_input=True)
    assert torch.equal(maps["grad_cam"], torchvis.grad_cam(model, x, 0, layer="mix", layer_input=True))
    assert torch.equal(maps["score_cam"], torchvis.score_cam(model, x, 0, layer="mix", layer_input=True))


# --- wrappers ---------------------------------------------------------------------------------------


def image_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


class StandIn(nn.Module):
    """What torch.compile returns, reduced to what matters here: ``_orig_mod``, and a forward that
    does not run the original module's hooks (as a compiled graph does not)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._orig_mod = model
        self._graph = [copy.deepcopy(model)]  # a list: not a submodule

    def forward(self, x: Tensor) -> Tensor:
        return self._graph[0](x)


@pytest.mark.parametrize("wrap", ["compile", "stand-in", "data-parallel", "compiled-data-parallel"])
def test_wrapped_models_give_the_eager_maps(wrap: str) -> None:
    model, x = seeded(30, image_net), randn(31, 2, 3, 8, 8)
    if wrap == "compile":
        # The default (inductor) backend: torchvis calls the original module, so nothing is compiled.
        wrapped: nn.Module = torch.compile(model)  # type: ignore[assignment]
        assert type(wrapped).__name__ == "OptimizedModule"
    elif wrap == "stand-in":
        wrapped = StandIn(model)
    elif wrap == "data-parallel":
        wrapped = nn.DataParallel(model)
    else:
        wrapped = torch.compile(nn.DataParallel(model), backend="eager")  # type: ignore[assignment]
    assert hooks.unwrap(wrapped) is model
    prefixes = {"data-parallel": "module.", "compiled-data-parallel": "_orig_mod.module."}
    prefix = prefixes.get(wrap, "_orig_mod.")
    expected = explain(model, x, 1, methods=[*LAYER_METHODS, "saliency"], layer="3")
    for layer in ["3", f"{prefix}3", model[3]]:
        got = explain(wrapped, x, 1, methods=[*LAYER_METHODS, "saliency"], layer=layer)
        for key in expected:
            assert torch.equal(got[key], expected[key]), (wrap, layer, key)
    with pytest.warns(UserWarning, match=r"layer=None: using '3'"):
        torchvis.grad_cam(wrapped, x, 1)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_ddp_wrapper_is_unwrapped() -> None:
    # A real DistributedDataParallel needs a process group; an instance built without one holds .module.
    model, x = seeded(34, image_net), randn(35, 2, 3, 8, 8)
    ddp = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(ddp)
    ddp.module = model
    assert hooks.unwrap(ddp) is model
    assert hooks.resolve_layer(ddp, "module.3") == ("3", model[3])
    expected = torchvis.layer_cam(model, x, 2, layer="3")
    assert torch.equal(torchvis.layer_cam(ddp, x, 2, layer="module.3"), expected)


@pytest.mark.parametrize("wrap", ["compile", "stand-in"])
def test_hooks_through_the_wrapper_would_not_fire(wrap: str) -> None:
    # Why unwrapping matters: once compiled, calling the wrapper does not run hooks added to the
    # original module afterwards (PyTorch issue 117758); the stand-in mimics that.
    model, x = seeded(32, image_net), randn(33, 1, 3, 8, 8)
    wrapped = torch.compile(model, backend="eager") if wrap == "compile" else StandIn(model)
    wrapped(x)
    fired: list[int] = []
    handle = model[3].register_forward_hook(lambda *args: fired.append(1))
    try:
        wrapped(x)
    finally:
        handle.remove()
    assert fired == []


# --- mixed precision --------------------------------------------------------------------------------

# bf16 keeps 8 significant bits (relative step 2**-8 = 0.4 %): a CAM computed from bf16 activations and
# gradients, accumulated in float32, stays within 2 % of the float32 map's maximum (measured 0.4-0.6 %).
CAM_TOLERANCE = 2e-2


def relative_error(got: Tensor, expected: Tensor) -> float:
    return float((got.float() - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("name", LAYER_METHODS)
def test_layer_methods_under_autocast_and_on_a_bf16_model(name: str) -> None:
    model = seeded(40, image_net).float()
    x = randn(41, 2, 3, 12, 12).float()
    expected = METHODS[name](model, x, 1, layer="3")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = METHODS[name](model, x, 1, layer="3")
    assert autocast.dtype == torch.float32
    assert relative_error(autocast, expected) < (0.2 if name == "guided_grad_cam" else CAM_TOLERANCE)
    bf16 = METHODS[name](copy.deepcopy(model).bfloat16(), x.bfloat16(), 1, layer="3")
    assert bf16.dtype == torch.bfloat16
    # The map itself is rounded to bf16 on return: one more step of 2**-8.
    assert relative_error(bf16, expected) < (0.2 if name == "guided_grad_cam" else CAM_TOLERANCE + 2**-8)


def test_cam_heat_is_accumulated_in_float32() -> None:
    # 4096 bf16 products summed in bf16 lose the small ones; summed in float32 they are kept.
    a = torch.full((1, 4096, 1, 2), 1.0, dtype=torch.bfloat16)
    g = torch.full((1, 4096, 1, 2), 1.0, dtype=torch.bfloat16)
    a[0, 0] = 256
    heat = torchvis.methods.cam.cam(a, g)
    assert heat.dtype == torch.float32 and float(heat[0, 0, 0, 0]) == 256 + 4095


@pytest.mark.parametrize("name", ["saliency", "guided_backprop"])
def test_gradient_maps_under_autocast(name: str) -> None:
    # Input gradients pass through bf16 convolutions backwards: a few pixels whose ReLU flips differ
    # much (measured max 15-17 % of the map's maximum), the map as a whole stays close.
    model = seeded(42, image_net).float()
    x = randn(43, 2, 3, 12, 12).float()
    expected = METHODS[name](model, x, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = METHODS[name](model, x, 1)
    assert got.dtype == torch.float32
    error = (got - expected).abs() / expected.abs().max()
    assert float(error.mean()) < 2e-2
    assert float(torch.corrcoef(torch.stack([got.flatten(), expected.flatten()]))[0, 1]) > 0.99


def test_no_warning_on_clean_nd_calls() -> None:
    model, x = seeded(44, signal_net), randn(45, 2, 2, 15)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explain(model, x, 0, methods=LAYER_METHODS, layer=["1", "3"])
