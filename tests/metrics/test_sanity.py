"""Sanity checks: the statistics against SciPy and scikit-image, cascading randomisation by hand on a
linear model, constant maps, the table, the figure, bad inputs, hygiene."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity
from torch import Tensor, nn

import torchvis
from torchvis.metrics.sanity import randomize_
from torchvis.metrics.similarity import average_ranks, minmax, spearman, ssim
from torchvis.rendering.sanity_figure import sanity_figure


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Statistics against independent implementations


def test_spearman_matches_scipy_with_ties() -> None:
    g = gen(0)
    a = torch.randint(0, 5, (6, 40), generator=g).double()  # many ties
    b = a + torch.randn(6, 40, generator=g, dtype=torch.float64) * 2
    b[0] = torch.randint(0, 3, (40,), generator=g).double()
    got = spearman(a, b)
    want = [spearmanr(a[i].numpy(), b[i].numpy()).statistic for i in range(6)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    from scipy.stats import rankdata

    torch.testing.assert_close(average_ranks(a), torch.tensor(rankdata(a.numpy(), axis=1) - 1))


def test_spearman_of_a_constant_row_is_nan() -> None:
    assert math.isnan(spearman(torch.ones(1, 5), torch.arange(5.0)[None]).item())


@pytest.mark.parametrize("size", [(28, 28), (12, 11)])
def test_ssim_matches_scikit_image(size: tuple[int, int]) -> None:
    g = gen(1)
    a = torch.rand(3, 1, *size, generator=g, dtype=torch.float64)
    b = (a + 0.3 * torch.rand(3, 1, *size, generator=g, dtype=torch.float64)).clamp(0, 1)
    want = [
        structural_similarity(a[i, 0].numpy(), b[i, 0].numpy(), data_range=1.0, gaussian_weights=True,
                              sigma=1.5, use_sample_covariance=False)
        for i in range(3)
    ]
    torch.testing.assert_close(ssim(a, b), torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ssim(a, a), torch.ones(3, dtype=torch.float64))


def test_ssim_of_a_small_map_uses_the_largest_window_that_fits() -> None:
    # 7x8 maps: a 7x7 Gaussian window (sigma 1.5) at the two positions where it fits, written out.
    g = gen(2)
    a, b = torch.rand(2, 1, 7, 8, generator=g, dtype=torch.float64), torch.rand(2, 1, 7, 8, generator=g,
                                                                                dtype=torch.float64)
    w1 = torch.exp(-((torch.arange(7, dtype=torch.float64) - 3) ** 2) / (2 * 1.5**2))
    w = (w1[:, None] * w1[None, :]) / w1.sum() ** 2
    want = []
    for i in range(2):
        values = []
        for j in range(2):
            p, q = a[i, 0, :, j : j + 7], b[i, 0, :, j : j + 7]
            mp, mq = (w * p).sum(), (w * q).sum()
            vp, vq, cov = (w * p * p).sum() - mp**2, (w * q * q).sum() - mq**2, (w * p * q).sum() - mp * mq
            c1, c2 = 0.01**2, 0.03**2
            values.append(((2 * mp * mq + c1) * (2 * cov + c2)) / ((mp**2 + mq**2 + c1) * (vp + vq + c2)))
        want.append(sum(values) / 2)
    torch.testing.assert_close(ssim(a, b), torch.stack(want), rtol=1e-12, atol=1e-12)


def test_minmax_scales_each_example_to_the_unit_interval() -> None:
    v = torch.tensor([[[[2.0, 4.0, 3.0]]], [[[-1.0, 1.0, 0.0]]]])
    torch.testing.assert_close(minmax(v), torch.tensor([[[[0.0, 1.0, 0.5]]], [[[0.0, 1.0, 0.5]]]]))


# ---------------------------------------------------------------------------------------------
# Cascading randomisation on a linear model, by hand


def two_linear() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Linear(8, 3)).double().eval()


def redrawn(shape: tuple[int, ...], fan_in: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """PyTorch's default initialisation of a weight and its bias, from ``g``, weight first."""
    w = torch.empty(shape, dtype=torch.float64)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
    b = torch.empty(shape[0], dtype=torch.float64)
    bound = 1 / math.sqrt(fan_in)
    nn.init.uniform_(b, -bound, bound, generator=g)
    return w, b


def test_cascading_randomisation_by_hand() -> None:
    model = two_linear()
    x = torch.randn(4, 1, 4, 4, generator=gen(2), dtype=torch.float64)
    w1, w2 = model[1].weight.detach(), model[2].weight.detach()
    target = model(x).argmax(dim=1)
    result = torchvis.sanity_check(model, x, ["saliency"], seed=7)
    assert result.stages == ("2", "1")  # the modules with parameters, last first
    g = gen(7)
    w2_new, _ = redrawn((3, 8), 8, g)
    w1_new, _ = redrawn((8, 16), 16, g)
    # The gradient of a linear chain is the target's row of the weight product, for the original
    # targets, whatever the randomised model predicts.
    expected = [(w2 @ w1)[target], (w2_new @ w1)[target], (w2_new @ w1_new)[target]]
    for stage, want in enumerate(expected):
        torch.testing.assert_close(result.maps["saliency"][stage], want.view(4, 1, 4, 4))
    assert torch.equal(result.target, target)
    for stage, name in ((1, "2"), (2, "1")):
        row = result.row("saliency", name)
        orig, new = expected[0].numpy(), expected[stage].numpy()
        assert row.spearman_abs == pytest.approx(
            np.mean([spearmanr(abs(orig[i]), abs(new[i])).statistic for i in range(4)]), abs=1e-12)
        assert row.spearman == pytest.approx(
            np.mean([spearmanr(orig[i], new[i]).statistic for i in range(4)]), abs=1e-12)
        want_ssim = ssim(minmax(torch.tensor(abs(orig)).view(4, 1, 4, 4)),
                         minmax(torch.tensor(abs(new)).view(4, 1, 4, 4)))
        assert row.ssim == pytest.approx(want_ssim.mean().item(), abs=1e-12)
        assert (row.constant, row.examples) == (0, 4)


def test_randomize_draws_weight_then_bias_from_the_generator() -> None:
    conv, norm = nn.Conv2d(2, 3, 3).double(), nn.BatchNorm2d(3).double()
    randomize_(nn.Sequential(conv, norm), lambda device: gen_5)
    g = gen(5)
    w, b = redrawn((3, 2, 3, 3), 2 * 3 * 3, g)
    torch.testing.assert_close(conv.weight.detach(), w)
    torch.testing.assert_close(conv.bias.detach(), b)
    scale, shift = torch.empty(3, dtype=torch.float64), torch.empty(3, dtype=torch.float64)
    nn.init.uniform_(scale, -1, 1, generator=g)
    nn.init.uniform_(shift, -1, 1, generator=g)
    torch.testing.assert_close(norm.weight.detach(), scale)
    torch.testing.assert_close(norm.bias.detach(), shift)
    assert torch.equal(norm.running_var, torch.ones(3, dtype=torch.float64))  # buffers kept


gen_5 = gen(5)


def test_layers_seed_and_layer_option() -> None:
    model = two_linear()
    x = torch.randn(2, 1, 4, 4, generator=gen(3), dtype=torch.float64)
    one = torchvis.sanity_check(model, x, "saliency", layers=[model[1]], seed=1)
    assert one.stages == ("1",)
    again = torchvis.sanity_check(model, x, "saliency", layers=["1"], seed=1)
    other = torchvis.sanity_check(model, x, "saliency", layers=["1"], seed=2)
    assert torch.equal(one.maps["saliency"][1], again.maps["saliency"][1])
    assert not torch.equal(one.maps["saliency"][1], other.maps["saliency"][1])


def test_cam_layer_given_as_a_module_addresses_the_copy(small_cnn: Callable[[int], nn.Module],
                                                        randn: Callable[..., Tensor]) -> None:
    model, x = small_cnn(0), randn(0, 2, 3, 8, 8)
    by_module = torchvis.sanity_check(model, x, ["grad_cam"], layers=["head.2"], layer=model.relu2)
    by_name = torchvis.sanity_check(model, x, ["grad_cam"], layers=["head.2"], layer="relu2")
    for a, b in zip(by_module.maps["grad_cam"], by_name.maps["grad_cam"], strict=True):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# Constant maps, the table, the figure


def first_empty(model: nn.Module, x: Tensor, target: torchvis.core.targets.Target = None) -> Tensor:
    """Saliency, but exactly zero for the first example."""
    out = torchvis.saliency(model, x, target)
    out[0] = 0
    return out


class EmptyFirstTime:
    """Saliency, but exactly zero on the first call: the original map is constant, later ones not."""

    __name__ = "empty_first_time"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model: nn.Module, x: Tensor, target: torchvis.core.targets.Target = None) -> Tensor:
        self.calls += 1
        out = torchvis.saliency(model, x, target)
        return out * 0 if self.calls == 1 else out


def all_empty(model: nn.Module, x: Tensor, target: torchvis.core.targets.Target = None) -> Tensor:
    return torch.zeros_like(x)


def test_constant_maps_are_counted_not_averaged() -> None:
    model = two_linear()
    x = torch.randn(3, 1, 4, 4, generator=gen(4), dtype=torch.float64)
    result = torchvis.sanity_check(model, x, ["saliency", first_empty, all_empty, EmptyFirstTime()])
    assert result.methods == ("saliency", "first_empty", "all_empty", "empty_first_time")
    for stage in result.stages:
        full, part = result.row("saliency", stage), result.row("first_empty", stage)
        assert (part.constant, part.examples) == (1, 3)
        sal = result.maps["saliency"]
        index = result.stages.index(stage) + 1
        rest = spearman(sal[0][1:].abs().flatten(1), sal[index][1:].abs().flatten(1)).mean().item()
        assert part.spearman_abs == pytest.approx(rest, abs=1e-12) and full.constant == 0
        empty = result.row("all_empty", stage)
        assert (empty.spearman_abs, empty.spearman, empty.ssim, empty.constant) == (None, None, None, 3)
        assert result.row("empty_first_time", stage).constant == 3  # constant in the original only
    text = str(result)
    lines = text.splitlines()
    assert lines[0].split() == ["method", "randomised", "down", "to", "spearman", "|map|", "spearman", "SSIM",
                                "constant"]
    assert set(lines[1]) == {"-", " "}
    assert len(lines) == 2 + 4 * 2
    empty_line = next(line for line in lines if line.startswith("all_empty"))
    assert empty_line.split() == ["all_empty", "2", "n/a", "n/a", "n/a", "3/3"]
    row = result.row("saliency", "2")
    sal_line = next(line for line in lines if line.startswith("saliency") and line.split()[1] == "2")
    assert sal_line.split()[2:5] == [f"{row.spearman_abs:+.3f}", f"{row.spearman:+.3f}", f"{row.ssim:+.3f}"]
    data = json.loads(json.dumps(result.to_dict()))
    assert data["stages"] == ["2", "1"] and len(data["rows"]) == 8
    assert data["rows"][0] == {"method": "saliency", "stage": "2", "spearman_abs": row.spearman_abs,
                               "spearman": row.spearman, "ssim": row.ssim, "constant": 0, "examples": 3}
    with pytest.raises(KeyError, match="no row"):
        result.row("saliency", "0")


@pytest.mark.filterwarnings("ignore::torchvis.methods.cam.EmptyMapWarning")  # random weights
def test_figure_has_a_panel_per_method_and_stage(small_cnn: Callable[[int], nn.Module],
                                                  randn: Callable[..., Tensor]) -> None:
    model, x = small_cnn(0), randn(0, 2, 3, 8, 8).sigmoid()
    result = torchvis.sanity_check(model, x, ["saliency", "grad_cam", "guided_backprop"], layer="pool",
                                   layers=["head.2", "conv3"])
    fig = sanity_figure(result, example=1)
    assert len(fig.axes) == 3 * 3
    assert [ax.get_title().splitlines()[0] for ax in fig.axes[:3]] == ["original", "head.2", "conv3"]
    rho = result.row("saliency", "conv3").spearman_abs
    assert fig.axes[2].get_title().splitlines()[1] == f"ρ|·|={rho:+.2f}"
    assert [fig.axes[i].get_ylabel() for i in (0, 3, 6)] == ["saliency", "Grad-CAM", "guided backprop"]
    with pytest.raises(ValueError, match="out of range"):
        sanity_figure(result, example=2)


# ---------------------------------------------------------------------------------------------
# Bad input and hygiene


def test_bad_inputs_are_clear_errors() -> None:
    model = two_linear()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown layer 'l1'"):
        torchvis.sanity_check(model, x, ["saliency"], layers=["l1"])
    with pytest.raises(ValueError, match="'0' has no parameters"):
        torchvis.sanity_check(model, x, ["saliency"], layers=["0"])
    with pytest.raises(ValueError, match="twice"):
        torchvis.sanity_check(model, x, ["saliency"], layers=["1", "1"])
    with pytest.raises(ValueError, match="layers is empty"):
        torchvis.sanity_check(model, x, ["saliency"], layers=[])
    with pytest.raises(ValueError, match="methods is empty"):
        torchvis.sanity_check(model, x, [])
    with pytest.raises(ValueError, match="unknown method"):
        torchvis.sanity_check(model, x, ["salience"])
    # A 3-D tensor is a signal [B,C,L] now; a tensor without a batch dimension is still refused.
    with pytest.raises(ValueError, match=r"batch dimension \[B, \.\.\.\]"):
        torchvis.sanity_check(model, x[0, 0, 0, 0], ["saliency"])
    with pytest.raises(ValueError, match="no parameters to randomise"):
        torchvis.sanity_check(nn.Flatten(), x.view(2, 16, 1, 1), ["saliency"])
    with pytest.raises(ValueError, match="out of range"):
        torchvis.sanity_check(model, x, ["saliency"], target=3)


class Raising(nn.Module):
    """A CNN with batch norm and dropout whose forward raises at call ``raise_at``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 6 * 6, 5)
        self.calls, self.raise_at = 0, -1

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.calls == self.raise_at:
            raise RuntimeError("boom")
        return self.fc(self.drop(self.relu(self.bn(self.conv(x)))).flatten(1))


@pytest.mark.parametrize("raise_at", [-1, 1, 3])
def test_the_users_model_is_untouched(raise_at: int) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, x = Raising(), torch.randn(2, 3, 6, 6)
    model.train()
    model.drop.eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x_before, rng = x.clone(), torch.get_rng_state()
    model.raise_at = raise_at
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if raise_at > 0:
            with pytest.raises(RuntimeError, match="boom"):
                torchvis.sanity_check(model, x, ["saliency", "grad_cam", "occlusion"], layer="relu", window=3)
        else:
            torchvis.sanity_check(model, x, ["saliency", "grad_cam", "occlusion"], layer="relu", window=3)
    assert model.training and model.bn.training and not model.drop.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in model.parameters() if p.grad is not None)
    assert torch.equal(x, x_before) and torch.equal(torch.get_rng_state(), rng)
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())
    assert model.calls == 1  # the target pass; every other forward ran on the copy
