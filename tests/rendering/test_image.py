"""Pixel-value tests for torchvis.image."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torchvis.rendering.image import (
    colorize,
    denormalize,
    display_factor,
    enlarge,
    grid,
    grid_columns,
    normalize,
    normalize_rgb,
    overlay,
    panel,
    render,
    to_rgb,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DTYPES = [torch.float32, torch.float64]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mpl(name: str, t: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """matplotlib's own colours for values ``t`` [...] -> [..., 3] float64.

    ``t`` keeps its dtype: matplotlib computes the table index in it, as colorize does.
    """
    cm = matplotlib.colormaps[name]
    if n is not None:
        cm = cm.resampled(n)
    return torch.from_numpy(np.asarray(cm(t.numpy()))[..., :3])


# --- normalize ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_map_is_zero_and_nan_free(dtype: torch.dtype) -> None:
    z = torch.zeros(2, 3, 5, 6, dtype=dtype)
    for signed in (False, True):
        out = normalize(z, signed=signed)
        assert out.shape == (2, 1, 5, 6) and out.dtype == dtype
        assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(normalize_rgb(z), torch.full_like(z, 0.5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_magnitude_map_is_zero(dtype: torch.dtype) -> None:
    c = torch.full((2, 1, 8, 8), 3.7, dtype=dtype)
    c[1] = -0.25
    out = normalize(c)
    assert not out.isnan().any()
    assert torch.equal(out, torch.zeros_like(out))


def test_constant_signed_map_keeps_its_sign() -> None:
    # Documented choice: a uniform +c is full positive evidence, not "no evidence".
    c = torch.full((2, 1, 4, 4), 2.0)
    c[1] = -2.0
    out = normalize(c, signed=True)
    assert torch.equal(out[0], torch.ones(1, 4, 4)) and torch.equal(out[1], -torch.ones(1, 4, 4))


def test_magnitude_without_clip_is_min_max_of_abs() -> None:
    x = torch.tensor([[[[-4.0, 1.0], [2.0, 3.0]]]])
    out = normalize(x, percentile=100)
    expected = (x.abs() - 1) / 3
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)


def test_percentile_is_nearest_rank_per_image() -> None:
    ramp = torch.arange(1, 1001, dtype=torch.float64).view(1, 1, 25, 40)
    x = torch.cat([ramp, 10 * ramp])  # scale must not leak between images
    out = normalize(x, percentile=99.5)  # rank ceil(995) -> value 995 (x10 in image 1)
    flat = out.flatten(1)
    expected = ((torch.arange(1, 1001, dtype=torch.float64) - 1) / 994).clamp(max=1)
    torch.testing.assert_close(flat[0], expected)
    torch.testing.assert_close(flat[1], expected)
    assert flat[0, 993] < 1 and flat[0, 994] == 1


def test_hot_pixel_does_not_wash_out_the_rest() -> None:
    x = torch.rand(1, 1, 64, 64, generator=gen(1))
    x[0, 0, 10, 20] = 1e6
    rest = torch.ones(64, 64, dtype=torch.bool)
    rest[10, 20] = False
    clipped = normalize(x)[0, 0]
    assert clipped[10, 20] == 1
    assert clipped[rest].min() == 0 and clipped[rest].max() == 1
    assert clipped[rest].median() > 0.3  # the bulk of the map is still visible
    # The same map without the clip is all black apart from the hot pixel: the clip matters.
    assert normalize(x, percentile=100)[0, 0][rest].max() < 1e-5


def test_sparse_map_falls_back_to_max() -> None:
    # 3 non-zero pixels out of 1024: the 99.5th percentile is 0, which would hide them all.
    x = torch.zeros(1, 1, 32, 32)
    x[0, 0, 1, 1], x[0, 0, 2, 2], x[0, 0, 3, 3] = 4.0, 2.0, -1.0
    mag = normalize(x)[0, 0]
    assert mag.diagonal()[1:4].tolist() == [1.0, 0.5, 0.25]
    signed = normalize(x, signed=True)[0, 0]
    assert signed.diagonal()[1:4].tolist() == [1.0, 0.5, -0.25]
    assert signed.count_nonzero() == 3


@pytest.mark.parametrize("dtype", DTYPES)
def test_signed_keeps_zero_and_is_symmetric(dtype: torch.dtype) -> None:
    x = torch.randn(3, 1, 16, 16, generator=gen(2), dtype=dtype)
    x[:, :, :4] = 0
    out = normalize(x, signed=True)
    assert torch.equal(out[:, :, :4], torch.zeros_like(out[:, :, :4]))
    assert out.min() >= -1 and out.max() <= 1 and out.abs().amax() == 1
    torch.testing.assert_close(normalize(-x, signed=True), -out, rtol=0, atol=0)
    assert torch.equal(torch.sign(out), torch.sign(x))


def test_channel_reduction_max_abs_for_magnitude_sum_for_signed() -> None:
    x = torch.tensor([1.0, -3.0, 0.5, 0.0, 2.0, -1.0]).view(1, 3, 1, 2)
    # pixel 0: channels (1, 0.5, 2); pixel 1: channels (-3, 0, -1)
    mag = normalize(x, percentile=100)  # max|.| = (2, 3) -> min-max -> (0, 1)
    assert mag.flatten().tolist() == [0.0, 1.0]
    signed = normalize(x, signed=True, percentile=100)  # sum = (3.5, -4) -> / 4
    assert signed.flatten().tolist() == [0.875, -1.0]


def test_normalize_rgb_keeps_colour_and_centres_at_half() -> None:
    x = torch.zeros(1, 3, 1, 4, dtype=torch.float64)
    x[0, 0, 0, 0], x[0, 2, 0, 1], x[0, 1, 0, 2] = 2.0, -2.0, 1.0
    out = normalize_rgb(x, percentile=100)
    assert out[0, :, 0, 0].tolist() == [1.0, 0.5, 0.5]  # red only
    assert out[0, :, 0, 1].tolist() == [0.5, 0.5, 0.0]  # negative blue
    assert out[0, :, 0, 2].tolist() == [0.5, 0.75, 0.5]
    assert out[0, :, 0, 3].tolist() == [0.5, 0.5, 0.5]


# --- colorize ----------------------------------------------------------------------------------

VALUES = torch.tensor([0.0, 0.013, 0.25, 0.3337, 0.5, 0.61, 0.777, 0.9, 0.999, 1.0])


@pytest.mark.parametrize("name", ["inferno", "jet", "viridis", "gray", "tab10"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_colorize_equals_matplotlib(name: str, dtype: torch.dtype) -> None:
    v = VALUES.to(dtype).view(1, 1, 1, -1)
    out = colorize(v, name)
    assert out.shape == (1, 3, 1, len(VALUES)) and out.dtype == dtype
    expected = mpl(name, v.flatten()).T.reshape(1, 3, 1, -1).to(dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=1 / 255)
    assert (out - expected).abs().max() < 1e-6  # in fact the same table entries


def test_colorize_random_values_float64_match_matplotlib() -> None:
    v = torch.rand(2, 1, 7, 9, generator=gen(3), dtype=torch.float64)
    out = colorize(v, "magma")
    torch.testing.assert_close(out, mpl("magma", v[:, 0]).permute(0, 3, 1, 2), rtol=0, atol=1e-12)


def test_colorize_default_is_inferno_and_accepts_colormap_objects() -> None:
    v = VALUES.view(1, 1, 1, -1)
    assert torch.equal(colorize(v), colorize(v, "inferno"))
    assert torch.equal(colorize(v, matplotlib.colormaps["jet"]), colorize(v, "jet"))
    assert not torch.equal(colorize(v), colorize(v, "jet"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_signed_zero_is_exactly_white_and_sides_are_red_blue(dtype: torch.dtype) -> None:
    v = torch.tensor([0.0, 1.0, -1.0, 0.3, -0.3], dtype=dtype).view(1, 1, 1, -1)
    out = colorize(v, signed=True)[0, :, 0]  # [3, 5], channel 0 is red
    assert out[:, 0].tolist() == [1.0, 1.0, 1.0]
    assert out[:, 1].tolist() == [1.0, 0.0, 0.0]
    assert out[:, 2].tolist() == [0.0, 0.0, 1.0]
    r, g, b = out[:, 3]
    assert r == 1 and g < 0.8 and b < 0.8  # positive: red-ish
    r, g, b = out[:, 4]
    assert b == 1 and r < 0.8 and g < 0.8  # negative: blue-ish
    torch.testing.assert_close(out[:, 3], out[:, 4].flip(0))  # mirrored


def test_signed_matches_matplotlib_resampled_to_odd_size() -> None:
    v = torch.tensor([-1.0, -0.7, -0.2, 0.0, 0.05, 0.4, 0.95, 1.0], dtype=torch.float64)
    for name in ("bwr", "RdBu_r", "coolwarm"):
        out = colorize(v.view(1, 1, 1, -1), name, signed=True)[0, :, 0].T
        torch.testing.assert_close(out, mpl(name, (v + 1) / 2, n=257), rtol=0, atol=1e-12)
        # and within 1/255 of the plain 256-entry map except where it changes fast
        assert (out - mpl(name, (v + 1) / 2)).abs().max() < 2.5 / 255


def test_signed_zero_map_renders_white() -> None:
    out = render(torch.zeros(2, 3, 4, 4), signed=True)
    assert torch.equal(out, torch.ones(2, 3, 4, 4))
    assert torch.equal(render(torch.zeros(2, 1, 4, 4)), colorize(torch.zeros(2, 1, 4, 4)))


def test_colorize_rejects_raw_or_nan_maps() -> None:
    with pytest.raises(ValueError, match=r"normalize\(\)"):
        colorize(torch.full((1, 1, 2, 2), 3.0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        colorize(torch.full((1, 1, 2, 2), -0.5))  # fine when signed, not for magnitude
    colorize(torch.full((1, 1, 2, 2), -0.5), signed=True)
    with pytest.raises(ValueError, match="nan"):
        colorize(torch.full((1, 1, 2, 2), math.nan))
    with pytest.raises(ValueError, match="1 channels"):
        colorize(torch.zeros(1, 3, 2, 2))


def test_unknown_colormap_lists_close_matches() -> None:
    with pytest.raises(ValueError, match="'Inferno'.*inferno"):
        colorize(torch.zeros(1, 1, 2, 2), "Inferno")
    with pytest.raises(ValueError, match="viridis"):
        render(torch.zeros(1, 1, 2, 2), cmap="virdis")


# --- overlay, render ---------------------------------------------------------------------------


def test_overlay_alpha_endpoints_and_mix() -> None:
    image = torch.rand(2, 1, 5, 5, generator=gen(4))  # grey digits
    heat = torch.rand(2, 3, 5, 5, generator=gen(5))
    assert torch.equal(overlay(heat, image, alpha=0.0), image.expand(-1, 3, -1, -1))
    assert torch.equal(overlay(heat, image, alpha=1.0), heat)
    torch.testing.assert_close(overlay(heat, image, alpha=0.25), 0.75 * image + 0.25 * heat)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, math.nan])
def test_overlay_rejects_alpha_outside_unit_interval(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        overlay(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), alpha=alpha)


def test_overlay_upsamples_heat_bilinearly() -> None:
    heat = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2).expand(1, 3, 2, 2).contiguous()
    out = overlay(heat, torch.zeros(1, 3, 4, 4), alpha=1.0)
    assert out.shape == (1, 3, 4, 4)
    expected_row = torch.tensor([0.0, 0.25, 0.75, 1.0])
    assert torch.equal(out, expected_row.expand(1, 3, 4, 4))


def test_overlay_rejects_unnormalised_image_and_batch_mismatch() -> None:
    heat = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match=r"denormalize\(\)"):
        overlay(heat, torch.full((1, 3, 2, 2), -1.8))
    with pytest.raises(ValueError, match="batch"):
        overlay(heat, torch.zeros(2, 3, 2, 2))


def test_render_resizes_the_scalar_map_before_colouring() -> None:
    # [-1, +1] upsampled 2 -> 3 wide has 0 in the middle: white, not the purple of blended colours
    attr = torch.tensor([-1.0, 1.0]).view(1, 1, 1, 2)
    out = render(attr, torch.zeros(1, 3, 1, 3), signed=True, alpha=1.0)[0, :, 0]
    assert out[:, 1].tolist() == [1.0, 1.0, 1.0]
    assert out[:, 0].tolist() == [0.0, 0.0, 1.0] and out[:, 2].tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_render_output_always_in_unit_range(dtype: torch.dtype) -> None:
    g = gen(6)
    image = torch.rand(3, 3, 28, 28, generator=g, dtype=dtype)
    for signed in (False, True):
        for scale in (1e-30, 1.0, 1e30):
            attr = scale * torch.randn(3, 3, 7, 7, generator=g, dtype=dtype)
            attr[0, 0, 0, 0] *= 1e6  # outlier
            for img in (None, image):
                out = render(attr, img, signed=signed, cmap="jet")
                assert out.dtype == dtype and not out.isnan().any()
                assert out.min() >= 0 and out.max() <= 1
                assert out.shape == ((3, 3, 28, 28) if img is not None else (3, 3, 7, 7))


def test_render_equals_the_steps_it_composes() -> None:
    attr = torch.randn(2, 3, 7, 7, generator=gen(7))
    image = torch.rand(2, 3, 14, 14, generator=gen(8))
    norm = F.interpolate(normalize(attr, signed=True), size=(14, 14), mode="bilinear")
    expected = overlay(colorize(norm, "RdBu_r", signed=True), image, alpha=0.3)
    torch.testing.assert_close(render(attr, image, signed=True, cmap="RdBu_r", alpha=0.3), expected)


def test_nan_and_inf_raise_with_image_index() -> None:
    x = torch.rand(3, 1, 4, 4)
    x[1, 0, 2, 2] = math.nan
    x[2, 0, 0, 0] = math.inf
    for fn in (normalize, normalize_rgb, render):
        with pytest.raises(ValueError, match=r"2 NaN/inf values \(in images \[1, 2\]\)"):
            fn(x)


def test_shape_and_dtype_errors_are_explained() -> None:
    with pytest.raises(ValueError, match=r"4-D.*\(5, 6, 7\).*unsqueeze\(1\)"):
        normalize(torch.zeros(5, 6, 7))
    with pytest.raises(ValueError, match="floating-point"):
        normalize(torch.zeros(1, 1, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):
        normalize(torch.zeros(1, 1, 0, 2))
    for p in (0.0, 100.5, math.nan):
        with pytest.raises(ValueError, match="percentile"):
            normalize(torch.zeros(1, 1, 2, 2), percentile=p)


# --- denormalize, to_rgb -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_denormalize_inverts_imagenet_normalisation(dtype: torch.dtype) -> None:
    x = torch.rand(2, 3, 6, 6, generator=gen(9), dtype=dtype)
    mean = torch.tensor(IMAGENET_MEAN, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=dtype).view(1, 3, 1, 1)
    out = denormalize((x - mean) / std, IMAGENET_MEAN, IMAGENET_STD)
    atol = 1e-15 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(out, x, rtol=0, atol=atol)
    assert out.dtype == dtype


def test_denormalize_clamps_and_handles_grey() -> None:
    out = denormalize(torch.tensor([-10.0, 0.0, 10.0]).view(1, 1, 1, 3), (0.1307,), (0.3081,))
    assert out.flatten().tolist() == pytest.approx([0.0, 0.1307, 1.0])


def test_denormalize_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match=r"one entry per channel \(1\), got 3 and 3"):
        denormalize(torch.zeros(1, 1, 2, 2), IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match="positive"):
        denormalize(torch.zeros(1, 1, 2, 2), (0.5,), (0.0,))


def test_to_rgb_repeats_grey_and_rejects_other_channel_counts() -> None:
    g = torch.rand(2, 1, 3, 3, generator=gen(10))
    out = to_rgb(g)
    assert out.shape == (2, 3, 3, 3)
    assert all(torch.equal(out[:, c], g[:, 0]) for c in range(3))
    rgb = torch.rand(2, 3, 3, 3, generator=gen(11))
    assert torch.equal(to_rgb(rgb), rgb)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        to_rgb(torch.zeros(1, 2, 3, 3))


# --- grid, panel -------------------------------------------------------------------------------


def test_grid_places_tile_k_at_its_offset() -> None:
    b, h, w, pad = 5, 3, 4, 2
    tiles = (torch.arange(1, b + 1, dtype=torch.float64) / 10).view(b, 1, 1, 1).expand(b, 3, h, w)
    out = grid(tiles, nrow=3, padding=pad, pad_value=0.5)
    assert out.shape == (3, 2 * (h + pad) + pad, 3 * (w + pad) + pad)
    covered = torch.zeros(out.shape[1:], dtype=torch.bool)
    for k in range(b):
        top, left = pad + (k // 3) * (h + pad), pad + (k % 3) * (w + pad)
        assert torch.equal(out[:, top : top + h, left : left + w], tiles[k])
        covered[top : top + h, left : left + w] = True
    assert torch.equal(out[:, ~covered], torch.full_like(out[:, ~covered], 0.5))  # incl. slot 5


def test_grid_single_row_when_batch_is_smaller_than_nrow() -> None:
    out = grid(torch.ones(2, 1, 2, 2), nrow=8, padding=1)
    assert out.shape == (3, 4, 7)
    assert out.sum() == 3 * 2 * 4
    with pytest.raises(ValueError, match="nrow"):
        grid(torch.ones(2, 1, 2, 2), nrow=0)
    with pytest.raises(ValueError, match=r"denormalize\(\)"):
        grid(torch.full((2, 3, 2, 2), 2.0))


def test_grid_pads_a_single_image_too() -> None:
    # torchvision's make_grid returns a lone image without its border; grid keeps the contract.
    tile = torch.full((1, 1, 2, 3), 0.25)
    out = grid(tile, padding=2, pad_value=1.0)
    assert out.shape == (3, 6, 7)
    assert torch.equal(out[:, 2:4, 2:5], torch.full((3, 2, 3), 0.25))
    assert out.sum() == 3 * (6 * 7 - 6) + 3 * 6 * 0.25


@pytest.mark.parametrize(("count", "columns"), [
    (1, 1), (2, 2), (3, 3), (4, 2), (6, 3), (7, 7), (8, 4), (9, 3), (10, 5), (11, 4), (12, 4), (13, 7),
    (16, 4), (17, 6), (64, 8), (100, 10),
])
def test_grid_columns_fill_rows_evenly(count: int, columns: int) -> None:
    assert grid_columns(count) == columns


def test_grid_columns_leave_the_fewest_empty_cells() -> None:
    for count in range(1, 150):
        cols = grid_columns(count)
        rows = math.ceil(count / cols)
        empty = rows * cols - count
        assert empty < cols  # never an empty row
        widest = max(8, math.ceil(math.sqrt(count)))
        assert cols <= widest
        assert cols >= rows  # wider than tall
        wide = [c for c in range(1, widest + 1) if c >= math.ceil(count / c)]
        assert empty == min(math.ceil(count / c) * c - count for c in wide)
    with pytest.raises(ValueError, match="at least one tile"):
        grid_columns(0)


def test_display_factor_reaches_a_legible_size() -> None:
    assert [display_factor(s, s) for s in (1, 10, 12, 28, 32, 48, 64, 95, 96, 224)] == [
        96, 10, 8, 4, 3, 2, 2, 2, 1, 1]
    assert display_factor(28, 300) == 4  # the short side decides
    assert display_factor(28, 28, legible=56) == 2
    with pytest.raises(ValueError, match="positive"):
        display_factor(0, 5)


def test_enlarge_repeats_each_pixel_into_a_square() -> None:
    x = torch.rand(2, 3, 28, 20, generator=gen(), dtype=torch.float64)
    big = enlarge(x)
    assert big.shape == (2, 3, 5 * 28, 5 * 20)  # short side 20 -> 5x = 100 px
    rows, cols = torch.arange(5 * 28) // 5, torch.arange(5 * 20) // 5
    assert torch.equal(big, x[:, :, rows[:, None], cols[None, :]])
    large = torch.rand(1, 1, 96, 120, generator=gen())
    assert enlarge(large) is large
    with pytest.raises(ValueError, match="4-D"):
        enlarge(torch.rand(28, 28))


def test_panel_rows_are_examples_columns_are_input_then_maps() -> None:
    b, h, w, pad = 2, 3, 3, 1
    inputs = torch.tensor([0.1, 0.2]).view(b, 1, 1, 1).expand(b, 1, h, w)  # grey
    maps = [torch.tensor([0.3 + 0.1 * m, 0.6 + 0.1 * m]).view(b, 1, 1, 1).expand(b, 3, h, w)
            for m in range(2)]
    out = panel(inputs, maps, padding=pad)
    assert out.shape == (3, b * (h + pad) + pad, 3 * (w + pad) + pad)
    for row in range(b):
        cells = [inputs[row].expand(3, h, w), maps[0][row], maps[1][row]]
        for col, cell in enumerate(cells):
            top, left = pad + row * (h + pad), pad + col * (w + pad)
            assert torch.equal(out[:, top : top + h, left : left + w], cell)
    assert torch.equal(out[:, 0], torch.ones_like(out[:, 0]))  # white separators by default


def test_panel_rejects_maps_of_another_size() -> None:
    with pytest.raises(ValueError, match=r"maps\[1\].*\(2, 3, 4, 4\)"):
        panel(torch.zeros(2, 3, 5, 5), [torch.zeros(2, 3, 5, 5), torch.zeros(2, 3, 4, 4)])


# --- devices -----------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_results_stay_on_device_and_match_cpu() -> None:
    attr = torch.randn(2, 3, 7, 7, generator=gen(12))
    image = torch.rand(2, 3, 28, 28, generator=gen(13))
    for signed in (False, True):
        cpu = render(attr, image, signed=signed)
        gpu = render(attr.cuda(), image.cuda(), signed=signed)
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-5)
    assert panel(image.cuda(), [render(attr.cuda(), image.cuda())]).device.type == "cuda"
