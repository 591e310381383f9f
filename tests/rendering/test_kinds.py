"""Maps of every input kind drawn: the heat strip's colours, the bar chart's order and labels, the volume's
central slices, tuple inputs one panel per input, and what cannot be drawn said."""

from __future__ import annotations

import warnings

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import Tensor

from torchvis.core.targets import class_logit
from torchvis.methods.spec import Look
from torchvis.rendering import image, kinds, plots
from torchvis.rendering.figure import explanation_figure, figure_rgb, target_name

L = 30


def drawn(plot: plots.Plot) -> Figure:
    fig = Figure(figsize=(4, 2), dpi=100)
    plot(fig, (0.05, 0.05, 0.9, 0.9))
    return fig


def axes_named(fig: Figure, label: str) -> list[matplotlib.axes.Axes]:
    return [ax for ax in fig.axes if ax.get_label() == label]


def spiky(peaks: dict[int, float], channels: int = 1, length: int = L) -> Tensor:
    attr = torch.zeros(1, channels, length)
    for t, v in peaks.items():
        attr[0, 0, t] = v
    return attr


def rgb(colour: tuple[float, ...]) -> np.ndarray:
    return np.round(np.asarray(colour[:3]) * 255).astype(int)


def test_signal_is_its_lines_over_a_strip_red_at_raising_peaks_blue_at_lowering_ones() -> None:
    signal = torch.randn(1, 2, L, generator=torch.Generator().manual_seed(0))
    (plot,) = kinds.map_pictures(spiky({7: 5.0, 20: -5.0}), signal, Look.SIGNED)
    fig = drawn(plot)
    (line_ax,) = axes_named(fig, "signal")
    (strip_ax,) = axes_named(fig, "heat strip")
    for channel, line in enumerate(line_ax.lines):
        np.testing.assert_array_equal(line.get_xdata(), np.arange(L))
        np.testing.assert_allclose(line.get_ydata(), signal[0, channel].numpy())
    colours = np.asarray(strip_ax.images[0].get_array())  # [1, L, 3]
    assert colours.shape == (1, L, 3)
    np.testing.assert_array_equal(colours[0, 7], [1, 0, 0])  # "bwr" at +1: pure red
    np.testing.assert_array_equal(colours[0, 20], [0, 0, 1])  # at -1: pure blue
    np.testing.assert_array_equal(colours[0, 0], [1, 1, 1])  # zero: exactly white
    # The pixels drawn: the strip's column at each peak has that colour.
    pixels = figure_rgb(fig)
    box = strip_ax.get_window_extent()
    row = round(fig.bbox.height - (box.y0 + box.y1) / 2)
    column = {t: round(box.x0 + (t + 0.5) / L * box.width) for t in (7, 20, 0)}
    np.testing.assert_array_equal(pixels[row, column[7]], [255, 0, 0])
    np.testing.assert_array_equal(pixels[row, column[20]], [0, 0, 255])
    np.testing.assert_array_equal(pixels[row, column[0]], [255, 255, 255])


def test_heat_strip_of_a_magnitude_map_is_inferno_and_a_coarse_map_is_stretched_to_the_signal() -> None:
    inferno = matplotlib.colormaps["inferno"]
    strip = kinds.heat_strip(spiky({3: 2.0, 4: 2.0}, length=10), Look.HEAT_OVERLAY, 10)
    np.testing.assert_allclose(strip[0, :, 3].numpy(), inferno(1.0)[:3], atol=1e-7)
    np.testing.assert_allclose(strip[0, :, 0].numpy(), inferno(0.0)[:3], atol=1e-7)
    # A CAM over 5 steps for a 10-step signal: the normalised map resized linearly (half-pixel centres),
    # so steps 4 and 5 sit 1/4 step from the peak (0.75) and step 3 3/4 step away (0.25).
    coarse = torch.tensor([[[0.0, 0.0, 1.0, 0.0, 0.0]]])
    stretched = kinds.heat_strip(coarse, Look.HEAT_OVERLAY, 10)
    assert stretched.shape == (1, 3, 10)
    for step, value in [(4, 0.75), (5, 0.75), (3, 0.25), (6, 0.25), (0, 0.0), (9, 0.0)]:
        np.testing.assert_allclose(stretched[0, :, step].numpy(), inferno(value)[:3], atol=1e-7)


def test_bar_chart_shows_the_ten_strongest_features_strongest_first_named_and_coloured_by_sign() -> None:
    values = torch.tensor([[0.1, -3.0, 0.5, 2.0, -0.2, 0.0, 1.0, -1.5, 0.3, 0.05, 0.7, -0.6, 4.0, 0.01]])
    x = torch.arange(14.0)[None] / 2
    names = [f"f{i}" for i in range(14)]
    (plot,) = kinds.map_pictures(values, x, Look.SIGNED, names)
    (ax,) = axes_named(drawn(plot), "bars")
    order = [12, 1, 3, 7, 6, 10, 11, 2, 8, 4]  # by |value|, descending
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [f"f{i} = {float(x[0, i]):.3g}" for i in order]
    bars = ax.patches
    assert [b.get_width() for b in bars] == pytest.approx([float(values[0, i]) for i in order])
    assert [b.get_y() + b.get_height() / 2 for b in bars] == list(range(10))
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # the first (strongest) drawn at the top
    for bar, i in zip(bars, order, strict=True):
        assert bar.get_facecolor()[:3] == (kinds.POSITIVE if values[0, i] > 0 else kinds.NEGATIVE)
    assert ax.get_title() == "top 10 of 14 by |value|"
    # Without names: x[i]; a magnitude map in one colour.
    (plot,) = kinds.map_pictures(values.abs(), x, Look.HEAT_OVERLAY)
    (ax,) = axes_named(drawn(plot), "bars")
    assert ax.get_yticklabels()[0].get_text() == "x[12] = 6"
    assert all(b.get_facecolor()[:3] == pytest.approx(kinds.HEAT) for b in ax.patches)


def test_top_features_breaks_ties_by_index() -> None:
    assert plots.top_features(torch.tensor([1.0, -2.0, 2.0, 0.0, 1.0]), 4) == [1, 2, 0, 4]


def test_volume_pictures_are_its_three_central_slices_on_one_scale() -> None:
    d, h, w = 6, 8, 10
    x = torch.rand(2, 1, d, h, w, generator=torch.Generator().manual_seed(1))
    tiles = kinds.input_pictures(kinds.display(x, None, None))
    assert isinstance(tiles, Tensor) and tiles.shape == (2, 3, max(h, d), w + 2 + w + 2 + h)
    axial, coronal, sagittal = x[:, :, d // 2], x[:, :, :, h // 2], x[:, :, :, :, w // 2]
    torch.testing.assert_close(tiles[:, :, :h, :w], axial.expand(-1, 3, -1, -1), rtol=0, atol=0)
    torch.testing.assert_close(tiles[:, :, :d, w + 2: 2 * w + 2], coronal.expand(-1, 3, -1, -1),
                               rtol=0, atol=0)
    torch.testing.assert_close(tiles[:, :, :d, 2 * w + 4:], sagittal.expand(-1, 3, -1, -1), rtol=0, atol=0)
    assert bool((tiles[:, :, :, w: w + 2] == 1).all())  # white gaps
    # One scale per volume: the map is 1 on every voxel but 3 on four voxels off the central slices,
    # so the slices show 1/3 of the scale (a per-slice scale would show 1: pure red).
    attr = torch.ones(1, 1, d, h, w)
    attr[0, 0, 0, 0, :4] = 3.0
    pictures = kinds.map_pictures(attr, kinds.display(x[:1], None, None), Look.SIGNED)
    assert isinstance(pictures, Tensor)
    third = image.colorize(torch.full((1, 1, 1, 1), 1 / 3), signed=True)[0, :, 0, 0]
    torch.testing.assert_close(pictures[0, :, h // 2, w // 2], third)
    red = torch.tensor([1.0, 0.0, 0.0])
    assert not torch.allclose(pictures[0, :, h // 2, w // 2], red)


def test_volume_outside_unit_range_is_scaled_for_display_and_made_grey() -> None:
    x = torch.tensor([-100.0, 300.0]).repeat(4)[None, None].reshape(1, 2, 2, 1, 2)
    shown = kinds.display(x, None, None)
    assert shown.shape == (1, 1, 2, 1, 2)  # channel mean
    assert float(shown.min()) >= 0 and float(shown.max()) <= 1


def test_feature_names_go_with_the_tabular_input() -> None:
    table, signal = torch.zeros(2, 3), torch.zeros(2, 1, 5)
    assert kinds.feature_names_per_input(["a", "b", "c"], (signal, table)) == [None, ["a", "b", "c"]]
    assert kinds.feature_names_per_input([None, ("a", "b", "c")], (signal, table)) == [None, ["a", "b", "c"]]
    with pytest.raises(ValueError, match="feature_names has 2 names for 3 features"):
        kinds.feature_names_per_input(["a", "b"], (table,))
    with pytest.raises(ValueError, match="one list of feature_names fits one tabular input"):
        kinds.feature_names_per_input(["a", "b", "c"], (table, table))
    with pytest.raises(ValueError, match="names go with tabular inputs"):
        kinds.feature_names_per_input([["a"], None], (signal, table))


def test_what_cannot_be_drawn_says_why() -> None:
    assert "6-D input" in str(kinds.undrawable(torch.zeros(1, 1, 1, 1, 1, 1)))
    assert "2 channels" in str(kinds.undrawable(torch.zeros(1, 2, 4, 4)))
    assert "a map of shape [1, 4] over an input of shape [1, 1, 4]" in str(
        kinds.undrawable(torch.zeros(1, 1, 4), torch.zeros(1, 4)))
    assert kinds.undrawable(torch.zeros(1, 3), torch.zeros(1, 3)) is None


def test_figure_of_a_tuple_has_a_row_per_input_and_says_what_it_cannot_draw() -> None:
    img, table, six = torch.rand(2, 1, 8, 8), torch.randn(2, 4), torch.rand(2, 1, 1, 1, 1, 1)
    maps = {"saliency": (torch.randn(2, 1, 8, 8), torch.randn(2, 4), torch.randn(2, 1, 1, 1, 1, 1))}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig = explanation_figure((img, table, six), maps, row_labels=["first", "second"],
                                 feature_names=[None, ["a", "b", "c", "d"], None])
    assert [w.category for w in caught] == [kinds.UndrawableWarning]
    assert "6-D input" in str(caught[0].message)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    labels = [t for t in texts if t.startswith(("first", "second", "input"))]
    assert labels == ["first\ninput 0", "input 1", "input 2", "second\ninput 0", "input 1", "input 2"]
    bars = axes_named(fig, "bars")
    assert len(bars) == 4  # 2 examples x (input values, saliency)
    names = {t.get_text().split(" = ")[0] for t in bars[1].get_yticklabels()}
    assert names <= {"a", "b", "c", "d"}
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert sum(t.startswith("cannot draw a 6-D input") for t in texts) == 4  # input + map, 2 examples


def test_figure_draws_a_one_tensor_map_of_a_tuple_over_the_first_input() -> None:
    signal, table = torch.randn(1, 1, L), torch.randn(1, 4)
    fig = explanation_figure((signal, table), {"grad_cam": spiky({5: 1.0})})
    (strip,) = axes_named(fig, "heat strip")
    assert len(axes_named(fig, "signal")) == 2  # the input and the map's panel
    np.testing.assert_allclose(np.asarray(strip.images[0].get_array())[0, 5],
                               matplotlib.colormaps["inferno"](1.0)[:3], atol=1e-7)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "no map for this input" in texts


def test_target_name_of_callables() -> None:
    assert target_name(class_logit(3)) == "class_logit"

    def margin(out: Tensor) -> Tensor:
        return out[:, 0]

    assert target_name(margin) == "margin"
    assert target_name(lambda out: out[:, 0]) == "<lambda>"
