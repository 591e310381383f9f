"""The sanity check over tuples of inputs with extra forward arguments and callable targets: one row per
method, stage and input; SSIM only for image maps."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import seeded
from input_kinds import TwoInputs
from scipy.stats import spearmanr
from torch import Tensor, nn

import torchvis
from torchvis.methods import explain

Randn = Callable[..., Tensor]


class Chain(nn.Module):
    """Features ``a`` ``[B,4]`` and ``b`` ``[B,3]`` -> linear -> times a per-example ``gain`` -> linear:
    the gradient is ``gain * (W2 @ W1)[target]``, split between the inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(7, 5, bias=False)
        self.l2 = nn.Linear(5, 3, bias=False)

    def forward(self, a: Tensor, b: Tensor, gain: Tensor) -> Tensor:
        return self.l2(self.l1(torch.cat([a, b], dim=1)) * gain[:, None])


def redrawn(shape: tuple[int, int], g: torch.Generator) -> Tensor:
    """PyTorch's default draw of a linear weight: kaiming_uniform_(a=sqrt(5))."""
    w = torch.empty(shape, dtype=torch.float64)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
    return w


def test_cascading_randomisation_of_two_inputs_by_hand(randn: Randn) -> None:
    model = seeded(0, Chain)
    a, b, gain = randn(1, 4, 4), randn(2, 4, 3), randn(3, 4).exp()
    w1, w2 = model.l1.weight.detach(), model.l2.weight.detach()
    target = model(a, b, gain).argmax(dim=1)
    result = torchvis.sanity_check(model, (a, b), ["saliency"], seed=7, forward_args=(gain,))
    assert result.stages == ("l2", "l1")
    g = torch.Generator().manual_seed(7)
    w2_new = redrawn((3, 5), g)
    w1_new = redrawn((5, 7), g)
    products = [w2 @ w1, w2_new @ w1, w2_new @ w1_new]
    for stage, product in enumerate(products):
        expected = gain[:, None] * product[target]
        got = result.maps["saliency"][stage]
        assert isinstance(got, tuple) and len(got) == 2
        torch.testing.assert_close(got[0], expected[:, :4])
        torch.testing.assert_close(got[1], expected[:, 4:])
    for stage, name in ((1, "l2"), (2, "l1")):
        for i, part in enumerate((slice(0, 4), slice(4, 7))):
            row = result.row("saliency", name, input=i)
            orig = (gain[:, None] * products[0][target])[:, part].numpy()
            new = (gain[:, None] * products[stage][target])[:, part].numpy()
            assert row.input == i and row.ssim is None and (row.constant, row.examples) == (0, 4)
            assert row.spearman_abs == pytest.approx(
                np.mean([spearmanr(abs(orig[k]), abs(new[k])).statistic for k in range(4)]), abs=1e-12)
            assert row.spearman == pytest.approx(
                np.mean([spearmanr(orig[k], new[k]).statistic for k in range(4)]), abs=1e-12)
    lines = str(result).splitlines()
    assert lines[0].split()[:2] == ["method", "input"] and len(lines) == 2 + 2 * 2
    assert result.to_dict()["rows"][1]["input"] == 1


def test_image_and_metadata_with_a_cam_and_a_callable_target(randn: Randn) -> None:
    model = seeded(4, TwoInputs)
    image, meta, gain, bias = randn(5, 3, 2, 5, 5), randn(6, 3, 4), randn(7, 3).exp(), randn(8, 1, 3)

    def margin(output: Tensor) -> Tensor:
        return output[:, 2] - output[:, 0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = torchvis.sanity_check(model, (image, meta), ["saliency", "grad_cam"], margin, layer="conv",
                                       layers=["head", "conv"], forward_args=(gain,),
                                       forward_kwargs={"bias": bias})
        expected = explain(copy.deepcopy(model), (image, meta), margin, methods=["saliency", "grad_cam"],
                           layer="conv", forward_args=(gain,), forward_kwargs={"bias": bias})
    assert result.target is margin
    for part, want in zip(result.maps["saliency"][0], expected["saliency"], strict=True):
        torch.testing.assert_close(part, want, rtol=0, atol=0)
    torch.testing.assert_close(result.maps["grad_cam"][0], expected["grad_cam"], rtol=0, atol=0)
    rows = [(row.method, row.stage, row.input, row.ssim is None) for row in result.rows]
    assert rows == [("saliency", "head", 0, False), ("saliency", "head", 1, True),
                    ("saliency", "conv", 0, False), ("saliency", "conv", 1, True),
                    ("grad_cam", "head", 0, False), ("grad_cam", "conv", 0, False)]
    assert all(row.spearman_abs is not None for row in result.rows)


def test_a_plain_function_is_refused(randn: Randn) -> None:
    model = seeded(0, Chain)
    with pytest.raises(TypeError, match="re-initialises the model's layers.*needs an nn.Module"):
        torchvis.sanity_check(lambda a, b: model(a, b, torch.ones(2)), (randn(0, 2, 4), randn(1, 2, 3)),
                              ["saliency"])


def test_the_figure_captions_read_each_inputs_row(randn: Randn) -> None:
    from torchvis.rendering.sanity_figure import sanity_figure

    model = seeded(4, TwoInputs)
    image, meta, gain = randn(5, 2, 2, 5, 5).sigmoid(), randn(6, 2, 4), randn(7, 2).exp()
    result = torchvis.sanity_check(model, (image, meta), ["saliency"], layers=["conv"], forward_args=(gain,),
                                   forward_kwargs={"bias": 0.0})
    assert isinstance(result.images, tuple) and torch.equal(result.images[1], meta)
    grid = [ax for ax in sanity_figure(result).axes if ax.get_label() != "bars"]
    for i in (0, 1):
        rho = result.row("saliency", "conv", input=i).spearman_abs
        assert grid[2 * i + 1].get_title() == f"conv\nρ|·|={rho:+.2f}"


class PairOut(nn.Module):
    """A block returning a tuple (its rectified map and the raw one), as an LSTM returns two things."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raw = self.conv(x)
        return raw.relu(), raw


class WithPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = PairOut()
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pair(x)[0].mean(dim=(2, 3)))


def test_a_tuple_element_layer_is_addressed_in_every_spelling(randn: Randn) -> None:
    """``("pair", 0)``, ``(module, 0)`` and ``"pair[0]"`` name the same element in the model and its
    randomised copies; a list of them keys each layer."""
    model, x = seeded(1, WithPair), randn(2, 3, 2, 6, 6)
    results = [torchvis.sanity_check(model, x, ["grad_cam"], layer=layer, layers=["head"])
               for layer in (("pair", 0), (model.pair, 0), "pair[0]")]
    for result in results:
        torch.testing.assert_close(result.maps["grad_cam"][0], results[2].maps["grad_cam"][0], rtol=0, atol=0)
        assert [row.spearman_abs for row in result.rows] == [row.spearman_abs for row in results[2].rows]
    both = [(model.pair, 0), "pair.conv"]
    many = torchvis.sanity_check(model, x, ["grad_cam"], layer=both, layers=["head"])
    assert sorted({row.method for row in many.rows}) == ["grad_cam/pair.conv", "grad_cam/pair[0]"]
