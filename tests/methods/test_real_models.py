"""Real architectures against the naive references: torchvision's ResNet-18 and VGG-11 (random weights,
never downloaded) and a model whose ReLUs are all functional calls."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import references as ref
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import vgg11

from torchvis.methods.cam import grad_cam, guided_grad_cam
from torchvis.methods.gradient import guided_backprop, saliency


def assert_matches(got: Tensor, expected: Tensor) -> None:
    """Equal up to float64 rounding, relative to the map's own scale (gradients can be tiny)."""
    scale = expected.abs().max()
    assert scale > 0
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * float(scale))


def assert_guided_differs_from_plain(guided: Tensor, plain: Tensor) -> None:
    """Guards the comparisons: on these models the guided rule must matter."""
    assert (guided - plain).abs().max() > 0.1 * plain.abs().max()


def predicted(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).argmax(dim=1)


# --- ResNet-18: in-place ReLU modules, each called twice per block --------------------------------


@pytest.fixture(scope="module")
def resnet_input() -> Tensor:
    # 48x48 leaves layer4 a 2x2 map (32x32 would shrink it to 1x1).
    return torch.randn(2, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def test_resnet18_guided_backprop_and_saliency_match_reference(
    resnet18: nn.Module, resnet_input: Tensor
) -> None:
    x, t = resnet_input, torch.tensor([3, 7])
    guided = guided_backprop(resnet18, x, t)
    assert_matches(guided, ref.guided_backprop(resnet18, x, t))
    plain = saliency(resnet18, x, t)
    assert_matches(plain, ref.saliency(resnet18, x, t))
    assert_guided_differs_from_plain(guided, plain)


def test_resnet18_grad_cam_layer_none_is_layer4(resnet18: nn.Module, resnet_input: Tensor) -> None:
    x = resnet_input
    with pytest.warns(UserWarning, match="layer=None: using 'layer4'"):
        auto = grad_cam(resnet18, x, layer=None, upsample=False)
    assert auto.shape == (2, 1, 2, 2)
    expected = ref.grad_cam(resnet18, x, predicted(resnet18, x), "layer4", upsample=False)
    assert_matches(auto, expected)
    named = grad_cam(resnet18, x, layer="layer4", relu=False, upsample=False)
    assert torch.equal(named.clamp_min(0), auto)


def test_resnet18_grad_cam_and_guided_grad_cam_match_reference(
    resnet18: nn.Module, resnet_input: Tensor
) -> None:
    # A block's output: produced by the block's second, in-place call of its ReLU module.
    x, t, layer = resnet_input, torch.tensor([1, 1]), "layer3.1"
    expected = ref.grad_cam(resnet18, x, t, layer, relu=False)
    assert_matches(grad_cam(resnet18, x, t, layer=layer, relu=False), expected)
    assert_matches(guided_grad_cam(resnet18, x, t, layer=layer), ref.guided_grad_cam(resnet18, x, t, layer))


# --- VGG-11: in-place ReLU after every conv, dropout in the classifier -----------------------------


def narrow_vgg11() -> nn.Module:
    """torchvision's VGG-11 (10 classes) with its classifier narrowed from 4096 to 64 units: the
    100M-weight head would cost seconds to initialise; features, pooling and the head's
    Linear-ReLU(in place)-Dropout structure stay torchvision's."""
    with torch.device("meta"):
        model = vgg11(weights=None, num_classes=10)
        model.classifier[0] = nn.Linear(512 * 7 * 7, 64)
        model.classifier[3] = nn.Linear(64, 64)
        model.classifier[6] = nn.Linear(64, 10)
    model = model.to_empty(device="cpu")
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.reset_parameters()
    return model


def test_vgg11_guided_backprop_and_grad_cam_match_reference(
    seeded_model: Callable[..., nn.Module], randn: Callable[..., Tensor]
) -> None:
    model = seeded_model(1, narrow_vgg11)
    assert sum(isinstance(m, nn.ReLU) and m.inplace for m in model.modules()) == 10
    x, t = randn(1, 2, 3, 32, 32), torch.tensor([0, 9])
    guided = guided_backprop(model, x, t)
    assert_matches(guided, ref.guided_backprop(model, x, t))
    assert_guided_differs_from_plain(guided, saliency(model, x, t))
    # features.18 is the last conv; its in-place ReLU follows.
    expected = ref.grad_cam(model, x, t, "features.18", relu=False)
    assert_matches(grad_cam(model, x, t, layer="features.18", relu=False), expected)


# --- functional ReLUs: F.relu, torch.relu, Tensor.relu, relu_, F.relu(inplace=True) ----------------


class FunctionalCNN(nn.Module):
    """No ReLU module: every rectifier is a functional call, two of them in place."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv4 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.conv1(x))
        b = F.max_pool2d(torch.relu(self.conv2(a)), 2)
        c = self.conv3(b).relu()
        d = self.conv4(c)
        d.relu_()
        e = F.relu(d + b, inplace=True)
        return self.fc(e.mean(dim=(2, 3)))


class GuidedTwin(FunctionalCNN):
    """The same computation with each ReLU call replaced by the reference guided ReLU."""

    def forward(self, x: Tensor) -> Tensor:
        a = ref.guided_relu(self.conv1(x))
        b = F.max_pool2d(ref.guided_relu(self.conv2(a)), 2)
        c = ref.guided_relu(self.conv3(b))
        d = ref.guided_relu(self.conv4(c))
        e = ref.guided_relu(d + b)
        return self.fc(e.mean(dim=(2, 3)))


@pytest.mark.parametrize("seed", [0, 1])
def test_functional_relus_get_the_guided_rule(
    seed: int, seeded_model: Callable[..., nn.Module], randn: Callable[..., Tensor]
) -> None:
    model = seeded_model(seed, FunctionalCNN)
    twin = GuidedTwin().double().eval()
    twin.load_state_dict(model.state_dict())
    x = randn(seed, 3, 3, 8, 8)
    t = predicted(model, x)
    guided = guided_backprop(model, x)
    assert_matches(guided, ref.saliency(twin, x, t))
    assert_guided_differs_from_plain(guided, saliency(model, x))
    expected = ref.saliency(twin, x, t) * ref.grad_cam(model, x, t, "conv3")
    assert_matches(guided_grad_cam(model, x, layer="conv3"), expected)
