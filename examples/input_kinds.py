"""Maps of a signal model and a tabular model, drawn by the explanation figure (docs/*.png).

Two tiny models trained for a few seconds on synthetic data where the answer is known: a Conv1d network
that tells whether a signal holds a bump (the map should light up at the bump), and an MLP whose class
depends on two of eight named features (the bar chart should put them first).

    python examples/input_kinds.py docs/
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

import torchvis
from torchvis.rendering.figure import explanation_figure, figure_rgb

FEATURES = ["age", "dose", "weight", "height", "pulse", "sodium", "glucose", "bmi"]


def signals(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Noisy sine waves ``[n,1,64]``; class 1 holds a Gaussian bump at a random place."""
    t = torch.arange(64.0)
    x = 0.3 * torch.sin(t / 3 + 6 * torch.rand(n, 1, generator=g)) + 0.1 * torch.randn(n, 64, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    centre = 8 + 48 * torch.rand(n, 1, generator=g)
    x = x + y[:, None] * torch.exp(-((t - centre) ** 2) / 8)
    return x[:, None], y


def table(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Eight standard-normal features; the class is whether dose - 0.8 * glucose > 0."""
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 1] - 0.8 * x[:, 6] > 0).long()


def fit(model: nn.Module, x: Tensor, y: Tensor, steps: int = 300) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def main(folder: Path) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)

    conv = nn.Sequential(nn.Conv1d(1, 8, 7, padding=3), nn.ReLU(), nn.Conv1d(8, 8, 7, padding=3), nn.ReLU(),
                         nn.AdaptiveMaxPool1d(1), nn.Flatten(), nn.Linear(8, 2))
    x, y = signals(512, g)
    fit(conv, x, y)
    probe = x[y == 1][:2]
    maps = torchvis.explain(conv, probe, 1, methods=("saliency", "gradient_x_input"))
    figure = explanation_figure(probe, maps, title="a Conv1d model: where is the bump?", panel=2.2, dpi=80)
    Image.fromarray(figure_rgb(figure)).save(folder / "signal_map.png")

    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    x, y = table(1024, g)
    fit(mlp, x, y)
    maps = torchvis.explain(mlp, x[:2], methods=("saliency", "gradient_x_input"))
    figure = explanation_figure(x[:2], maps, feature_names=FEATURES, title="an MLP on 8 named features",
                                panel=2.2, dpi=80)
    Image.fromarray(figure_rgb(figure)).save(folder / "tabular_map.png")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs"))
