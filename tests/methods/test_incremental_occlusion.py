"""Incremental occlusion equals the naive computation (float64), and its receptive-field arithmetic
equals brute force; every way it declines is said and falls back to the naive path."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import pytest
import references as ref
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchvis.methods import incremental_occlusion as inc
from torchvis.methods.perturbation import occlusion, window_starts
from torchvis.methods.receptive import Region, Sliding, place, project, union

# --- models ---------------------------------------------------------------------------------------


def randomize_batch_norms(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Running statistics and affine parameters away from the identity, so that BN matters."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
            module.running_var.copy_(torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5)
            with torch.no_grad():
                module.weight.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
                module.bias.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
    return model


class Block(nn.Module):
    """ResNet's basic block; a strided one has a strided 1x1 convolution on its shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else None
        )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)  # type: ignore[no-any-return]


class ResidualNet(nn.Module):
    """ResNet-shaped: a 5x5 stride-2 stem, BN, max-pool 3/2/1, ReLU, two residual blocks (one strided),
    a dilated convolution, functional ReLU, a channel concatenation with a sigmoid branch, average
    pooling with padding, a ceil-mode max-pool, then global pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        # Max-pool before the ReLU: negative values meet its padding, which must never win.
        self.stem = nn.Sequential(
            nn.Conv2d(3, 4, 5, stride=2, padding=2), nn.BatchNorm2d(4), nn.MaxPool2d(3, 2, 1),
            nn.ReLU(inplace=True),
        )
        self.block1, self.block2 = Block(4, 4, 1), Block(4, 6, 2)
        self.dilated = nn.Conv2d(6, 6, 3, padding=2, dilation=2)
        self.avg = nn.AvgPool2d(3, stride=1, padding=1)
        self.ceil = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.dilated(self.block2(self.block1(self.stem(x)))))
        y = torch.cat([y, torch.sigmoid(y) * 2.0 - 1.5], dim=1)  # negative: ceil-mode windows see it
        return self.head(self.ceil(self.avg(y)))  # type: ignore[no-any-return]


class VGGNet(nn.Module):
    """VGG-shaped: 3x3 convolutions and ReLUs, 2x2 max-pools, flatten, linear."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(5, 5, 3, padding=1),
            nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Conv2d(5, 8, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * (size[0] // 4) * (size[1] // 4), 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))  # type: ignore[no-any-return]


def build(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = make().double().eval()
    return randomize_batch_norms(model, generator)


# --- incremental = naive ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_residual_net_matches_the_reference(seed: int, randn: Callable[..., Tensor]) -> None:
    model, x = build(seed, ResidualNet), randn(seed, 2, 3, 23, 19)
    # Windows of 5x4 in steps of 3: the last row and column of windows are cut off at the border.
    options = {"window": (5, 4), "stride": (3, 3)}
    got = occlusion(model, x, [1, 3], incremental=True, **options)  # type: ignore[arg-type]
    expected = ref.occlusion(model, x, torch.tensor([1, 3]), (5, 4), (3, 3))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_vgg_net_with_a_per_pixel_baseline_in_small_chunks(randn: Callable[..., Tensor]) -> None:
    model, x = build(2, lambda: VGGNet((16, 12))), randn(2, 3, 3, 16, 12)
    baseline = randn(3, 3, 16, 12)
    got = occlusion(model, x, 2, window=5, stride=2, baseline=baseline, batch_size=1, incremental=True)
    expected = ref.occlusion(model, x, torch.tensor([2, 2, 2]), (5, 5), (2, 2), baseline=baseline)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_results_do_not_depend_on_the_chunk_size(randn: Callable[..., Tensor]) -> None:
    model, x = build(3, ResidualNet), randn(4, 2, 3, 20, 20)
    one = occlusion(model, x, window=6, stride=3, batch_size=1, incremental=True)
    many = occlusion(model, x, window=6, stride=3, batch_size=64, incremental=True)
    torch.testing.assert_close(one, many, rtol=1e-12, atol=1e-13)


def vgg11_features() -> nn.Module:
    """torchvision's VGG-11 convolutional part (8 convolutions, 5 max-pools) with a small global
    head in place of the 120M-parameter classifier, which would only make the test slow."""
    from torchvision.models.vgg import cfgs, make_layers

    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))
    return nn.Sequential(make_layers(cfgs["A"]), head)


def resnet18() -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(weights=None, num_classes=10)


@pytest.mark.parametrize(("make", "size", "window"), [(vgg11_features, 32, 12), (resnet18, 64, 24)])
def test_torchvision_models_match_the_naive_path(
    make: Callable[[], nn.Module], size: int, window: int, randn: Callable[..., Tensor]
) -> None:
    model = build(0, make)
    x = randn(5, 1, 3, size, size)
    # Three windows a side, the last cut off at the border (2 * window + window > size).
    incremental = occlusion(model, x, window=window, stride=window, incremental=True)
    naive = occlusion(model, x, window=window, stride=window, incremental=False)
    torch.testing.assert_close(incremental, naive, rtol=1e-10, atol=1e-12)


def test_the_debug_log_names_the_first_global_op(
    caplog: pytest.LogCaptureFixture, randn: Callable[..., Tensor]
) -> None:
    model, x = build(0, ResidualNet), randn(0, 1, 3, 23, 19)
    with caplog.at_level(logging.DEBUG, logger="torchvis"):
        occlusion(model, x, window=5, incremental=True)
    assert "occlusion: incremental, full forwards from node 'head_0'" in caplog.text
    caplog.clear()
    # Automatically, a model this small runs naively: its few multiply-adds do not pay for the gathers.
    with caplog.at_level(logging.DEBUG, logger="torchvis"):
        occlusion(model, x, window=5, incremental=None)
    assert "occlusion: naive, incremental would not gain enough" in caplog.text
    assert "M multiply-adds an image" in caplog.text


# --- declining ------------------------------------------------------------------------------------


class Branchy(nn.Module):
    """A Python loop over the examples: torch.fx cannot iterate a traced value."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.stack([self.conv(image[None])[0] for image in x])
        return self.fc(y.mean(dim=(2, 3)))  # type: ignore[no-any-return]


class SharedInPlace(nn.Module):
    """An in-place ReLU on a tensor that is read again afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x: Tensor) -> Tensor:
        a = self.conv(x)
        b = torch.relu_(a)
        return self.fc((a + b).mean(dim=(2, 3)))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("make", "why"),
    [(Branchy, "torch.fx cannot trace it"), (SharedInPlace, "changes a tensor in place")],
)
def test_an_unsuitable_model_runs_naively_and_says_why(
    make: Callable[[], nn.Module], why: str, caplog: pytest.LogCaptureFixture, randn: Callable[..., Tensor]
) -> None:
    model, x = build(0, make), randn(1, 2, 3, 8, 8)
    with caplog.at_level(logging.DEBUG, logger="torchvis"):
        got = occlusion(model, x, window=3, stride=2, incremental=None)
    assert "occlusion: naive, every occluded image whole" in caplog.text and why in caplog.text
    with torch.no_grad():
        predicted = model(x).argmax(dim=1)
    expected = ref.occlusion(model, x, predicted, (3, 3), (2, 2))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=f"incremental occlusion cannot run on this model: .*{why}"):
        occlusion(model, x, window=3, stride=2, incremental=True)


def test_a_module_in_training_mode_is_refused(randn: Callable[..., Tensor]) -> None:
    model, x = build(0, ResidualNet), randn(1, 1, 3, 23, 19)
    with pytest.raises(ValueError, match="training mode"):
        occlusion(model.train(), x, window=5, eval_mode=False, incremental=True)


def test_auto_skips_a_model_without_local_layers_and_forced_still_agrees(
    caplog: pytest.LogCaptureFixture, randn: Callable[..., Tensor]
) -> None:
    # Flatten first: every node is global, the estimated work is the naive path's.
    model = build(0, lambda: nn.Sequential(nn.Flatten(), nn.Linear(48, 3)))
    x = randn(2, 2, 3, 4, 4)
    with caplog.at_level(logging.DEBUG, logger="torchvis"):
        auto = occlusion(model, x, window=2, stride=1, incremental=None)
    assert "occlusion: naive, incremental would not gain enough" in caplog.text
    forced = occlusion(model, x, window=2, stride=1, incremental=True)
    torch.testing.assert_close(forced, auto, rtol=1e-12, atol=1e-13)


SHIFT = torch.tensor(0.5, dtype=torch.float64)


class SideEffects(nn.Module):
    """Counts its forward calls and adds a module-level tensor (which the tracer stores as an
    attribute of the module it traces)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.fc = nn.Linear(2, 3)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.fc((self.conv(x) + SHIFT).mean(dim=(2, 3)))  # type: ignore[no-any-return]


def test_tracing_leaves_the_users_model_alone(randn: Callable[..., Tensor]) -> None:
    model, x = build(0, SideEffects), randn(1, 1, 3, 8, 8)
    before = dict(vars(model))
    got = occlusion(model, x, 0, window=3, stride=2, incremental=True)
    assert vars(model) == before  # no call counted by the trace, no tensor constant stored
    expected = ref.occlusion(model, x, torch.tensor([0]), (3, 3), (2, 2))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


class ExpInPlace(nn.Module):
    """An in-place op the incremental path runs on whole activations (``exp_``): the clean value
    of its input must survive the clean run, since every chunk pastes its patches into it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x).exp_()
        return self.fc(y.mean(dim=(2, 3)))  # type: ignore[no-any-return]


def test_an_in_place_global_op_sees_the_clean_activation(randn: Callable[..., Tensor]) -> None:
    model, x = build(0, ExpInPlace), randn(2, 2, 3, 8, 8)
    got = occlusion(model, x, [0, 2], window=3, stride=2, incremental=True)
    expected = ref.occlusion(model, x, torch.tensor([0, 2]), (3, 3), (2, 2))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


# --- memory --------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_chunks_hold_no_more_values_than_the_naive_batch(
    batch_size: int, randn: Callable[..., Tensor]
) -> None:
    model, x = build(0, ResidualNet), randn(0, 2, 3, 23, 19)
    starts = [(i, j) for i in window_starts(23, 5, 3) for j in window_starts(19, 5, 3)]
    with torch.inference_mode():
        engine = inc.build(model, x, torch.zeros(()).expand_as(x), starts, (5, 5))
    assert isinstance(engine, inc.Engine)
    widest = max(v[0].numel() for v in engine.clean.values() if isinstance(v, Tensor) and v.dim() == 4)
    total = len(starts) * 2
    ranges = list(inc.chunks(engine, total, batch_size))
    assert [lo for lo, _ in ranges] == [0, *[hi for _, hi in ranges[:-1]]] and ranges[-1][1] == total
    assert all((hi - lo) * engine.per_item <= batch_size * widest or hi - lo == 1 for lo, hi in ranges)
    assert engine.per_item >= max(p.size[0] * p.size[1] for p in engine.placements.values())


# --- receptive fields against brute force ------------------------------------------------------


def brute_force(
    region: tuple[int, int, int, int], op: Sliding, size: tuple[int, int]
) -> tuple[int, ...] | None:
    """Bounding box of the outputs that read the region, by convolving its indicator with ones."""
    mask = torch.zeros(1, 1, *size, dtype=torch.float64)
    mask[..., region[0] : region[1], region[2] : region[3]] = 1
    reached = F.conv2d(mask, torch.ones(1, 1, *op.kernel, dtype=torch.float64), None, op.stride,
                       op.padding, op.dilation)[0, 0]
    rows, cols = torch.nonzero(reached > 0, as_tuple=True)
    if rows.numel() == 0:
        return None
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


def test_project_is_the_brute_force_receptive_field() -> None:
    # Exact without dilation; with it, the bounding box of the outputs whose taps straddle the
    # region (a dilated kernel may skip it: then the box only has to hold the true one).
    rng = random.Random(0)
    for _ in range(300):
        k, s, d = [rng.randint(1, 4) for _ in range(2)], [rng.randint(1, 3) for _ in range(2)], [
            rng.randint(1, 2) for _ in range(2)]
        p = [rng.randint(0, k[a] - 1) for a in range(2)]
        size = (rng.randint(6, 14), rng.randint(6, 14))
        op = Sliding((k[0], k[1]), (s[0], s[1]), (p[0], p[1]), (d[0], d[1]))
        out = tuple((size[a] + 2 * p[a] - d[a] * (k[a] - 1) - 1) // s[a] + 1 for a in range(2))
        if min(out) < 1:
            continue
        top, left = rng.randrange(size[0]), rng.randrange(size[1])
        box = (top, rng.randint(top + 1, size[0]), left, rng.randint(left + 1, size[1]))
        got = project(Region(*[torch.tensor([v]) for v in box]), op, (out[0], out[1]))
        expected = brute_force(box, op, size)
        box_of = (int(got.top), int(got.bottom), int(got.left), int(got.right))
        found = None if bool(got.empty()[0]) else box_of
        if op.dilation == (1, 1):
            assert found == expected, (op, size, box)
        elif expected is not None:
            assert found is not None, (op, size, box)
            assert found[0] <= expected[0] and found[1] >= expected[1], (op, size, box)
            assert found[2] <= expected[2] and found[3] >= expected[3], (op, size, box)


def test_union_ignores_empty_rectangles_and_place_covers_inside_the_map() -> None:
    t = torch.tensor
    a = Region(t([0, 2, 5]), t([3, 2, 9]), t([1, 4, 0]), t([2, 4, 1]))  # the middle one is empty
    b = Region(t([1, 6, 7]), t([4, 8, 7]), t([0, 1, 3]), t([1, 3, 3]))  # the last one is empty
    u = union([a, b])
    assert (u.top.tolist(), u.bottom.tolist(), u.left.tolist(), u.right.tolist()) == (
        [0, 6, 5], [4, 8, 9], [0, 1, 0], [2, 3, 1])
    placement = place(u, (9, 5))
    assert placement.size == (4, 2)
    # Each patch covers its rectangle and stays inside the 9x5 map (the third one is moved up).
    assert placement.top.tolist() == [0, 5, 5] and placement.left.tolist() == [0, 1, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_incremental_on_cuda_matches_the_cpu(randn: Callable[..., Tensor]) -> None:
    model, x = build(0, ResidualNet), randn(0, 2, 3, 23, 19)
    cpu = occlusion(model, x, [1, 3], window=(5, 4), stride=(3, 3), incremental=True)
    cuda = occlusion(model.cuda(), x.cuda(), [1, 3], window=(5, 4), stride=(3, 3), incremental=True)
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-9, atol=1e-11)


def test_the_default_is_naive_so_no_trace_reaches_other_threads(
    caplog: pytest.LogCaptureFixture, randn: Callable[..., Tensor]
) -> None:
    """Tracing patches nn.Module.__call__ process-wide, so the default never traces."""
    model, x = build(0, ResidualNet), randn(0, 1, 3, 23, 19)
    with caplog.at_level(logging.DEBUG, logger="torchvis"):
        occlusion(model, x, window=5)
    assert "occlusion: naive, incremental=False" in caplog.text
