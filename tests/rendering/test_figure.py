"""The explanation figure (``torchvis explain`` and the demo's panel.png): rows, titles, labels, legends."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import Tensor

from torchvis.rendering.figure import (
    SIGNED_LEGEND,
    explanation_figure,
    figure_rgb,
    panel_boxes,
    render_map,
    title_of,
)
from torchvis.rendering.image import to_rgb

SIZE = 8
Rows = tuple[Tensor, dict[str, Tensor | str], list[str]]


def sample(figure: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The figure's pixels at the centre of each of the SIZE x SIZE image pixels in a panel."""
    top, left, bottom, right = box
    rows = top + ((np.arange(SIZE) + 0.5) * (bottom - top) / SIZE).astype(int)
    cols = left + ((np.arange(SIZE) + 0.5) * (right - left) / SIZE).astype(int)
    return figure[rows[:, None], cols[None, :]].astype(int)


def as_uint8(picture: Tensor) -> np.ndarray:
    return (picture.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(int)


def colour_bars(fig: Figure) -> list[matplotlib.axes.Axes]:
    return [ax for ax in fig.axes if ax.get_label() != "torchvis-panel"]


@pytest.fixture
def rows() -> Rows:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, SIZE, SIZE, generator=g)
    maps: dict[str, Tensor | str] = {
        "saliency": torch.randn(3, 1, SIZE, SIZE, generator=g),
        "grad_cam/conv": torch.rand(3, 1, SIZE, SIZE, generator=g),
        "guided_backprop": torch.randn(3, 3, SIZE, SIZE, generator=g),  # RGB kept: no colour bar
        "mine": "n/a",
    }
    return images, maps, ["true 0\npred 0 (0.90)", "true 1\npred 1 (0.80)", "true 2\npred 7 (0.60)  ✗"]


def test_title_of_names_the_method_and_its_layer() -> None:
    assert title_of("grad_cam") == "Grad-CAM"
    assert title_of("grad_cam/layer4") == "Grad-CAM (layer4)"
    assert title_of("guided_backprop") == "guided backprop"
    assert title_of("my_method") == "my_method"


def test_rows_are_examples_and_columns_methods(rows: Rows) -> None:
    images, maps, labels = rows
    fig = explanation_figure(images, maps, row_labels=labels, panel=1.0)
    figure = figure_rgb(fig)
    boxes = panel_boxes(fig)
    assert len(boxes) == 3 * 5  # row-major: 3 rows of input + 4 columns
    assert [b[0] for b in boxes] == sorted(b[0] for b in boxes)
    for row in range(3):
        row_boxes = boxes[5 * row : 5 * row + 5]
        assert len({b[0] for b in row_boxes}) == 1  # one row, one top
        assert np.abs(sample(figure, row_boxes[0]) - as_uint8(to_rgb(images[row : row + 1])[0])).max() <= 2
        for box, (key, attr) in zip(row_boxes[1:], maps.items(), strict=True):
            shown = sample(figure, box)
            if isinstance(attr, str):
                assert shown.std() < 3  # a flat panel holding a short text
            else:
                expected = as_uint8(render_map(key, attr[row], images[row]))
                assert np.abs(shown - expected).max() <= 2, (row, key)

    panels = [ax for ax in fig.axes if ax.get_label() == "torchvis-panel"]
    tops = sorted(panels, key=lambda ax: (-ax.get_position().y0, ax.get_position().x0))
    assert [ax.get_title() for ax in tops[:5]] == ["input", "saliency", "Grad-CAM (conv)", "guided backprop",
                                                  "mine"]
    assert all(ax.get_title() == "" for ax in tops[5:])  # titles once, above the columns
    firsts = tops[::5]
    assert [[t.get_text() for t in ax.texts] for ax in firsts] == [[label] for label in labels]
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    for ax in firsts:
        assert ax.texts[0].get_window_extent(renderer).x1 <= ax.get_window_extent().x0  # left of the row


def test_signed_and_heat_columns_get_colour_bars(rows: Rows) -> None:
    images, maps, labels = rows
    fig = explanation_figure(images, maps, row_labels=labels, panel=1.0)
    figure = figure_rgb(fig).astype(int)
    bars = colour_bars(fig)
    assert len(bars) == 2  # saliency (signed) and Grad-CAM (heat); none for RGB or text columns
    boxes = panel_boxes(fig)
    signed, heat = sorted(bars, key=lambda ax: ax.get_position().x0)
    assert signed.get_xlabel() == SIGNED_LEGEND and "red raises" in SIGNED_LEGEND
    assert [t.get_text() for t in signed.get_xticklabels()] == ["−", "0", "+"]
    height = fig.bbox.height
    for bar, column, cmap in ((signed, 1, "bwr"), (heat, 2, "inferno")):
        box = bar.get_window_extent()
        top, bottom = round(height - box.y1), round(height - box.y0)
        assert top >= boxes[-1][2]  # under the last row
        assert abs(box.x0 + box.x1 - boxes[column][1] - boxes[column][3]) <= 2  # centred under its column
        assert 0.7 <= box.width / (boxes[column][3] - boxes[column][1]) <= 0.9
        y = (top + bottom) // 2
        for x in (int(box.x0) + 2, int((box.x0 + box.x1) / 2), int(box.x1) - 3):
            fraction = (x + 0.5 - box.x0) / (box.x1 - box.x0)  # "bwr": blue at -1, white at 0, red at +1
            expected = np.array(matplotlib.colormaps[cmap](fraction)[:3]) * 255
            assert np.abs(figure[y, x] - expected).max() <= 8, (cmap, fraction)
    assert np.abs(figure[y, int(signed.get_window_extent().x0) + 1] - (0, 0, 255)).max() <= 20


def test_one_row_without_labels_has_no_label_band() -> None:
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    maps = {"saliency": torch.randn(1, 1, SIZE, SIZE)}
    plain = explanation_figure(image, maps, title="t")
    labelled = explanation_figure(image, maps, title="t", row_labels=["x"])
    assert panel_boxes(plain)[0][1] == 10  # the margin only
    assert panel_boxes(labelled)[0][1] > 100  # room for the label
    assert plain.texts[0].get_text() == "t"  # the title


def test_figure_rejects_bad_shapes() -> None:
    # A 3-D tensor is a batch of signals now; a 6-D one is nothing torchvis can draw.
    with pytest.raises(ValueError, match=r"nothing to draw: a 6-D input"):
        explanation_figure(torch.rand(1, 3, 2, 2, 2, 2), {})
    with pytest.raises(ValueError, match="with 1 or 3 channels"):
        explanation_figure(torch.rand(1, 2, SIZE, SIZE), {})
    with pytest.raises(ValueError, match="B = 2"):
        explanation_figure(torch.rand(2, 3, SIZE, SIZE), {"saliency": torch.rand(1, 1, SIZE, SIZE)})
    with pytest.raises(ValueError, match="row_labels"):
        explanation_figure(torch.rand(2, 3, SIZE, SIZE), {}, row_labels=["a"])


def test_explained_text_says_what_each_kind_of_target_explains() -> None:
    from torchvis.core.targets import class_logit
    from torchvis.rendering.figure import explained_text

    def margin(output: Tensor) -> Tensor:
        return output[:, 0] - output[:, 1]

    assert [explained_text(torch.tensor([3, 7]), i) for i in (0, 1)] == ["class 3", "class 7"]
    assert explained_text(torch.tensor([[0, 3], [1, 5]]), 1) == "output[(1, 5)]"
    assert explained_text((1, 5), 0) == "output[(1, 5)]"
    assert explained_text(None, 0) == "output"
    assert explained_text(margin, 0) == "target: margin"
    assert explained_text(class_logit(2), 0) == "target: class_logit"
