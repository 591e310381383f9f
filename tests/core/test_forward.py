"""The guard's pieces on their own: the finiteness check and the kept global RNG."""

from __future__ import annotations

import math

import pytest
import torch

from torchvis.core.forward import check_finite, kept_rng


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_values_whose_sum_overflows_pass(dtype: torch.dtype) -> None:
    big = torch.finfo(dtype).max
    logits = torch.full((2, 5), big, dtype=dtype)  # every sum overflows to inf; every value is finite
    grads = torch.full((2, 3, 4, 4), -big, dtype=dtype)
    check_finite(logits, grads)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_each_non_finite_value_is_caught(bad: float, dtype: torch.dtype) -> None:
    logits = torch.zeros(2, 5, dtype=dtype)
    grads = torch.ones(2, 3, 4, 4, dtype=dtype)
    check_finite(logits, grads)
    grads[1, 2, 3, 0] = bad
    with pytest.raises(ValueError, match="the gradients of the target score hold NaN or inf"):
        check_finite(logits, grads)
    logits[0, 4] = bad
    with pytest.raises(ValueError, match="the model output contains NaN or inf"):
        check_finite(logits, grads)


def test_opposite_infinities_are_caught() -> None:
    grads = torch.tensor([[math.inf, -math.inf, 1.0]])  # the sum alone is NaN, the max alone inf
    with pytest.raises(ValueError, match="hold NaN or inf"):
        check_finite(torch.zeros(1, 2), grads)
    with pytest.raises(ValueError, match="custom things hold NaN"):
        check_finite(torch.zeros(1, 2), torch.ones(3), grads, what="custom things")


def test_empty_tensors_are_skipped() -> None:
    check_finite(torch.zeros(0, 5), torch.zeros(0, 3))
    with pytest.raises(ValueError, match="hold NaN"):
        check_finite(torch.zeros(0, 5), torch.tensor([math.nan]))


def test_kept_rng_puts_the_state_back_also_after_an_error() -> None:
    before = torch.get_rng_state()
    with kept_rng([]):
        torch.rand(100)
    assert torch.equal(torch.get_rng_state(), before)
    with pytest.raises(KeyError), kept_rng([]):
        torch.randn(7)
        raise KeyError("inside")
    assert torch.equal(torch.get_rng_state(), before)
    expected = torch.rand(3)  # the stream goes on from where it was
    torch.set_rng_state(before)
    assert torch.equal(torch.rand(3), expected)
