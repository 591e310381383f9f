"""Bad input gives a clear error from every method, never a quietly wrong map."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from conftest import options_for
from torch import Tensor, nn

from torchvis.methods import METHODS, explain
from torchvis.methods.cam import grad_cam, guided_grad_cam
from torchvis.methods.perturbation import occlusion


def call(name: str, model: nn.Module, x: Tensor, target: Any = None) -> Tensor:
    """``METHODS[name]`` with its options; the layer is looked up inside an :class:`Outputs` wrapper."""
    options = options_for(name, layer="conv2")
    if "layer" in options and isinstance(model, Outputs):
        options["layer"] = f"body.{options['layer']}"
    return METHODS[name](model, x, target, **options)


@pytest.fixture
def model(small_cnn: Callable[[int], nn.Module]) -> nn.Module:
    return small_cnn(0)


@pytest.fixture
def x(randn: Callable[..., Tensor]) -> Tensor:
    return randn(0, 2, 3, 8, 8)


# --- layers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [grad_cam, guided_grad_cam])
def test_unknown_layer_names_close_matches(
    method: Callable[..., Tensor], model: nn.Module, x: Tensor
) -> None:
    with pytest.raises(ValueError, match=r"unknown layer 'conv'.*'conv1'.*") as info:
        method(model, x, layer="conv")
    assert "'conv2'" in str(info.value) and "'conv3'" in str(info.value)


def test_explain_unknown_layer_in_a_list(model: nn.Module, x: Tensor) -> None:
    with pytest.raises(ValueError, match=r"unknown layer 'head\.3'.*'head\.2'"):
        explain(model, x, methods=["grad_cam"], layer=["conv2", "head.3"])


def test_layer_that_is_not_a_feature_map(model: nn.Module, x: Tensor) -> None:
    with pytest.raises(ValueError, match=r"feature map \[B,K,h,w\]; got shape \[2, 5\]"):
        grad_cam(model, x, layer="head.2")


@pytest.mark.parametrize("method", ["grad_cam", "guided_grad_cam", "explain"])
def test_layer_running_twice_per_forward(
    method: str, resnet18: nn.Module, randn: Callable[..., Tensor]
) -> None:
    # torchvision's BasicBlock calls its one in-place ReLU module twice.
    x = randn(0, 2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"'layer1\.0\.relu' runs 2 times per forward pass.*parent block"):
        if method == "explain":
            explain(resnet18, x, methods=["grad_cam"], layer=["layer1.0.relu"])
        else:
            METHODS[method](resnet18, x, layer="layer1.0.relu")


def test_module_object_outside_the_model(model: nn.Module, x: Tensor) -> None:
    with pytest.raises(ValueError, match="not a submodule"):
        grad_cam(model, x, layer=nn.Conv2d(8, 8, 3))


# --- x ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(METHODS))
def test_x_must_be_a_floating_batch_or_a_tuple_of_them(name: str, model: nn.Module, x: Tensor) -> None:
    if name not in ("occlusion", "score_cam"):  # TODO(inputs): occlusion and Score-CAM (other branches)
        with pytest.raises(ValueError, match=r"share the batch size B; got \[2, 1\]"):
            call(name, model, (x, x[:1]))
        with pytest.raises(TypeError, match="tuple of tensors, not a list"):
            call(name, model, [x])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="0-d tensor"):
            call(name, model, x[0, 0, 0, 0])
    with pytest.raises(ValueError, match="floating"):
        call(name, model, x.long())
    with pytest.raises(ValueError, match="empty batch"):
        call(name, model, x[:0])
    with pytest.raises(TypeError, match="torch.Tensor"):
        call(name, model, x.numpy())  # type: ignore[arg-type]


# --- target ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize(
    "target, match",
    [(5, "target 5 is out of range for 5 classes"), (-1, "target -1 is out of range"),
     ([0, 7], "target 7 is out of range"), (torch.tensor([-2, 0]), "target -2 is out of range")],
    ids=["int-high", "int-negative", "list-high", "tensor-negative"],
)
def test_target_out_of_range(name: str, target: Any, match: str, model: nn.Module, x: Tensor) -> None:
    with pytest.raises(ValueError, match=match):
        call(name, model, x, target)


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("target", [[0, 1, 2], [3], torch.tensor([[0, 1]]), np.array([1, 2, 0])],
                         ids=["list-3", "list-1", "tensor-2d", "numpy-3"])
def test_target_of_wrong_length(name: str, target: Any, model: nn.Module, x: Tensor) -> None:
    with pytest.raises(ValueError, match=r"one class per example \(2\)"):
        call(name, model, x, target)


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize(
    "target",
    [1.0, 1.5, [1.0, 2.0], torch.tensor([1.0, 2.0]), True, [True, False], torch.tensor([True, False]), "1",
     torch.tensor(1.0), torch.tensor(True), np.float64(1.0), np.array(1.0), np.array([0.0, 1.0])],
    ids=["float-1.0", "float-1.5", "float-list", "float-tensor", "bool", "bool-list", "bool-tensor", "str",
         "float-0d-tensor", "bool-0d-tensor", "numpy-float", "numpy-0d-float", "numpy-float-array"],
)
def test_target_of_wrong_type(name: str, target: Any, model: nn.Module, x: Tensor) -> None:
    with pytest.raises(TypeError, match="target must"):
        call(name, model, x, target)


# --- occlusion windows -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "window, stride, match",
    [
        (9, None, "fit the image"),
        ((3, 9), 1, "fit the image"),
        (0, 1, "positive"),
        (3, 0, "stride must be positive"),
        (3, -1, "stride must be positive"),
        (3, (1, 0), "stride must be positive"),
        (3, 4, "larger than the window"),
        ((4, 2), (2, 3), "larger than the window"),
    ],
)
def test_occlusion_window_and_stride(
    window: Any, stride: Any, match: str, model: nn.Module, x: Tensor
) -> None:
    with pytest.raises(ValueError, match=match):
        occlusion(model, x, 0, window=window, stride=stride)


def test_occlusion_batch_size_and_types(model: nn.Module, x: Tensor) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        occlusion(model, x, 0, window=3, batch_size=0)
    with pytest.raises(TypeError, match="window must be an int or a pair"):
        occlusion(model, x, 0, window=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="stride must be an int or a pair"):
        occlusion(model, x, 0, window=3, stride=(1, 1, 1))  # type: ignore[arg-type]


# --- the model's output ----------------------------------------------------------------------------


class Outputs(nn.Module):
    """SmallCNN's logits or features, returned in a shape torchvis must refuse."""

    def __init__(self, body: nn.Module, kind: str) -> None:
        super().__init__()
        self.body, self.kind = body, kind

    def forward(self, x: Tensor) -> Any:
        logits = self.body(x)
        if self.kind == "feature-map":
            return self.body.conv1(x)  # type: ignore[operator]
        if self.kind == "logits-4d":
            return logits[:, :, None, None]
        if self.kind == "vector":
            return logits[:, 0]
        if self.kind == "dict":
            return {"logits": logits}
        if self.kind == "tuple":
            return logits, logits
        if self.kind == "nan":
            return logits + torch.tensor([0.0, 0.0, math.nan, 0.0, 0.0], dtype=logits.dtype)
        raise AssertionError(self.kind)


@pytest.mark.parametrize("name", [*METHODS, "explain"])
@pytest.mark.parametrize(
    "kind, got",
    [("feature-map", r"a tensor of shape \[2, 6, 8, 8\]"), ("logits-4d", r"a tensor of shape \[2, 5, 1, 1\]"),
     ("dict", "(a )?dict"), ("tuple", "tuple")],
)
def test_output_must_be_batch_by_classes(name: str, kind: str, got: str, model: nn.Module, x: Tensor) -> None:
    wrapped = Outputs(model, kind)
    with pytest.raises(ValueError, match=rf"\[B, classes\].*returned {got}.*Wrap it in a module"):
        if name == "explain":
            explain(wrapped, x, methods=list(METHODS), layer="body.conv2", window=3)
        else:
            call(name, wrapped, x)


@pytest.mark.parametrize("name", [*METHODS, "explain"])
def test_nan_in_model_output(name: str, model: nn.Module, x: Tensor) -> None:
    for target in (None, 0):
        with pytest.raises(ValueError, match="NaN"):
            if name == "explain":
                explain(Outputs(model, "nan"), x, target, methods=list(METHODS), layer="body.conv2", window=3)
            else:
                call(name, Outputs(model, "nan"), x, target)
    poisoned = x.clone()
    poisoned[1, 0, 4, 4] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        if name == "explain":
            explain(model, poisoned, methods=["saliency"])
        else:
            call(name, model, poisoned, 0)


# --- explain's own arguments -----------------------------------------------------------------------


def test_explain_unknown_method_and_option(model: nn.Module, x: Tensor) -> None:
    with pytest.raises(ValueError, match=r"unknown method 'gradcam'.*grad_cam"):
        explain(model, x, methods=["gradcam"])
    with pytest.raises(TypeError, match=r"option 'windw' is taken by none"):
        explain(model, x, methods=["occlusion"], windw=3)
