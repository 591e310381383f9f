"""One host read per call: the checks' queue (:mod:`torchvis.core.reads`), and the methods' reads
counted on the CPU, where every read of a device value goes through a tensor method (``item``,
``tolist``, ``__bool__``, ...) that a torch function mode sees. On a GPU each is a host sync. The CPU
needs no sync, so its checks run at once there; the tests that count reads make the queue treat the CPU
as a device that synchronises (``synchronising_cpu``), which is the GPU's path."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

import torchvis
from torchvis.core import reads
from torchvis.core.reads import on_host, one_host_read
from torchvis.methods.cam import EmptyMapWarning

_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"}


class CountReads(TorchFunctionMode):
    """Counts the calls that bring a tensor's values to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in _READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def synchronising_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The queue takes CPU tensors as it takes those of a GPU: all read in one ``tolist``."""
    monkeypatch.setattr(reads, "UNSYNCED", frozenset())


def reads_of(run: Callable[[], object]) -> list[str]:
    run()  # a first call may set things up
    with CountReads() as counter:
        run()
    return counter.reads


def test_a_check_outside_a_block_runs_at_once() -> None:
    seen: list[list[float]] = []
    assert on_host(torch.tensor([1.0, 2.0]), seen.append) is True
    assert seen == [[1.0, 2.0]]


@pytest.mark.usefixtures("synchronising_cpu")
def test_checks_in_a_block_run_at_its_end_in_order_after_one_read() -> None:
    seen: list[tuple[str, list[float]]] = []
    with CountReads() as counter, one_host_read():
        assert on_host(torch.tensor([3, -1]), lambda v: seen.append(("ints", v))) is False
        with one_host_read():  # nested: joins the outer block
            on_host(torch.tensor([0.5]), lambda v: seen.append(("floats", v)))
        on_host(torch.tensor([], dtype=torch.float64), lambda v: seen.append(("empty", v)))
        assert seen == []
    assert seen == [("ints", [3, -1]), ("floats", [0.5]), ("empty", [])]
    assert counter.reads == ["tolist"]


def test_a_check_of_cpu_values_runs_at_once_even_in_a_block() -> None:
    seen: list[list[float]] = []
    with one_host_read():
        assert on_host(torch.tensor([4.0]), seen.append) is True
        assert seen == [[4.0]]


@pytest.mark.usefixtures("synchronising_cpu")
def test_a_block_that_raises_runs_no_check() -> None:
    seen: list[list[float]] = []
    with pytest.raises(KeyError), one_host_read():
        on_host(torch.tensor([1.0]), seen.append)
        raise KeyError("inside")
    assert seen == []
    on_host(torch.tensor([2.0]), seen.append)  # the queue is gone: at once again
    assert seen == [[2.0]]


@pytest.mark.usefixtures("synchronising_cpu")
def test_a_failing_check_raises_when_the_block_ends() -> None:
    def refuse(values: list[float]) -> None:
        raise ValueError(f"bad {values}")

    after: list[str] = []
    with pytest.raises(ValueError, match=r"bad \[7.0\]"), one_host_read():
        on_host(torch.tensor([7.0]), refuse)
        after.append("the block went on")
    assert after == ["the block went on"]


class Net(nn.Module):
    """Two convolutions with ReLUs and a linear head: every method has a layer ("relu2") to read."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.relu2(self.conv2(self.relu1(self.conv1(x)))).flatten(1))


@pytest.fixture
def net() -> tuple[nn.Module, Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Net().double().eval()
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    return model, x


LAYER_METHODS = ["grad_cam", "grad_cam_pp", "xgrad_cam", "layer_cam", "hires_cam", "guided_grad_cam"]


@pytest.mark.parametrize("target", [None, "tensor"])
@pytest.mark.parametrize("name", ["saliency", "gradient_x_input", "guided_backprop", *LAYER_METHODS])
@pytest.mark.usefixtures("synchronising_cpu")
def test_a_method_reads_the_device_once(name: str, target: str | None, net: tuple[nn.Module, Tensor]) -> None:
    model, x = net
    chosen = None if target is None else torch.tensor([2, 0])
    kwargs = {"layer": "relu2"} if name in LAYER_METHODS else {}
    method = getattr(torchvis, name)
    assert reads_of(lambda: method(model, x, chosen, **kwargs)) == ["tolist"]


@pytest.mark.parametrize("target", [None, "tensor"])
@pytest.mark.usefixtures("synchronising_cpu")
def test_explain_reads_the_device_once_for_every_check_of_its_shared_passes(
    target: str | None, net: tuple[nn.Module, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x = net
    chosen = None if target is None else torch.tensor([2, 0])
    methods = ["saliency", "guided_backprop", "grad_cam", "layer_cam", "guided_grad_cam"]
    run = lambda: torchvis.explain(model, x, chosen, methods=methods, layer=["relu1", "relu2"])  # noqa: E731
    assert reads_of(run) == ["tolist"]
    queued: list[Counter[str]] = []
    read = reads._read
    monkeypatch.setattr(reads, "_read", lambda queue: queued.append(
        Counter(check.__qualname__.split(".")[0] for _, check in queue)) or read(queue))
    run()
    # Each pass's finiteness check; the target's range in each pass that is given a tensor (the guided
    # pass always is: the plain pass's resolved classes); the empty-map check of each CAM at each layer.
    assert queued == [Counter(check_finite=2, _class_target=1 if target is None else 2, warn_if_empty=4)]


@pytest.mark.parametrize("queued", [True, False], ids=["queued-as-on-a-gpu", "cpu"])
@pytest.mark.parametrize("target", [(1, 7), (-1, 0)])
def test_an_index_target_out_of_range_is_refused(queued: bool, target: tuple[int, int],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if queued:
        monkeypatch.setattr(reads, "UNSYNCED", frozenset())
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.Unflatten(1, (5, 2))).double()
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dimension, size = (2, 2) if target[1] == 7 else (1, 5)
    refused = f"out of range for dimension {dimension} of the output \\(size {size}"
    with pytest.raises(ValueError, match=refused):
        torchvis.saliency(model, x, target)
    with CountReads() as counter:
        got = torchvis.saliency(model, x, (3, 1))
    (expected,) = torch.autograd.grad(model(x.requires_grad_())[:, 3, 1].sum(), x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert counter.reads == ["tolist"] * (1 if queued else 2)


@pytest.mark.parametrize("queued", [True, False], ids=["queued-as-on-a-gpu", "cpu"])
def test_the_checks_still_refuse_and_warn(queued: bool, net: tuple[nn.Module, Tensor],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if queued:
        monkeypatch.setattr(reads, "UNSYNCED", frozenset())
    model, x = net
    with pytest.raises(ValueError, match="target 3 is out of range for 3 classes"):
        torchvis.grad_cam(model, x, torch.tensor([3, 0]), layer="relu2")
    with pytest.raises(ValueError, match="the model output contains NaN or inf"):
        torchvis.explain(model, torch.full_like(x, float("nan")), methods=["saliency", "grad_cam"],
                         layer="relu2")
    dead = Net().double().eval()
    with torch.no_grad():
        dead.conv2.bias.fill_(-100.0)  # relu2 is zero everywhere: an empty CAM for both examples
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torchvis.grad_cam(dead, x, layer="relu2")
    empty = [w for w in seen if issubclass(w.category, EmptyMapWarning)]
    assert len(empty) == 1 and "exactly zero for 2 of 2 examples" in str(empty[0].message)
    assert empty[0].filename == __file__  # the user's line, though it was raised when the block ended
