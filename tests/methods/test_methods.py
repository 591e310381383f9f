"""Every method against closed forms on hand-weighted models and against the naive references."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import references as ref
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torchvis
from torchvis.methods import METHODS, explain
from torchvis.methods.cam import grad_cam, guided_grad_cam
from torchvis.methods.gradient import guided_backprop, saliency
from torchvis.methods.perturbation import occlusion

SEEDS = [0, 1, 2]


def linear_model(weight: Tensor, bias: Tensor | None = None) -> nn.Module:
    """logits = weight.flatten(1) @ x.flatten() + bias, for ``weight`` ``[K,C,H,W]``."""
    fc = nn.Linear(weight[0].numel(), weight.shape[0]).double()
    with torch.no_grad():
        fc.weight.copy_(weight.flatten(1))
        fc.bias.copy_(torch.zeros(weight.shape[0]) if bias is None else bias)
    return nn.Sequential(nn.Flatten(), fc).eval()


# --- closed forms: saliency of a linear model --------------------------------------------------------


def hand_weights() -> Tensor:
    """3 classes over [2,3,3] inputs; each class reads its own pixels, with mixed signs."""
    w = torch.zeros(3, 2, 3, 3, dtype=torch.float64)
    w[0, 0, 0, :] = torch.tensor([1.0, -2.0, 3.0])
    w[1, 1, 1, :] = torch.tensor([-1.0, 4.0, 0.5])
    w[2, :, 2, 2] = torch.tensor([2.0, -3.0])
    w[2, 0, 0, 0] = -0.25
    return w


def voting_input(w: Tensor, classes: list[int], randn: Callable[..., Tensor]) -> Tensor:
    """A batch whose example b strongly excites class ``classes[b]``."""
    return torch.stack([5 * w[c].sign() + 0.1 * randn(c, *w.shape[1:]) for c in classes])


@pytest.mark.parametrize(
    "target, rows",
    [(1, [1, 1]), ([2, 0], [2, 0]), (torch.tensor([0, 1]), [0, 1]), (None, [2, 1])],
    ids=["int", "list", "tensor", "argmax"],
)
def test_saliency_of_linear_model_is_weight_row(
    target: object, rows: list[int], randn: Callable[..., Tensor]
) -> None:
    w = hand_weights()
    model = linear_model(w, bias=torch.tensor([0.5, -0.5, 0.25], dtype=torch.float64))
    x = voting_input(w, [2, 1], randn)
    assert (x.flatten(1) @ w.flatten(1).T).argmax(1).tolist() == [2, 1]  # what target=None must pick

    got = saliency(model, x, target)  # type: ignore[arg-type]
    assert got.shape == x.shape and got.dtype == torch.float64
    assert torch.equal(got, w[rows])
    assert torch.equal(saliency(model, x, target, abs=True), w[rows].abs())  # type: ignore[arg-type]
    # No ReLU anywhere: guided backprop is the plain gradient.
    assert torch.equal(guided_backprop(model, x, target), w[rows])  # type: ignore[arg-type]


def test_saliency_keeps_float32(randn: Callable[..., Tensor]) -> None:
    w = hand_weights()
    model = linear_model(w).float()
    got = saliency(model, voting_input(w, [0, 2], randn).float(), [0, 2])
    assert got.dtype == torch.float32 and torch.equal(got, w[[0, 2]].float())


# --- closed forms: occlusion of a linear model -------------------------------------------------------


def occlusion_by_hand(w: Tensor, x: Tensor, size: int, window: int, starts: list[int]) -> Tensor:
    """Mean over the windows covering each pixel of the window's sum of w * x (all channels)."""
    contrib = (w * x).sum(dim=0)  # [H,W]
    total = torch.zeros(size, size, dtype=x.dtype)
    count = torch.zeros(size, size, dtype=x.dtype)
    for i in starts:
        for j in starts:
            patch = (slice(i, i + window), slice(j, j + window))
            total[patch] += contrib[patch].sum()
            count[patch] += 1
    return total / count


@pytest.mark.parametrize("batch_size", [1, 3, 64])
@pytest.mark.parametrize(
    "size, window, stride, starts",
    [(7, 3, 2, [0, 2, 4]), (8, 3, 3, [0, 3, 6]), (8, 3, 2, [0, 2, 4, 6])],
    ids=["overlap-reaches-edge", "cut-off", "overlap-cut-off"],
)
def test_zero_occlusion_of_linear_model_is_mean_patch_sum(
    size: int, window: int, stride: int, starts: list[int], batch_size: int, randn: Callable[..., Tensor]
) -> None:
    w = randn(0, 2, 2, size, size)
    x = randn(1, 2, 2, size, size)
    model = linear_model(w)
    got = occlusion(model, x, [0, 1], window=window, stride=stride, batch_size=batch_size)
    assert got.shape == (2, 1, size, size)
    for b in range(2):
        expected = occlusion_by_hand(w[b], x[b], size, window, starts)
        torch.testing.assert_close(got[b, 0], expected, rtol=1e-12, atol=1e-12)


def test_zero_occlusion_cut_off_windows_literal_map() -> None:
    # Ones everywhere, H=W=8, window 3, stride 3: windows start at 0, 3, 6; the last row and column of
    # windows is cut to 2 pixels, so each pixel shows the size of the one window covering it.
    model = linear_model(torch.ones(1, 1, 8, 8, dtype=torch.float64))
    got = occlusion(model, torch.ones(1, 1, 8, 8, dtype=torch.float64), 0, window=3, stride=3)
    row = [9.0] * 6 + [6.0] * 2
    last = [6.0] * 6 + [4.0] * 2
    expected = torch.tensor([row] * 6 + [last] * 2, dtype=torch.float64)
    assert torch.equal(got[0, 0], expected)


def test_occlusion_baseline_and_rectangular_window(randn: Callable[..., Tensor]) -> None:
    w, x = randn(0, 1, 2, 6, 5), randn(1, 1, 2, 6, 5)
    baseline = torch.tensor([0.5, -1.0], dtype=torch.float64).view(2, 1, 1)
    got = occlusion(linear_model(w), x, 0, window=(3, 2), stride=(2, 1), baseline=baseline)
    # Linear model: the drop for a window is the sum of w * (x - baseline) over it.
    contrib = (w[0] * (x[0] - baseline)).sum(dim=0)
    total, count = torch.zeros(6, 5, dtype=torch.float64), torch.zeros(6, 5, dtype=torch.float64)
    for i in [0, 2, 4]:  # 4 + 3 > 6 - 1: reaches the edge
        for j in [0, 1, 2, 3]:  # 3 + 2 = 5: reaches the edge
            total[i : i + 3, j : j + 2] += contrib[i : i + 3, j : j + 2].sum()
            count[i : i + 3, j : j + 2] += 1
    torch.testing.assert_close(got[0, 0], total / count, rtol=1e-12, atol=1e-12)
    scalar = occlusion(linear_model(w), x, 0, window=(3, 2), stride=(2, 1), baseline=0.5)
    ref_scalar = ref.occlusion(linear_model(w), x, torch.tensor([0]), (3, 2), (2, 1), baseline=0.5)
    torch.testing.assert_close(scalar, ref_scalar, rtol=1e-12, atol=1e-12)


# --- closed forms: Grad-CAM of conv -> GAP -> linear is CAM --------------------------------------------


def cam_model(seed: int) -> tuple[nn.Module, nn.Conv2d, nn.Linear]:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        conv, fc = nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Linear(4, 3)
        model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc).double().eval()
    return model, conv, fc


@pytest.mark.parametrize("seed", SEEDS)
def test_grad_cam_of_gap_linear_head_is_cam(seed: int, randn: Callable[..., Tensor]) -> None:
    model, conv, fc = cam_model(seed)
    x = randn(seed, 2, 3, 8, 8)
    target = [0, 2]
    with torch.no_grad():
        act = F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)  # [2,4,4,4]
        # Zhou et al. 2016: CAM_c = sum_k w_ck A_k; Grad-CAM's channel weight is w_ck / (h*w).
        cam = torch.einsum("bk,bkhw->bhw", fc.weight[target], act)[:, None] / (4 * 4)
    assert cam.min() < 0 < cam.max()

    signed = grad_cam(model, x, target, layer="0", relu=False, upsample=False)
    torch.testing.assert_close(signed, cam, rtol=1e-12, atol=1e-12)
    rectified = grad_cam(model, x, target, layer="0", upsample=False)
    torch.testing.assert_close(rectified, cam.clamp_min(0), rtol=1e-12, atol=1e-12)
    up = F.interpolate(cam.clamp_min(0), size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(grad_cam(model, x, target, layer="0"), up, rtol=1e-12, atol=1e-12)
    up_signed = F.interpolate(cam, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(
        grad_cam(model, x, target, layer=conv, relu=False), up_signed, rtol=1e-12, atol=1e-12
    )


def test_grad_cam_layer_none_skips_dropout_and_identity(randn: Callable[..., Tensor]) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Dropout2d(0.5), nn.Identity(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
        ).double().eval()
    x = randn(0, 2, 3, 6, 6)
    # The last module with a spatial output that does more than hand its input on is the ReLU, "1".
    with pytest.warns(UserWarning, match="layer=None: using '1', the last spatial feature map"):
        auto = grad_cam(model, x, [0, 1], layer=None)
    assert torch.equal(auto, grad_cam(model, x, [0, 1], layer="1"))


# --- against the naive references, float64, several random models -------------------------------------


def predicted(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).argmax(dim=1)


@pytest.mark.parametrize("seed", SEEDS)
def test_gradient_methods_match_references(
    seed: int, small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    model, x = small_cnn(seed), randn(seed, 3, 3, 8, 8)
    t = predicted(model, x)
    for target in (None, t.tolist()):
        torch.testing.assert_close(saliency(model, x, target), ref.saliency(model, x, t))
        guided = guided_backprop(model, x, target)
        torch.testing.assert_close(guided, ref.guided_backprop(model, x, t))
    assert guided.abs().sum() > 0
    other = ((t + 1) % 5).tolist()
    torch.testing.assert_close(saliency(model, x, other), ref.saliency(model, x, torch.tensor(other)))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("layer", ["conv1", "relu1", "conv2", "pool", "conv3"])
def test_grad_cam_matches_reference(
    seed: int, layer: str, small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    model, x = small_cnn(seed), randn(seed, 3, 3, 8, 8)
    t = torch.tensor([1, 4, 0])
    for relu in (True, False):
        for upsample in (True, False):
            got = grad_cam(model, x, t, layer=layer, relu=relu, upsample=upsample)
            expected = ref.grad_cam(model, x, t, layer, relu=relu, upsample=upsample)
            torch.testing.assert_close(got, expected)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(
        guided_grad_cam(model, x, t, layer=layer), ref.guided_grad_cam(model, x, t, layer)
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "window, stride, baseline", [((3, 3), (2, 2), 0.0), ((4, 3), (3, 2), 0.3), ((2, 2), (1, 2), -1.0)]
)
def test_occlusion_matches_reference(
    seed: int,
    window: tuple[int, int],
    stride: tuple[int, int],
    baseline: float,
    small_cnn: Callable[[int], nn.Module],
    randn: Callable[..., Tensor],
) -> None:
    model, x = small_cnn(seed), randn(seed, 2, 3, 8, 8)
    got = occlusion(model, x, None, window=window, stride=stride, baseline=baseline, batch_size=5)
    expected = ref.occlusion(model, x, predicted(model, x), window, stride, baseline)
    torch.testing.assert_close(got, expected)
    assert expected.abs().sum() > 0


def test_reference_window_starts() -> None:
    # The reference's own rule, checked by hand so that the occlusion comparisons rest on it safely.
    assert ref.window_starts(7, 3, 2) == [0, 2, 4]
    assert ref.window_starts(8, 3, 3) == [0, 3, 6]
    assert ref.window_starts(8, 3, 2) == [0, 2, 4, 6]
    assert ref.window_starts(5, 5, 1) == [0]


# --- explain: the same maps as the methods one by one ---------------------------------------------------


@pytest.mark.parametrize("target", [None, [3, 1]])
def test_explain_equals_individual_methods(
    target: list[int] | None, small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    model, x = small_cnn(3), randn(3, 2, 3, 8, 8)
    occ: dict[str, Any] = {"window": 3, "stride": 2, "baseline": 0.1}
    got = explain(model, x, target, methods=list(METHODS), layer="conv2", relu=False, abs=True, **occ)
    assert list(got) == list(METHODS)
    expected = {
        "saliency": saliency(model, x, target, abs=True),
        "guided_backprop": guided_backprop(model, x, target),
        "grad_cam": grad_cam(model, x, target, layer="conv2", relu=False),
        "guided_grad_cam": guided_grad_cam(model, x, target, layer="conv2"),
        "occlusion": occlusion(model, x, target, **occ),
        "gradient_x_input": torchvis.gradient_x_input(model, x, target),
        "integrated_gradients": torchvis.integrated_gradients(model, x, target, baseline=0.1),
        # SmoothGrad and VarGrad of saliency get saliency's options too.
        "smoothgrad": torchvis.smoothgrad(model, x, target, abs=True),
        "vargrad": torchvis.vargrad(model, x, target, abs=True),
        "score_cam": torchvis.score_cam(model, x, target, layer="conv2"),
        **{name: METHODS[name](model, x, target, layer="conv2", relu=False)
           for name in ("grad_cam_pp", "xgrad_cam", "layer_cam", "hires_cam")},
    }
    assert set(expected) == set(METHODS)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-12, msg=name)
    by_function = explain(
        model, x, target, methods=[grad_cam, occlusion], layer="conv2", upsample=False, **occ
    )
    assert list(by_function) == ["grad_cam", "occlusion"]
    torch.testing.assert_close(
        by_function["grad_cam"], grad_cam(model, x, target, layer="conv2", upsample=False), rtol=0, atol=0
    )


@pytest.mark.parametrize("layers", [["conv1", "conv3"], ["pool"]])
def test_explain_with_a_list_of_layers_keys_each_layer(
    layers: list[str], small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    model, x = small_cnn(4), randn(4, 2, 3, 8, 8)
    got = explain(model, x, [0, 2], methods=["grad_cam", "saliency", "guided_grad_cam"], layer=layers)
    cams = [f"grad_cam/{layer}" for layer in layers]
    guided = [f"guided_grad_cam/{layer}" for layer in layers]
    assert list(got) == [*cams, "saliency", *guided]
    for layer, cam_key, guided_key in zip(layers, cams, guided, strict=True):
        torch.testing.assert_close(
            got[cam_key], grad_cam(model, x, [0, 2], layer=layer), rtol=1e-12, atol=1e-12
        )
        torch.testing.assert_close(
            got[guided_key], guided_grad_cam(model, x, [0, 2], layer=layer), rtol=1e-12, atol=1e-12
        )
    torch.testing.assert_close(got["saliency"], saliency(model, x, [0, 2]), rtol=1e-12, atol=1e-12)


def test_explain_explains_one_class_per_example(
    small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    # target=None resolves once; a user method receives the resolved classes.
    model, x = small_cnn(5), randn(5, 2, 3, 8, 8)
    seen: list[object] = []

    def probe(model: nn.Module, x: Tensor, target: object = None) -> Tensor:
        seen.append(target)
        return x

    explain(model, x, methods=["saliency", probe])
    assert len(seen) == 1 and isinstance(seen[0], Tensor)
    assert seen[0].tolist() == predicted(model, x).tolist()


# --- guided backprop says when it cannot treat an activation ------------------------------------------


def test_guided_backprop_warns_about_gelu_and_silu(randn: Callable[..., Tensor]) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.GELU(), nn.Conv2d(4, 4, 3), nn.SiLU(), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
        ).double().eval()
    with pytest.warns(UserWarning, match="guided backprop") as record:
        guided_backprop(model, randn(0, 2, 3, 8, 8), 0)
    message = " ".join(str(w.message) for w in record)
    assert "gelu" in message and "silu" in message


def test_guided_backprop_is_silent_for_relu_models(
    small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guided_backprop(small_cnn(0), randn(0, 2, 3, 8, 8), 0)
        guided_grad_cam(small_cnn(0), randn(0, 2, 3, 8, 8), 0, layer="conv3")


class Pattern(nn.Module):
    """A fixed spatial map (a buffer), the same for every input."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("pattern", torch.linspace(0, 1, 4 * 36).view(1, 4, 6, 6))

    def forward(self, x: Tensor) -> Tensor:
        return self.pattern.expand(x.shape[0], -1, -1, -1)


class ConstantTail(nn.Module):
    """A conv whose output feeds the head, then a module whose spatial output does not depend on the
    input: the last spatial map of a forward without gradients, not of one with them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bias_map = Pattern()
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        a = self.conv(x).relu()
        return self.head((a + self.bias_map(x)).mean(dim=(2, 3)))


def test_explain_runs_every_layer_method_at_the_layer_its_key_names() -> None:
    """With layer=None the shared pass picks the layer; a method that runs itself (Score-CAM) gets that
    layer by name, not its own pick, so ``score_cam/<layer>`` is Score-CAM at that layer."""
    torch.manual_seed(0)
    model = ConstantTail().eval()
    x = torch.rand(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = explain(model, x, methods=["grad_cam", "score_cam"], layer=[None])
        alone = torchvis.score_cam(model, x, layer="conv")
    assert sorted(got) == ["grad_cam/conv", "score_cam/conv"]
    torch.testing.assert_close(got["score_cam/conv"], alone, rtol=0, atol=0)
