"""Deletion and insertion together (``torchvis.deletion_insertion``) and the images their chunks are
built from: each metric bit-identical to its function alone, one ranking and one target pass, every
chunk's images equal to a per-row reference whatever the chunk size."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import seeded
from input_kinds import TwoInputs
from torch import Tensor, nn

import torchvis
from torchvis.metrics.faithfulness import blurred


def same(a: Any, b: Any) -> None:
    """Bit-identical tensors, or Curves field by field."""
    if isinstance(a, Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return
    for x, y in zip(a, b, strict=True):
        same(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch_size", [1, 2, 5, 7, None])
def test_each_metric_equals_its_function_alone_bit_for_bit(
    small_cnn: Callable[[int], nn.Module], dtype: torch.dtype, batch_size: int | None
) -> None:
    model = small_cnn(0).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 6, 6, generator=g, dtype=torch.float64).to(dtype)
    a = torch.randn(3, 3, 6, 6, generator=g, dtype=torch.float64).to(dtype)
    base = torch.rand(1, 3, 6, 6, generator=g, dtype=torch.float64).to(dtype)
    kw: dict[str, Any] = dict(pixels_per_step=4, batch_size=batch_size)
    both = torchvis.deletion_insertion(model, x, a, None, baseline=base, return_curves=True, **kw)
    assert list(both) == ["deletion", "insertion"]
    for curves in both.values():  # ordinary tensors, which a caller may change in place
        assert not curves.scores.is_inference() and not curves.auc.is_inference()
        curves.scores.mul_(1)
    same(both["deletion"], torchvis.deletion(model, x, a, None, baseline=base, return_curves=True, **kw))
    same(both["insertion"], torchvis.insertion(model, x, a, None, return_curves=True, **kw))
    # One metric, another order, a start value, AUCs only.
    one = torchvis.deletion_insertion(model, x, a, [1, 0, 4], metrics=("insertion",), start=0.5, **kw)
    assert list(one) == ["insertion"]
    same(one["insertion"], torchvis.insertion(model, x, a, [1, 0, 4], start=0.5, **kw))
    swapped = torchvis.deletion_insertion(model, x, a, 2, metrics=("insertion", "deletion"), **kw)
    assert list(swapped) == ["insertion", "deletion"]
    same(swapped["deletion"], torchvis.deletion(model, x, a, 2, **kw))


def test_two_inputs_with_forward_arguments_equal_the_functions_alone() -> None:
    model = seeded(0, TwoInputs)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(4, 2, 5, 5, generator=g, dtype=torch.float64),
         torch.randn(4, 4, generator=g, dtype=torch.float64))
    a = (torch.randn(4, 2, 5, 5, generator=g, dtype=torch.float64),
         torch.randn(4, 4, generator=g, dtype=torch.float64))
    extra: dict[str, Any] = dict(forward_args=(torch.rand(4, generator=g, dtype=torch.float64),),
                                 forward_kwargs={"bias": 0.5}, pixels_per_step=3, batch_size=6)
    both = torchvis.deletion_insertion(model, x, a, baseline=(0.0, 1.0), start=("blur", 0.0),
                                       return_curves=True, **extra)
    same(both["deletion"], torchvis.deletion(model, x, a, baseline=(0.0, 1.0), return_curves=True, **extra))
    same(both["insertion"], torchvis.insertion(model, x, a, start=("blur", 0.0), return_curves=True, **extra))


def test_one_target_pass_is_shared(small_cnn: Callable[[int], nn.Module]) -> None:
    model = small_cnn(0)
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        torchvis.deletion_insertion(model, x, x, pixels_per_step=4, batch_size=8)
    finally:
        handle.remove()
    # 9 steps of 4 pixels: 10 points x 3 examples = 30 rows a metric, in chunks of 8.
    assert sizes == [3] + [8, 8, 8, 6] * 2


class Recorder(nn.Module):
    """Keeps a copy of every batch it is given; class 0's logit is the sum of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(x.clone())
        s = x.flatten(1).sum(dim=1)
        return torch.stack([s, -s], dim=1)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 5, 11, 100])
@pytest.mark.parametrize("metric", ["deletion", "insertion"])
def test_every_chunk_holds_the_images_of_a_per_row_reference(metric: str, batch_size: int) -> None:
    """Row ``k * B + b`` of the stream is example ``b`` with its first ``min(k * step, P)`` ranked pixels
    replaced, whether a chunk starts or ends inside a point (B=3 examples) or spans several."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 3, 4, generator=g, dtype=torch.float64)
    a = torch.randn(3, 2, 3, 4, generator=g, dtype=torch.float64)
    model = Recorder()
    per_step, pixels = 5, 12
    if metric == "deletion":
        torchvis.deletion(model, x, a, 0, pixels_per_step=per_step, baseline=0.25, batch_size=batch_size)
        first, last = x, torch.full_like(x, 0.25)
    else:
        torchvis.insertion(model, x, a, 0, pixels_per_step=per_step, batch_size=batch_size)
        first, last = blurred(x), x
    chunks = model.seen[1:]  # after the target pass
    assert max(c.shape[0] for c in chunks) <= batch_size
    rows = torch.cat(chunks)
    n = math.ceil(pixels / per_step)
    assert rows.shape == (3 * (n + 1), 2, 3, 4)
    for b in range(3):
        weight = a[b].abs().sum(dim=0).flatten().tolist()
        order = sorted(range(pixels), key=lambda p: (-weight[p], p))
        for k in range(n + 1):
            want = first[b].clone()
            for p in order[: min(k * per_step, pixels)]:
                want[:, p // 4, p % 4] = last[b][:, p // 4, p % 4]
            assert torch.equal(rows[k * 3 + b], want), (k, b)


def test_bad_metric_names_are_clear_errors(small_cnn: Callable[[int], nn.Module]) -> None:
    model, x = small_cnn(0), torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown metric 'deleton'"):
        torchvis.deletion_insertion(model, x, x, metrics=("deleton",))
    with pytest.raises(TypeError, match="sequence of names"):
        torchvis.deletion_insertion(model, x, x, metrics="deletion")
    with pytest.raises(ValueError, match="names a metric twice"):
        torchvis.deletion_insertion(model, x, x, metrics=("deletion", "deletion"))
    with pytest.raises(ValueError, match="metrics is empty"):
        torchvis.deletion_insertion(model, x, x, metrics=())


def test_non_finite_deletion_scores_stop_before_insertion_runs() -> None:
    """A model whose scores turn NaN on the changed images: the error comes once deletion's forwards
    are done, before insertion's run (the target pass, then deletion's chunks, and nothing more)."""

    class NanAfterFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(16, 3)
            self.calls = 0

        def forward(self, x: Tensor) -> Tensor:
            self.calls += 1
            out = self.linear(x.flatten(1))
            return out if self.calls == 1 else out * float("nan")

    torch.manual_seed(0)
    model, x = NanAfterFirst().eval(), torch.rand(2, 1, 4, 4)
    # 16 pixels, 4 a step: 5 points x 2 examples = 10 rows per path, chunks of 4: 3 chunks.
    with pytest.raises(ValueError, match="contain NaN or Inf"):
        torchvis.deletion_insertion(model, x, torch.rand(2, 1, 4, 4), pixels_per_step=4, batch_size=4)
    assert model.calls == 1 + 3
