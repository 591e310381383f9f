"""How alike two batches of maps are: Spearman rank correlation and SSIM, one value per example."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["average_ranks", "constant_rows", "minmax", "spearman", "ssim"]

# Wang et al.'s SSIM constants and window (a Gaussian of sigma 1.5 over 11x11 pixels).
_K1, _K2, _WINDOW, _SIGMA = 0.01, 0.03, 11, 1.5


def constant_rows(v: Tensor) -> Tensor:
    """``[B]`` bool: whether each row of ``v`` ``[B, n]`` holds a single value."""
    return (v == v[:, :1]).all(dim=1)


def average_ranks(v: Tensor) -> Tensor:
    """Ranks ``[B, n]`` float64 of each row of ``v`` ``[B, n]``, 0-based; tied values share the mean of
    their positions (as ``scipy.stats.rankdata``'s ``"average"``, minus one)."""
    batch, n = v.shape
    sorted_v, order = v.sort(dim=1, stable=True)
    starts = torch.ones_like(sorted_v, dtype=torch.bool)
    starts[:, 1:] = sorted_v[:, 1:] != sorted_v[:, :-1]
    # One group id per run of equal values, unique across rows.
    group = (starts.cumsum(dim=1) - 1 + torch.arange(batch, device=v.device)[:, None] * n).flatten()
    positions = torch.arange(n, device=v.device, dtype=torch.float64).repeat(batch)
    sums = torch.zeros(batch * n, dtype=torch.float64, device=v.device).index_add_(0, group, positions)
    counts = torch.zeros_like(sums).index_add_(0, group, torch.ones_like(positions))
    mean = (sums[group] / counts[group]).view(batch, n)
    return torch.empty_like(mean).scatter_(1, order, mean)


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1))


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's rank correlation of each row of ``a`` and ``b`` ``[B, n]``: ``[B]`` float64 (NaN
    where a row is constant). Spearman, Am. J. Psychol. 15, 1904."""
    return _pearson(average_ranks(a), average_ranks(b))


def minmax(v: Tensor) -> Tensor:
    """Each example of ``v`` ``[B, ...]`` scaled to [0, 1] by its own minimum and maximum (a constant
    example becomes NaN)."""
    flat = v.flatten(1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low)).view_as(v)


def _gaussian_window(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    offsets = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(offsets**2) / (2 * _SIGMA**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Mean structural similarity of ``a`` and ``b`` ``[B,1,h,w]`` with values in [0, 1]: ``[B]`` float64.

    Wang, Bovik, Sheikh & Simoncelli, "Image Quality Assessment: From Error Visibility to Structural
    Similarity", IEEE TIP 2004: a Gaussian window (sigma 1.5, 11 pixels, or the largest odd size
    that fits a smaller map), population statistics, data range 1, averaged over the positions where
    the window fits (as ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
    use_sample_covariance=False, data_range=1)``).
    """
    a, b = a.to(torch.float64), b.to(torch.float64)
    side = min(_WINDOW, *a.shape[-2:])
    window = _gaussian_window(side - (side + 1) % 2, a.dtype, a.device)
    c1, c2 = _K1**2, _K2**2

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, window)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return index.flatten(1).mean(dim=1)
