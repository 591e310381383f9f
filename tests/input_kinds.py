"""Small models over each kind of input: features [B,N], signals [B,C,L], volumes [B,C,D,H,W], two and
three inputs at once, each taking extra forward arguments that are not attributed."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Tabular(nn.Module):
    """``[B,6]`` features times a per-example ``scale`` ``[B,6]`` -> tanh MLP -> 3 classes (+ ``shift``)."""

    def __init__(self, features: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.lin1 = nn.Linear(features, 8)
        self.lin2 = nn.Linear(8, classes)

    def forward(self, x: Tensor, scale: Tensor, shift: Tensor | float = 0.0) -> Tensor:
        return self.lin2(torch.tanh(self.lin1(x * scale)) + shift)


class Signal(nn.Module):
    """``[B,2,L]`` -> Conv1d -> ReLU, times a per-example ``mask`` ``[B,L]`` -> mean over L -> 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.fc((torch.relu(self.conv(x)) * mask[:, None]).mean(dim=2))


class Volume(nn.Module):
    """``[B,2,D,H,W]`` -> Conv3d -> ReLU -> global average -> 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3, 4)))


class TwoInputs(nn.Module):
    """An image ``[B,2,5,5]`` and metadata ``[B,4]`` -> 3 classes; ``gain`` ``[B]`` (per example) scales
    the image branch and ``bias`` (keyword, shared) is added to the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.meta = nn.Linear(4, 3)
        self.head = nn.Linear(6, 3)

    def forward(self, image: Tensor, meta: Tensor, gain: Tensor, *, bias: Tensor | float = 0.0) -> Tensor:
        seen = torch.relu(self.conv(image)).mean(dim=(2, 3)) * gain[:, None]
        return self.head(torch.cat([seen, torch.tanh(self.meta(meta))], dim=1)) + bias


class ThreeInputs(nn.Module):
    """An image ``[B,2,5,5]``, a signal ``[B,2,7]`` and features ``[B,4]`` -> 3 classes, the features
    scaled by a per-example ``scale`` ``[B,4]``."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Conv2d(2, 3, 3, padding=1)
        self.signal = nn.Conv1d(2, 3, 3, padding=1)
        self.features = nn.Linear(4, 3)
        self.head = nn.Linear(9, 3)

    def forward(self, image: Tensor, signal: Tensor, features: Tensor, scale: Tensor) -> Tensor:
        parts = [
            torch.relu(self.image(image)).mean(dim=(2, 3)),
            torch.tanh(self.signal(signal)).amax(dim=2),
            self.features(features * scale),
        ]
        return self.head(torch.cat(parts, dim=1))
