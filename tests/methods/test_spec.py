"""The method spec: one registration feeds explain, the monitor, the looks and the titles; explain runs
each shared pass once and hands every layer method each requested layer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import torchvis
from torchvis.core.passes import Shared
from torchvis.methods import METHODS, SPECS, Look, Need, explain, register, spec_of, unregister
from torchvis.rendering.figure import title_of
from torchvis.rendering.image import look_of
from torchvis.tracking.tensorboard import PNGWriter


@pytest.fixture(autouse=True)
def registry() -> Iterator[None]:
    """Whatever a test registers is gone afterwards."""
    before = list(SPECS)
    yield
    for name in [n for n in SPECS if n not in before]:
        unregister(name)


class Counted(nn.Module):
    """Counts forward calls of the wrapped model."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body, self.calls = body, 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.body(x)


def hires_from(shared: Shared, *, relu: bool = True) -> Tensor:
    """A CAM variant for the test: ReLU(sum_k g_k * A_k), at the layer's size."""
    assert shared.activation is not None and shared.grad is not None
    heat = (shared.grad * shared.activation).sum(dim=1, keepdim=True)
    return heat.clamp_min(0) if relu else heat


def hires(model: nn.Module, x: Tensor, target: Any = None, *, layer: Any = None, relu: bool = True,
          eval_mode: bool = True) -> Tensor:
    (shared,) = torchvis.shared_passes(model, x, target, layers=[layer], eval_mode=eval_mode)
    return hires_from(shared, relu=relu)


def reference_layer_tensors(model: nn.Module, x: Tensor, target: Tensor, layer: str) -> tuple[Tensor, Tensor]:
    """Activation and gradient of the target logits at ``layer``, with a plain forward hook of this test
    (not torchvis's hook core). The hook hands a clone downstream, so a later in-place ReLU leaves the
    recorded tensor as the layer returned it."""
    seen: dict[str, Tensor] = {}

    def keep(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        seen["a"] = output
        return output.clone()

    handle = dict(model.named_modules())[layer].register_forward_hook(keep)
    try:
        logits = model(x)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), seen["a"])
    return seen["a"].detach(), grad


def test_registry_is_read_only_and_says_how_to_register() -> None:
    with pytest.raises(TypeError, match=r"torchvis\.register\('mine', function"):
        METHODS["mine"] = torchvis.saliency  # type: ignore[index]
    assert list(METHODS) == [
        "saliency", "guided_backprop", "gradient_x_input", "grad_cam", "guided_grad_cam", "occlusion",
        "integrated_gradients", "smoothgrad", "vargrad", "grad_cam_pp", "xgrad_cam", "layer_cam", "hires_cam",
        "score_cam",
    ]
    assert METHODS["grad_cam"] is torchvis.grad_cam and SPECS["grad_cam"].look is Look.HEAT_OVERLAY


def test_register_refuses_inconsistent_specs() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register("saliency", torchvis.saliency)
    with pytest.raises(TypeError, match="give from_pass"):
        register("hires", hires, needs=Need.LAYER_GRADIENT)
    with pytest.raises(TypeError, match="from_pass is for methods that need a shared pass"):
        register("hires", hires, from_pass=hires_from)
    with pytest.raises(TypeError, match=r"must take the options of its function too: \['relu'\]"):
        register("hires", hires, needs=Need.LAYER_GRADIENT, from_pass=lambda shared: shared.x)
    with pytest.raises(ValueError, match="without '/'"):
        register("a/b", hires)
    with pytest.raises(TypeError, match="wraps='method': 'hires' must take that option, with a default"):
        register("hires", hires, wraps="method")
    assert "hires" not in SPECS


def test_unknown_method_names_the_close_ones(small_cnn: Callable[[int], nn.Module]) -> None:
    with pytest.raises(ValueError, match=r"unknown method 'grad_camm' \(did you mean 'grad_cam'"):
        explain(small_cnn(0), torch.zeros(1, 3, 8, 8, dtype=torch.float64), methods=["grad_camm"])


@pytest.mark.parametrize("registered", [True, False], ids=["registered", "plain-function"])
def test_a_user_layer_method_gets_each_requested_layer(
    small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor], registered: bool
) -> None:
    """The issue's case: a user method whose signature names ``layer`` gets the layer explain was given,
    one call per layer with ``name/<layer>`` keys for a list — never a silent ``layer=None``."""
    model, x = small_cnn(0), randn(0, 2, 3, 8, 8)
    calls: list[Any] = []

    def channel_mean(model: nn.Module, x: Tensor, target: Any = None, *, layer: Any = None) -> Tensor:
        calls.append(layer)
        return torchvis.feature_maps(model, x, layer).mean(dim=1, keepdim=True)

    method: Any = "channel_mean" if registered else channel_mean
    if registered:
        register("channel_mean", channel_mean)
    one = explain(model, x, methods=["grad_cam", method], layer="conv2")
    assert calls == ["conv2"] and list(one) == ["grad_cam", "channel_mean"]
    assert torch.equal(one["grad_cam"], torchvis.grad_cam(model, x, layer="conv2"))
    calls.clear()
    many = explain(model, x, methods=[method, "grad_cam"], layer=["conv1", "conv3"])
    assert calls == ["conv1", "conv3"]
    assert list(many) == ["channel_mean/conv1", "channel_mean/conv3", "grad_cam/conv1", "grad_cam/conv3"]
    for layer in ("conv1", "conv3"):
        expected = torchvis.feature_maps(model, x, layer).mean(dim=1, keepdim=True)
        assert torch.equal(many[f"channel_mean/{layer}"], expected)


def test_a_registered_cam_variant_joins_the_single_shared_pass(
    small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    """Saliency, Grad-CAM and a new CAM variant at two layers: one forward pass in all, and each map
    equal to a float64 reference computed from this test's own hook and autograd call."""
    register("hires", hires, needs=Need.LAYER_GRADIENT, from_pass=hires_from, look=Look.HEAT_OVERLAY)
    model = Counted(small_cnn(1))
    x = randn(1, 3, 3, 8, 8)
    maps = explain(model, x, methods=["saliency", "grad_cam", "hires"], layer=["body.conv1", "body.conv3"],
                   relu=False)
    assert model.calls == 1
    target = model.body(x).argmax(dim=1)
    for layer in ("conv1", "conv3"):
        act, grad = reference_layer_tensors(model.body, x, target, layer)
        assert torch.allclose(maps[f"hires/body.{layer}"], (grad * act).sum(dim=1, keepdim=True), atol=1e-12)
        cam = (grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1, keepdim=True)
        cam = torch.nn.functional.interpolate(cam, size=(8, 8), mode="bilinear", align_corners=False)
        assert torch.allclose(maps[f"grad_cam/body.{layer}"], cam, atol=1e-12)
    assert torch.equal(maps["hires/body.conv3"], hires(model.body, x, layer="conv3", relu=False))


def test_guided_methods_share_one_guided_pass(
    small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    model = Counted(small_cnn(2))
    x = randn(2, 2, 3, 8, 8)
    maps = explain(model, x, methods=["guided_backprop", "guided_grad_cam", "saliency"], layer="body.conv2")
    assert model.calls == 2  # one plain forward (saliency, the CAM), one guided
    assert torch.equal(maps["guided_backprop"], torchvis.guided_backprop(model, x))
    assert torch.equal(maps["guided_grad_cam"], torchvis.guided_grad_cam(model, x, layer="body.conv2"))


def test_monitor_checks_a_method_that_requires_a_layer_at_construction(
    small_cnn: Callable[[int], nn.Module], tmp_path: Path
) -> None:
    def needs_layer(model: nn.Module, x: Tensor, target: Any = None, *, layer: Any) -> Tensor:
        return torchvis.feature_maps(model, x, layer).mean(dim=1, keepdim=True)

    register("needs_layer", needs_layer, look=Look.HEAT_OVERLAY)
    model, x = small_cnn(0), torch.rand(2, 3, 8, 8, dtype=torch.float64)
    writer = PNGWriter(tmp_path)
    with pytest.raises(TypeError, match="method 'needs_layer' needs a layer"):
        torchvis.Monitor(model, writer, x, [0, 1], methods=["needs_layer"])
    with torchvis.Monitor(model, writer, x, [0, 1], methods=["needs_layer"], layer="relu2") as monitor:
        monitor.step(0)
    assert (tmp_path / "torchvis-needs_layer" / "step_000000.png").is_file()


def test_looks_and_titles_come_from_the_spec() -> None:
    register("hires", hires, needs=Need.LAYER_GRADIENT, from_pass=hires_from, look=Look.HEAT_OVERLAY,
             title="HiRes-CAM")
    assert look_of("hires/layer4") is Look.HEAT_OVERLAY and title_of("hires/layer4") == "HiRes-CAM (layer4)"
    assert look_of("grad_cam") is Look.HEAT_OVERLAY and title_of("guided_backprop") == "guided backprop"
    assert look_of("unregistered") is Look.SIGNED and title_of("unregistered") == "unregistered"
    assert look_of("grad_cam", {"grad_cam": Look.SIGNED}) is Look.SIGNED


def test_spec_of_a_plain_function_reads_its_signature() -> None:
    spec = spec_of(hires)
    assert spec.takes_layer and spec.needs == {Need.OWN} and spec.options == ("relu",)
    assert spec.needs_hooks and spec.look is Look.SIGNED and not spec.shared
    assert not SPECS["saliency"].needs_hooks and not SPECS["occlusion"].needs_hooks
    assert SPECS["guided_backprop"].needs_hooks and SPECS["occlusion"].required_options == ("window",)
