"""The sanity figure with callable targets and tuple inputs (a hand-built SanityResult)."""

from __future__ import annotations

import numpy as np
import torch

from torchvis.core.targets import class_logit
from torchvis.methods.spec import Look
from torchvis.metrics.sanity import SanityResult, SanityRow
from torchvis.rendering import image
from torchvis.rendering.sanity_figure import sanity_figure


def result(images: object, maps: tuple[object, ...], target: object) -> SanityResult:
    rows = (SanityRow("saliency", "head", 0.25, 0.5, 0.75, 0, 2),)
    return SanityResult(("saliency",), ("head",), rows, {"saliency": maps}, images, target)  # type: ignore[arg-type]


def test_callable_target_is_named_and_the_maps_are_the_rendered_ones() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 8, 8, generator=g)
    maps = (torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g))
    fig = sanity_figure(result(x, maps, class_logit(2)), example=1)
    assert fig.texts[0].get_text() == "cascading randomisation, example 1 (target: class_logit)"
    for ax, attr in zip(fig.axes, maps, strict=True):
        expected = image.render_map(attr[1:2], x[1:2], Look.SIGNED)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), expected)
    assert fig.axes[1].get_title() == "head\nρ|·|=+0.25"
    classes = sanity_figure(result(x, maps, torch.tensor([3, 4])), example=1)
    assert classes.texts[0].get_text() == "cascading randomisation, example 1 (class 4)"


def test_tuple_inputs_get_one_row_per_input() -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(2, 1, 8, 8, generator=g), torch.randn(2, 5, generator=g))
    stage = (torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 5, generator=g))
    fig = sanity_figure(result(x, (stage, stage), class_logit(0)), example=0)
    grid = [ax for ax in fig.axes if ax.get_label() not in ("bars",)]
    assert [ax.get_ylabel() for ax in grid[::2]] == ["saliency\ninput 0", "saliency\ninput 1"]
    assert len(grid[0].images) == 1  # the image input: a picture
    bars = [ax for ax in fig.axes if ax.get_label() == "bars"]
    assert len(bars) == 2  # the table: a bar chart per stage
    labels = [t.get_text().split(" = ")[0] for t in bars[0].get_yticklabels()]
    order = stage[1][0].abs().argsort(descending=True).tolist()
    assert labels == [f"x[{i}]" for i in order]
