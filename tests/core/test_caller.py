"""Every warning torchvis gives a user names the user's line, whatever route the call took: a method
called directly, a CAM variant, ``explain``, SmoothGrad, a metric, or a check read when the call ends."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import torchvis
from torchvis.core import reads


class Net(nn.Module):
    """conv -> ReLU -> conv (pre-activation, negative: its CAM is empty) -> GELU -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu = nn.Conv2d(1, 2, 3, padding=1), nn.ReLU()
        self.conv2, self.gelu = nn.Conv2d(2, 2, 1), nn.GELU()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 5 * 5, 3))
        with torch.no_grad():
            self.conv2.bias.fill_(-50.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.gelu(self.conv2(self.relu(self.conv1(x)))))


def x_of() -> Tensor:
    return torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(0))


CALLS: dict[str, tuple[Callable[[nn.Module, Tensor], object], str]] = {
    "grad_cam layer=None": (lambda m, x: torchvis.grad_cam(m, x), "layer=None: using"),
    "grad_cam_pp layer=None": (lambda m, x: torchvis.grad_cam_pp(m, x), "layer=None: using"),
    "explain layer=None": (lambda m, x: torchvis.explain(m, x, methods=["grad_cam"]), "layer=None: using"),
    "smoothgrad of grad_cam layer=None": (
        lambda m, x: torchvis.smoothgrad(m, x, method="grad_cam", samples=2), "layer=None: using"),
    "score_cam layer=None": (lambda m, x: torchvis.score_cam(m, x), "layer=None: using"),
    "guided_backprop on GELU": (lambda m, x: torchvis.guided_backprop(m, x), "also uses gelu"),
    "empty CAM": (lambda m, x: torchvis.grad_cam(m, x, layer="conv2"), "exactly zero"),
    "empty CAM of a variant": (lambda m, x: torchvis.layer_cam(m, x, layer="conv2"), "exactly zero"),
    "constant map in deletion": (
        lambda m, x: torchvis.deletion(m, x, torch.zeros_like(x)), "attribution map is constant"),
}


@pytest.mark.parametrize("queued", [False, True], ids=["cpu", "queued-as-on-a-gpu"])
@pytest.mark.parametrize("name", list(CALLS))
def test_a_warning_names_the_users_line(name: str, queued: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if queued:  # the empty-map warning is then given when the call's checks are read
        monkeypatch.setattr(reads, "UNSYNCED", frozenset())
    call, match = CALLS[name]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        call(Net().eval(), x_of())
    ours = [w for w in seen if match in str(w.message)]
    assert ours, [str(w.message) for w in seen]
    assert {w.filename for w in ours} == {__file__}, [(w.filename, w.lineno) for w in ours]
