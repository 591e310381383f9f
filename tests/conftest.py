"""Shared fixtures: tiny float64 models, a real architecture, the default dtype restored."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a float64 eval model from ``seed`` without moving the global RNG of the test session."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build().double().eval()


class SmallCNN(nn.Module):
    """conv -> in-place ReLU -> conv -> ReLU -> max-pool -> conv -> in-place ReLU -> GAP -> linear."""

    def __init__(self, classes: int = 5, channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 6, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu3 = nn.ReLU(inplace=True)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
        return self.head(self.relu3(self.conv3(x)))


@pytest.fixture
def seeded_model() -> Callable[[int, Callable[[], nn.Module]], nn.Module]:
    """``seeded_model(seed, build)``: ``build()`` from ``seed``, float64, eval mode."""
    return seeded


@pytest.fixture
def small_cnn() -> Callable[[int], nn.Module]:
    """``small_cnn(seed)``: a random :class:`SmallCNN` in float64, eval mode."""
    return lambda seed: seeded(seed, SmallCNN)


@pytest.fixture
def randn() -> Callable[..., Tensor]:
    """``randn(seed, *shape)``: a float64 standard-normal tensor from its own generator."""
    def randn(seed: int, *shape: int) -> Tensor:
        return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))

    return randn


@pytest.fixture(scope="session")
def resnet18() -> nn.Module:
    """torchvision's ResNet-18 with 10 classes and random weights (never downloaded), float64, eval."""
    from torchvision.models import resnet18

    return seeded(0, lambda: resnet18(weights=None, num_classes=10))


@pytest.fixture
def default_dtype() -> Iterator[torch.dtype]:
    """Yields the current default dtype and restores it afterwards, whatever the test set."""
    dtype = torch.get_default_dtype()
    yield dtype
    torch.set_default_dtype(dtype)


@pytest.fixture(autouse=True, scope="session")
def single_thread() -> Iterator[None]:
    """One intra-op thread for the whole suite: on tiny tensors a thread pool only adds waiting,
    badly so on a loaded machine (measured 16 ms vs 5 us for a 2x36 matmul), and subprocess tests
    run their workers with OMP_NUM_THREADS=1, so maps recomputed here match theirs bit for bit.
    The previous setting is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Values for the options that a registered method requires (keyword options without a default), so
# that every method in the registry joins the table-driven tests without a per-method entry.
EXAMPLE_OPTIONS: dict[str, object] = {"window": 3}


def options_for(name: str, layer: str) -> dict[str, object]:
    """What the registered method ``name`` needs to run: ``layer`` if it takes one, and an example value
    for each option it requires (from :data:`EXAMPLE_OPTIONS`)."""
    from torchvis.methods import SPECS

    spec = SPECS[name]
    missing = [o for o in spec.required_options if o not in EXAMPLE_OPTIONS]
    if missing:
        pytest.fail(f"method {name!r} requires {missing}: add example values to EXAMPLE_OPTIONS ({__file__})")
    options: dict[str, object] = {o: EXAMPLE_OPTIONS[o] for o in spec.required_options}
    if spec.takes_layer:
        options["layer"] = layer
    return options
