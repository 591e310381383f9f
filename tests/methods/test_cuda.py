"""The methods and the benchmark harness on CUDA; every test here is skipped where no GPU exists.

On CUDA each method must give the CPU's map (float64, tight tolerance), synchronise with the host
once per call (its checks read together; occlusion twice), and the harness must run there with
device-event timing, mixed precision and channels_last.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `benchmarks` lives beside `torchvis`

from benchmarks import attribution  # noqa: E402
from benchmarks.timing import peak_bytes, time_once  # noqa: E402
from torchvis.methods.cam import grad_cam, guided_grad_cam  # noqa: E402
from torchvis.methods.combine import explain  # noqa: E402
from torchvis.methods.gradient import guided_backprop, saliency  # noqa: E402
from torchvis.methods.perturbation import occlusion  # noqa: E402

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")

METHODS: dict[str, Callable[[nn.Module, Tensor], Tensor]] = {
    "saliency": lambda model, x: saliency(model, x),
    "guided_backprop": lambda model, x: guided_backprop(model, x),
    "grad_cam": lambda model, x: grad_cam(model, x, layer="conv3"),
    "guided_grad_cam": lambda model, x: guided_grad_cam(model, x, layer="conv3"),
    "occlusion": lambda model, x: occlusion(model, x, window=4, stride=2, batch_size=7),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_on_cuda_matches_cpu(
    name: str, small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    model, x = small_cnn(0), randn(1, 3, 3, 12, 12)
    on_cpu = METHODS[name](model, x)
    on_gpu = METHODS[name](model.to(CUDA), x.to(CUDA))
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float64
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-9, atol=1e-12)


def test_explain_on_cuda_matches_cpu(
    small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    model, x = small_cnn(2), randn(3, 2, 3, 12, 12)
    on_cpu = explain(model, x, methods=["saliency", "grad_cam"], layer=["conv2", "conv3"])
    on_gpu = explain(model.to(CUDA), x.to(CUDA), methods=["saliency", "grad_cam"], layer=["conv2", "conv3"])
    assert list(on_gpu) == list(on_cpu)
    for key in on_cpu:
        torch.testing.assert_close(on_gpu[key].cpu(), on_cpu[key], rtol=1e-9, atol=1e-12)


Call = Callable[[nn.Module, Tensor, Tensor], object]


def _untargeted(method: Callable[[nn.Module, Tensor], Tensor]) -> Call:
    return lambda model, x, target: method(model, x)


# Every method above, and the calls with the most checks: explain's two passes and CAMs at two layers,
# and a target tensor on the device (its range is checked with the rest). Each takes the target tensor,
# made before the sync count starts: the predicted classes, whose maps are not empty here (an empty
# map's warning reads the layer once more for its hint).
SYNCED: dict[str, Call] = {
    **{name: _untargeted(method) for name, method in METHODS.items()},
    "explain": lambda model, x, target: explain(
        model, x, methods=["saliency", "guided_backprop", "grad_cam", "guided_grad_cam"],
        layer=["conv2", "conv3"]),
    "grad_cam, target tensor": lambda model, x, target: grad_cam(model, x, target, layer="conv3"),
    "explain, target tensor": lambda model, x, target: explain(
        model, x, target, methods=["saliency", "grad_cam"], layer="conv3"),
}


@pytest.mark.parametrize("name", sorted(SYNCED))
def test_one_host_sync_per_call(
    name: str, small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    model, x = small_cnn(0).to(CUDA), randn(1, 2, 3, 12, 12).to(CUDA)
    with torch.no_grad():
        target = model(x).argmax(dim=1)
    SYNCED[name](model, x, target)  # first call: lazy initialisation may synchronise
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            SYNCED[name](model, x, target)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    syncs = [w for w in seen if "synchroniz" in str(w.message)]
    # The checks (finite, target range, empty map) need their results on the host: one read for all of
    # them (tests/core/test_reads.py counts the reads on the CPU). Occlusion checks the clean scores
    # before its perturbed passes, then their scores.
    assert len(syncs) == (2 if name == "occlusion" else 1), [str(w.message) for w in syncs]


def test_logits_a_model_moves_to_the_cpu_are_checked_with_the_gradients(
    small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor]
) -> None:
    model, x = small_cnn(0).to(CUDA), randn(1, 2, 3, 12, 12)
    on_gpu = saliency(lambda t: model(t).cpu(), x.to(CUDA))
    with pytest.raises(ValueError, match="the model output contains NaN or inf"):
        saliency(lambda t: (model(t) * float("nan")).cpu(), x.to(CUDA))
    torch.testing.assert_close(on_gpu.cpu(), saliency(model.cpu(), x), rtol=1e-9, atol=1e-12)


def test_timing_and_memory_use_the_device() -> None:
    x = torch.randn(1024, 1024, device=CUDA)
    assert time_once(lambda: x @ x, CUDA) > 0
    # A 4 MB result on top of what was live: the caching allocator's peak says so.
    assert peak_bytes(lambda: torch.empty(1_000_000, device=CUDA), CUDA) >= 4_000_000


@pytest.mark.parametrize("extra", [(), ("--amp", "bf16", "--channels-last")])
def test_harness_runs_on_cuda(extra: tuple[str, ...]) -> None:
    result = attribution.main([
        "--device", "cuda", "--models", "digits", "--batch", "4", "--repeats", "2", "--warmup", "1",
        "--no-peers", *extra,
    ])
    rows = {row["name"]: row for row in result["rows"]}
    assert {"saliency", "guided_backprop", "grad_cam layer=conv2", "occlusion"} <= set(rows)
    for row in rows.values():
        assert row["device"] == "cuda" and not row["note"].startswith("error"), row
        assert row["ms"] > 0 and row["floor_ms"] > 0 and row["peak_mb"] is not None
    assert result["meta"]["cuda"] == torch.cuda.get_device_name()
