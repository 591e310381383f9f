"""log_graph: the graph reaches the event file; modes, hooks and RNG survive."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from torchvis.apps.digits import DigitsCNN
from torchvis.inspection.architecture import log_graph


def small() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))


def set_modes(model: nn.Sequential, root: bool) -> list[bool]:
    """The root (and so most modules) in ``root`` mode, the BatchNorm in the other."""
    model.train(root)
    model[1].train(not root)
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("root", [True, False])
def test_stock_add_graph_loses_a_submodule_mode(tmp_path: Path, root: bool) -> None:
    # Shows the mode test below can fail: the stock call resets every submodule to the root's flag.
    model = small()
    before = set_modes(model, root)
    with SummaryWriter(str(tmp_path)) as writer, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        writer.add_graph(model, torch.zeros(1, 1, 4, 4))
    assert [m.training for m in model.modules()] != before
    assert model[1].training is root


@pytest.mark.parametrize("root", [True, False])
def test_log_graph_keeps_every_mode_and_hook(tmp_path: Path, root: bool) -> None:
    model = small()
    before = set_modes(model, root)
    calls: list[int] = []
    handle = model[2].register_forward_hook(lambda m, i, o: calls.append(1))
    hooks = [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()]
    rng = torch.get_rng_state()
    with SummaryWriter(str(tmp_path)) as writer:
        log_graph(writer, model, (1, 4, 4))
    assert [m.training for m in model.modules()] == before
    assert [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert calls  # the user's hook was live during the trace
    assert torch.equal(torch.get_rng_state(), rng)
    handle.remove()


def test_graph_is_in_the_event_file_without_deprecation_noise(tmp_path: Path) -> None:
    model = DigitsCNN(generator=torch.Generator().manual_seed(0))
    with SummaryWriter(str(tmp_path)) as writer, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log_graph(writer, model, torch.zeros(2, 1, 28, 28))
    assert not [w for w in caught if "deprecated" in str(w.message)]
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    graph = acc.Graph()
    scopes = {node.name.split("/")[1] for node in graph.node if node.name.startswith("DigitsCNN/")}
    layers = {f"{type(m).__name__}[{n}]" for n, m in model.named_children() if not isinstance(m, nn.Dropout)}
    assert layers <= scopes  # eval-mode dropout traces to nothing
    (x_node,) = [node for node in graph.node if node.op == "IO Node" and node.name.startswith("input/")]
    dims = [d.size for d in x_node.attr["_output_shapes"].list.shape[0].dim]
    assert dims == [2, 1, 28, 28]


def test_modes_restored_when_the_trace_fails(tmp_path: Path) -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(1)

        def forward(self, x: Tensor) -> Tensor:
            return self.bn(x).view(7, -1)

    model = Broken()
    model.train()
    with SummaryWriter(str(tmp_path)) as writer, pytest.raises(RuntimeError):
        log_graph(writer, model, (1, 2, 2))
    assert model.training and model.bn.training
