"""Floors: the least plain-PyTorch work that computes what each method needs.

- input floor (saliency, guided backprop): a fresh leaf, one forward, ``autograd.grad`` to the input;
- layer floor (Grad-CAM): one forward with a plain forward hook keeping the layer's output,
  ``autograd.grad`` to that output — the backward stops at the layer;
- occlusion floor: the same number of occluded images pushed through ``model(chunk)`` under
  ``torch.inference_mode()`` at the batch size with the best throughput; building the images is not
  part of it.

The model is expected in eval mode; its parameters keep whatever ``requires_grad`` they have.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.timing import time_once

Run = Callable[[], object]


def _score(logits: Tensor) -> Tensor:
    return logits.gather(1, logits.argmax(dim=1, keepdim=True)).sum()


def input_floor(model: nn.Module, x: Tensor) -> Callable[[], Tensor]:
    """Forward and backward to the input: ``d score / d x``, ``[B,C,H,W]``."""

    def run() -> Tensor:
        leaf = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(_score(model(leaf)), leaf)
        return grad

    return run


def layer_floor(model: nn.Module, x: Tensor, layer: nn.Module) -> Callable[[], Tensor]:
    """Forward and backward to a layer's output: ``d score / d A``, ``[B,K,h,w]``."""

    def run() -> Tensor:
        kept: list[Tensor] = []

        def keep(module: nn.Module, inputs: Any, output: Tensor) -> None:
            kept.append(output)

        handle = layer.register_forward_hook(keep)
        try:
            logits = model(x)
        finally:
            handle.remove()
        (grad,) = torch.autograd.grad(_score(logits), kept[-1])
        return grad

    return run


def both_floors(model: nn.Module, x: Tensor, layer: nn.Module) -> Run:
    """The layer floor then the input floor (guided Grad-CAM needs both passes)."""
    to_layer, to_input = layer_floor(model, x, layer), input_floor(model, x)

    def run() -> tuple[object, object]:
        return to_layer(), to_input()

    return run


def occluded_chunk(x: Tensor, size: int, window: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """``size`` real occluded copies of ``x``'s examples (windows in raster order, zero baseline)."""
    _, _, height, width = x.shape
    starts = [
        (i, j)
        for i in range(0, height - window[0] + 1, stride[0])
        for j in range(0, width - window[1] + 1, stride[1])
    ]
    chunk = x.repeat((size + x.shape[0] - 1) // x.shape[0], 1, 1, 1)[:size].clone()
    for k in range(size):
        i, j = starts[(k // x.shape[0]) % len(starts)]
        chunk[k, :, i : i + window[0], j : j + window[1]] = 0
    return chunk


def forward_images(model: nn.Module, chunk: Tensor, total: int) -> Run:
    """Push ``total`` images through ``model`` in batches of ``len(chunk)`` (the last one shorter)."""
    size = chunk.shape[0]
    full, rest = divmod(total, size)

    def run() -> None:
        with torch.inference_mode():
            for _ in range(full):
                model(chunk)
            if rest:
                model(chunk[:rest])

    return run


def best_batch(
    model: nn.Module,
    x: Tensor,
    total: int,
    window: tuple[int, int],
    stride: tuple[int, int],
    candidates: Sequence[int],
    *,
    trials: int = 3,
) -> tuple[int, dict[int, float]]:
    """The candidate batch size with the most images per second for plain forward passes.

    Candidates above ``total`` are replaced by ``total`` itself. Returns the winner and the images per
    second of every candidate (median of ``trials`` timed calls after one warm-up call).
    """
    device = x.device
    sizes = sorted({min(c, total) for c in candidates})
    throughput: dict[int, float] = {}
    for size in sizes:
        chunk = occluded_chunk(x, size, window, stride)
        with torch.inference_mode():
            model(chunk)
            seconds = [time_once(lambda: model(chunk), device) for _ in range(trials)]  # noqa: B023
        throughput[size] = size / statistics.median(seconds)
    return max(throughput, key=lambda s: throughput[s]), throughput


def occlusion_floor(
    model: nn.Module, x: Tensor, total: int, batch: int, window: tuple[int, int], stride: tuple[int, int]
) -> Run:
    """``total`` occluded images through plain forward passes of ``batch`` images each."""
    return forward_images(model, occluded_chunk(x, min(batch, total), window, stride), total)
