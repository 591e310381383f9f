"""Gradient x input, Integrated Gradients (against Captum, closed forms, completeness), SmoothGrad and
VarGrad (exactness at noise 0, seeds, the global RNG, a linear model, a per-sample reference)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import references as ref
import torch
from captum.attr import IntegratedGradients
from torch import Tensor, nn

import torchvis
from torchvis.methods import explain, path
from torchvis.methods.noise import smoothgrad, vargrad
from torchvis.methods.path import RULES, integrated_gradients, quadrature


@pytest.fixture
def float64_default(default_dtype: torch.dtype) -> Iterator[None]:
    """Captum builds its Riemann nodes with ``torch.linspace`` in the default dtype (float32 unless
    set); in float64 both libraries integrate at the same nodes to the last bits."""
    torch.set_default_dtype(torch.float64)
    yield


def linear_model(weight: Tensor, bias: Tensor) -> nn.Module:
    """logits = weight.flatten(1) @ x.flatten() + bias, for ``weight`` ``[K,C,H,W]``."""
    fc = nn.Linear(weight[0].numel(), weight.shape[0]).double()
    with torch.no_grad():
        fc.weight.copy_(weight.flatten(1))
        fc.bias.copy_(bias)
    return nn.Sequential(nn.Flatten(), fc).eval()


def relu_mlp(seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                             nn.Linear(16, 4)).double().eval()


# --- gradient x input ------------------------------------------------------------------------------


def test_gradient_x_input_of_a_linear_model_is_each_inputs_share(randn: Callable[..., Tensor]) -> None:
    w, x = randn(0, 3, 2, 3, 3), randn(1, 2, 2, 3, 3)
    model = linear_model(w, torch.zeros(3, dtype=torch.float64))
    got = torchvis.gradient_x_input(model, x, [2, 0])
    torch.testing.assert_close(got, w[[2, 0]] * x, rtol=0, atol=1e-15)
    torch.testing.assert_close(got.flatten(1).sum(dim=1), model(x)[[0, 1], [2, 0]].detach())


def test_gradient_x_input_matches_reference(
    small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    model, x = small_cnn(0), randn(0, 3, 3, 8, 8)
    t = torch.tensor([1, 0, 4])
    torch.testing.assert_close(torchvis.gradient_x_input(model, x, t), ref.gradient_x_input(model, x, t))


# --- integrated gradients --------------------------------------------------------------------------


def captum_ig(model: nn.Module, x: Tensor, target: Tensor, baseline: Tensor, steps: int, rule: str) -> Tensor:
    ig = IntegratedGradients(model)
    attributions = ig.attribute(x, baseline, target=target, n_steps=steps, method=rule)
    return attributions.detach()


def captum_quadrature(rule: str, steps: int) -> tuple[list[float], list[float]]:
    """Our nodes with Captum's weights: it casts them to float32 (``torch.tensor(step_sizes).float()``
    in ``IntegratedGradients._attribute``), and its trapezoid weights are ``(steps-1)/steps`` times the
    trapezoid rule's."""
    nodes, weights = quadrature(rule, steps)
    if rule == "riemann_trapezoid":
        weights = [w * (steps - 1) / steps for w in weights]
    return nodes, torch.tensor(weights, dtype=torch.float64).float().double().tolist()


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("steps", [2, 9])
def test_integrated_gradients_equals_captum(
    rule: str, steps: int, small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every rule at several step counts on random CNNs, a number and a broadcast tensor as baseline.
    With Captum's float32 weights swapped in, the results agree to float64 rounding (so nodes, weights
    and the sum are the same); as shipped, to Captum's float32 rounding of the weights — after scaling
    Captum's trapezoid by ``steps/(steps-1)``."""
    for seed in (0, 1) if steps < 5 else (2,):
        model, x = small_cnn(seed), randn(seed, 3, 3, 8, 8)
        t = torch.tensor([2, 0, 4])
        for baseline in (0.0, 0.3 * randn(seed + 10, 1, 3, 1, 1)):
            theirs = captum_ig(model, x, t, torch.as_tensor(baseline).expand_as(x).contiguous(), steps, rule)
            options: dict[str, Any] = {"baseline": baseline, "steps": steps, "rule": rule, "batch_size": 5}
            shipped = integrated_gradients(model, x, t, **options)
            scale = steps / (steps - 1) if rule == "riemann_trapezoid" else 1.0
            # Float32 weights: an error of 6e-8 relative to each step's term, which may cancel in the sum.
            largest = float(theirs.abs().max())
            torch.testing.assert_close(shipped, theirs * scale, rtol=3e-7, atol=3e-7 * largest)
            with monkeypatch.context() as patch:
                patch.setattr(path, "quadrature", captum_quadrature)
                same_weights = integrated_gradients(model, x, t, **options)
            torch.testing.assert_close(same_weights, theirs, rtol=1e-11, atol=1e-14)
    assert theirs.abs().sum() > 0


@pytest.mark.usefixtures("float64_default")
def test_integrated_gradients_equals_captum_on_resnet18(
    resnet18: nn.Module, randn: Callable[..., Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(path, "quadrature", captum_quadrature)
    x, t = randn(7, 2, 3, 32, 32), torch.tensor([3, 8])
    for rule, steps in (("gausslegendre", 4), ("riemann_middle", 3)):
        got, delta = integrated_gradients(resnet18, x, t, steps=steps, rule=rule, return_delta=True)
        theirs, their_delta = IntegratedGradients(resnet18).attribute(
            x, torch.zeros_like(x), target=t, n_steps=steps, method=rule, return_convergence_delta=True
        )
        torch.testing.assert_close(got, theirs.detach(), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(delta, their_delta.detach(), rtol=1e-9, atol=1e-13)


def test_quadrature_nodes_and_weights() -> None:
    """The rules by hand; Gauss-Legendre integrates a polynomial of degree 2n-1 exactly on [0, 1]."""
    assert quadrature("riemann_left", 4) == ([0.0, 0.25, 0.5, 0.75], [0.25] * 4)
    assert quadrature("riemann_right", 2) == ([0.5, 1.0], [0.5, 0.5])
    assert quadrature("riemann_middle", 2) == ([0.25, 0.75], [0.5, 0.5])
    assert quadrature("riemann_trapezoid", 3) == ([0.0, 0.5, 1.0], [0.25, 0.5, 0.25])
    nodes, weights = quadrature("gausslegendre", 3)
    assert abs(sum(w * a**5 for a, w in zip(nodes, weights, strict=True)) - 1 / 6) < 1e-15
    assert all(0 < a < 1 for a in nodes) and abs(sum(weights) - 1) < 1e-15


@pytest.mark.parametrize("rule", RULES)
def test_integrated_gradients_of_a_linear_model_is_the_closed_form(
    rule: str, randn: Callable[..., Tensor]
) -> None:
    """IG = (x - x') * w exactly: the gradient is w all along the path, and every rule's weights sum
    to 1; the completeness gap is 0."""
    w, x = randn(2, 3, 2, 3, 3), randn(3, 2, 2, 3, 3)
    model = linear_model(w, torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    baseline = randn(4, 1, 2, 3, 1)
    for steps in (2, 5) if rule == "riemann_trapezoid" else (1, 2, 5):
        got, delta = integrated_gradients(model, x, [1, 2], baseline=baseline, steps=steps, rule=rule,
                                          return_delta=True)
        torch.testing.assert_close(got, (x - baseline) * w[[1, 2]], rtol=1e-13, atol=1e-14)
        assert delta.abs().max() < 1e-12


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_middle", "riemann_trapezoid", "riemann_left"])
def test_completeness_on_a_piecewise_linear_model_as_steps_grow(
    rule: str, randn: Callable[..., Tensor]
) -> None:
    """sum(IG) -> F(x) - F(x') as the rule's nodes fill the path; the delta returned is that gap."""
    model, x = relu_mlp(0), 2 * randn(5, 2, 3, 2, 2)
    gaps = []
    for steps in (4, 16, 128):
        got, delta = integrated_gradients(model, x, [1, 3], steps=steps, rule=rule, return_delta=True)
        with torch.no_grad():
            expected_gap = model(x)[[0, 1], [1, 3]] - model(torch.zeros_like(x))[[0, 1], [1, 3]]
        torch.testing.assert_close(delta, got.flatten(1).sum(dim=1) - expected_gap, rtol=0, atol=1e-12)
        gaps.append(float(delta.abs().max() / expected_gap.abs().max()))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-2, gaps
    assert gaps[0] > 1e-2, "a too easy model: the gap must be visible at 4 steps"


def test_integrated_gradients_batches_and_default_target(
    small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    model, x = small_cnn(2), randn(2, 3, 3, 8, 8)
    with torch.no_grad():
        t = model(x).argmax(dim=1)
    expected = integrated_gradients(model, x, t, steps=6, batch_size=18)
    for batch_size in (1, 4, 7, None):
        torch.testing.assert_close(integrated_gradients(model, x, steps=6, batch_size=batch_size), expected,
                                   rtol=1e-12, atol=1e-14)
    got32 = integrated_gradients(model.float(), x.float(), t, steps=6)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, rtol=1e-3, atol=1e-5)


def test_integrated_gradients_bad_input(
    small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    model, x = small_cnn(0), randn(0, 2, 3, 8, 8)
    for steps in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="steps must be an int >= 1"):
            integrated_gradients(model, x, steps=steps)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="trapezoid rule needs steps >= 2"):
        integrated_gradients(model, x, steps=1, rule="riemann_trapezoid")
    with pytest.raises(ValueError, match=r"unknown rule 'riemann'; choose one of gausslegendre, riemann_le"):
        integrated_gradients(model, x, rule="riemann")
    with pytest.raises(ValueError, match=r"shape \[3, 8\] does not broadcast to x's shape \[2, 3, 8, 8\]"):
        integrated_gradients(model, x, baseline=torch.zeros(3, 8))
    with pytest.raises(ValueError, match=r"baseline of shape \[4, 3, 8, 8\]"):
        integrated_gradients(model, x, baseline=torch.zeros(4, 3, 8, 8))
    with pytest.raises(TypeError, match="baseline must be a number or a tensor"):
        integrated_gradients(model, x, baseline="black")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        integrated_gradients(model, x, batch_size=0)


# --- SmoothGrad and VarGrad ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, options",
    [("saliency", {}), ("guided_backprop", {}), ("grad_cam", {"layer": "conv2"}),
     ("integrated_gradients", {"steps": 4}), ("gradient_x_input", {})],
)
def test_noise_zero_is_the_method_itself(
    method: str, options: dict[str, Any], small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    model, x = small_cnn(1), randn(1, 2, 3, 8, 8)
    expected = torchvis.METHODS[method](model, x, [0, 3], **options)
    assert torch.equal(smoothgrad(model, x, [0, 3], method=method, noise=0, samples=4, **options), expected)
    spread = vargrad(model, x, [0, 3], method=method, noise=0.0, **options)
    assert torch.equal(spread, torch.zeros_like(expected))


@pytest.mark.parametrize(
    "method, reference, options",
    [("saliency", ref.saliency, {}), ("grad_cam", ref.grad_cam, {"layer": "conv3"})],
)
def test_smoothgrad_and_vargrad_match_the_per_sample_reference(
    method: str, reference: Callable[..., Tensor], options: dict[str, Any],
    small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor],
) -> None:
    """Noise drawn sample by sample (sigma = noise * range per example), every copy explaining the class
    of the clean input; mean and population variance."""
    model, x = small_cnn(3), randn(3, 3, 3, 8, 8)
    with torch.no_grad():
        t = model(x).argmax(dim=1)
    per_sample = ref.smoothgrad_samples(
        reference, model, x, t, samples=5, noise=0.4, seed=7,
        **({"layer": options["layer"]} if options else {}),
    )
    for batch_size in (2, 7, None):
        settings = {"method": method, "samples": 5, "noise": 0.4, "seed": 7, "batch_size": batch_size}
        settings.update(options)
        got = smoothgrad(model, x, **settings)
        torch.testing.assert_close(got, per_sample.mean(dim=0), rtol=1e-10, atol=1e-13)
        spread = vargrad(model, x, **settings)
        variance = ((per_sample - per_sample.mean(dim=0)) ** 2).mean(dim=0)
        torch.testing.assert_close(spread, variance, rtol=1e-9, atol=1e-15)
    assert variance.abs().sum() > 0


def test_smoothgrad_seed_reproduces_and_the_global_rng_stays(
    small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    model, x = small_cnn(4), randn(4, 2, 3, 8, 8)
    state = torch.get_rng_state()
    first = smoothgrad(model, x, samples=6, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(smoothgrad(model, x, samples=6, seed=3, batch_size=5), first)
    assert not torch.allclose(smoothgrad(model, x, samples=6, seed=4), first)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(smoothgrad(model, x, samples=6, seed=3), first)


def test_smoothgrad_of_a_linear_model_is_the_weight_row(randn: Callable[..., Tensor]) -> None:
    w, x = randn(5, 3, 2, 3, 3), randn(6, 2, 2, 3, 3)
    model = linear_model(w, torch.zeros(3, dtype=torch.float64))
    for noise in (0.05, 1.0, 20.0):
        torch.testing.assert_close(smoothgrad(model, x, [2, 1], noise=noise, samples=7), w[[2, 1]],
                                   rtol=0, atol=1e-15)
        assert torch.equal(vargrad(model, x, [2, 1], noise=noise, samples=7), torch.zeros_like(x))


def test_smoothgrad_explains_the_class_of_the_clean_input(randn: Callable[..., Tensor]) -> None:
    """At noise 20 the noisy copies' own argmax varies; the class explained must not."""
    model, x = relu_mlp(1), randn(8, 2, 3, 2, 2)
    with torch.no_grad():
        t = model(x).argmax(dim=1)
    per_sample = ref.smoothgrad_samples(ref.saliency, model, x, t, samples=12, noise=20.0, seed=1)
    got = smoothgrad(model, x, noise=20.0, samples=12, seed=1)
    torch.testing.assert_close(got, per_sample.mean(dim=0), rtol=1e-10, atol=1e-13)
    own_class = ref.smoothgrad_samples(lambda m, image, _: m(image).argmax(dim=1, keepdim=True).double(),
                                       model, x, t, samples=12, noise=20.0, seed=1)
    assert (own_class[..., 0] != t).any(), "the noisy copies must not all keep the clean class"


def test_smoothgrad_in_explain_passes_its_options_on(
    small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    model, x = small_cnn(5), randn(5, 2, 3, 8, 8)
    maps = explain(model, x, methods=["smoothgrad", "saliency"], method="guided_backprop", samples=3, seed=2)
    assert torch.equal(maps["smoothgrad"], smoothgrad(model, x, method="guided_backprop", samples=3, seed=2))


def test_smoothgrad_of_a_layer_method_in_explain_gets_the_requested_layers(
    small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    """SmoothGrad of Grad-CAM in explain smooths the CAM at each layer asked for (it used to run at
    the automatic layer, whatever was asked); SmoothGrad of saliency beside it takes no layer."""
    model, x = small_cnn(5), randn(5, 2, 3, 8, 8)
    options = {"method": "grad_cam", "samples": 3, "seed": 2}
    at = {name: smoothgrad(model, x, layer=name, **options) for name in ("conv1", "conv2")}
    assert not torch.equal(at["conv1"], at["conv2"])
    one = explain(model, x, methods=["smoothgrad"], layer="conv1", **options)
    assert torch.equal(one["smoothgrad"], at["conv1"])
    both = explain(model, x, methods=["grad_cam", "vargrad"], layer=["conv1", "conv2"], **options)
    assert set(both) == {"grad_cam/conv1", "grad_cam/conv2", "vargrad/conv1", "vargrad/conv2"}
    for name in ("conv1", "conv2"):
        assert torch.equal(both[f"vargrad/{name}"], vargrad(model, x, layer=name, **options))
    signed = explain(model, x, methods=["smoothgrad"], layer="conv1", relu=False, upsample=None, **options)
    assert torch.equal(signed["smoothgrad"], smoothgrad(model, x, layer="conv1", relu=False, upsample=None,
                                                        **options))  # the CAM's own options reach it
    # Two methods of their own passes that take a layer, layer=None: each picks it itself.
    with pytest.warns(UserWarning, match="layer=None"):
        auto = explain(model, x, methods=["smoothgrad", "vargrad"], **options)
        alone = smoothgrad(model, x, **options)
    assert set(auto) == {"smoothgrad", "vargrad"} and torch.equal(auto["smoothgrad"], alone)
    plain = explain(model, x, methods=["smoothgrad", "grad_cam"], layer=["conv1", "conv2"], samples=3, seed=2)
    assert set(plain) == {"smoothgrad", "grad_cam/conv1", "grad_cam/conv2"}
    assert torch.equal(plain["smoothgrad"], smoothgrad(model, x, samples=3, seed=2))


def test_smoothgrad_bad_input(small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]) -> None:
    model, x = small_cnn(0), randn(0, 2, 3, 8, 8)
    for function in (smoothgrad, vargrad):
        for samples in (0, -1, 1.5):
            with pytest.raises(ValueError, match="samples must be an int >= 1"):
                function(model, x, samples=samples)  # type: ignore[arg-type]
        for noise in (-0.1, float("nan"), "0.1"):
            with pytest.raises(ValueError, match="noise must be a number >= 0"):
                function(model, x, noise=noise)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"unknown method 'salency' \(did you mean 'saliency'"):
            function(model, x, method="salency")
        for perturbation in ("occlusion", "score_cam"):
            with pytest.raises(ValueError, match=rf"a gradient method; '{perturbation}' runs forward"):
                function(model, x, method=perturbation, window=3)
        with pytest.raises(TypeError, match=r"method 'saliency' takes no option\(s\) \['layer'\]"):
            function(model, x, layer="conv2")
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            function(model, x, batch_size=0)
    assert np.isfinite(float(smoothgrad(model, x, samples=1).abs().sum()))


@pytest.mark.parametrize("method", ["smoothgrad", "vargrad", "integrated_gradients"])
@pytest.mark.parametrize("target", [None, 1, [1, 0], torch.tensor([2, 1]), lambda out: out[:, 1]],
                         ids=["none", "int", "list", "tensor", "callable"])
def test_a_given_target_skips_the_clean_forward(method: str, target: Any) -> None:
    """The rows the model sees: the clean x first only when the target must be read from it (None);
    the maps equal the ones with the clean pass (the target resolved first, then given)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.Tanh(), nn.Linear(3, 3)).double().eval()
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    options = {"steps": 4} if method == "integrated_gradients" else {"samples": 4}
    try:
        got = torchvis.METHODS[method](model, x, target, batch_size=8, **options)
    finally:
        handle.remove()
    assert calls == ([2, 8] if target is None else [8])
    classes = model(x).argmax(dim=1) if target is None else target
    resolved = classes(model(x)).detach() if callable(classes) else classes
    if callable(target):
        expected = torchvis.METHODS[method](model, x, target, batch_size=8, **options)
    else:
        classes_per_example = torch.as_tensor(resolved).expand(2)
        expected = torchvis.METHODS[method](model, x, classes_per_example, batch_size=8, **options)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
