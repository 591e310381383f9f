"""Lightning callback: a real Trainer on CPU, the event file read back, training unchanged bit for bit."""

from __future__ import annotations

import importlib
import io
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, TENSORS, EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("lightning")
import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger  # noqa: E402

from torchvis.tracking.lightning import AttributionCallback  # noqa: E402
from torchvis.tracking.tensorboard import log_attributions  # noqa: E402

MEAN, STD = 0.5, 0.25
MAPS = ("torchvis/saliency", "torchvis/grad_cam")
OPTIONS: dict[str, Any] = dict(layer="conv", mean=MEAN, std=STD)


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    """Lightning's advice about data-loader workers and logging intervals is noise here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|log_every_n_steps).*")
        yield


class Tiny(pl.LightningModule):
    """conv -> ReLU -> pool -> dropout -> linear on [B,1,12,12], 3 classes; dropout draws from the
    global RNG, so any draw the callback made would change training. Records its validation contexts."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 6 * 6, 3)
        self.forwards = 0
        self.validation_contexts: list[tuple[bool, bool]] = []

    def forward(self, x: Tensor) -> Tensor:
        self.forwards += 1
        return self.fc(self.drop(self.pool(self.relu(self.conv(x)))).flatten(1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def on_validation_epoch_end(self) -> None:  # runs after the callbacks' hook of the same name
        self.validation_contexts.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Normalised inputs [n,1,12,12] (pictures in [0, 1]) and labels [n]."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 12, 12, generator=g) - MEAN) / STD, torch.randint(0, 3, (n,), generator=g)


def loader(n: int, seed: int, shuffle: bool = True) -> DataLoader[tuple[Tensor, ...]]:
    return DataLoader(TensorDataset(*data(n, seed)), batch_size=4, shuffle=shuffle)


def trainer(logdir: Path, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("logger", TensorBoardLogger(str(logdir), name="", version=""))
    kwargs.setdefault("accelerator", "cpu")
    return pl.Trainer(devices=1, callbacks=callbacks, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, **kwargs)


def fit(logdir: Path, callbacks: list[pl.Callback], **kwargs: Any) -> tuple[Tiny, Tensor]:
    """6 optimizer steps from seed 0 over 24 shuffled examples; the model and the global RNG after."""
    torch.manual_seed(0)
    model = Tiny()
    kwargs.setdefault("limit_val_batches", 0)
    trainer(logdir, callbacks, max_steps=6, **kwargs).fit(model, loader(24, seed=1))
    return model, torch.get_rng_state()


def read_events(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={IMAGES: 0, TENSORS: 0, SCALARS: 0})
    acc.Reload()
    return acc


def image_steps(acc: EventAccumulator) -> dict[str, list[int]]:
    return {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}


def logged_image(acc: EventAccumulator, tag: str, step: int) -> np.ndarray:
    [event] = [e for e in acc.Images(tag) if e.step == step]
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


class NullSink:
    def add_images(self, tag: str, img_tensor: Any, global_step: int | None = None) -> None: ...

    def add_text(self, tag: str, text_string: str, global_step: int | None = None) -> None: ...


def expected_image(model: nn.Module, tag: str) -> np.ndarray:
    """What log_attributions makes of the probe on ``model`` as it is now, outside any Trainer."""
    probe_x, probe_y = data(8, seed=2)
    grids = log_attributions(NullSink(), model, probe_x, labels=probe_y, step=0, **OPTIONS)
    return grids[tag][0].permute(1, 2, 0).numpy()


def callback(**kwargs: Any) -> AttributionCallback:
    probe_x, probe_y = data(8, seed=2)
    return AttributionCallback(probe_x, probe_y, **{**OPTIONS, **kwargs})


class Snapshot(pl.Callback):
    """Put on both sides of the callback under test: each batch end, what the second instance sees
    (every module's mode, every .grad, the global RNG) must be what the first one saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[list[bool], list[Tensor | None], Tensor]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        modes = [m.training for m in pl_module.modules()]
        grads = [None if p.grad is None else p.grad.clone() for p in pl_module.parameters()]
        self.seen.append((modes, grads, torch.get_rng_state()))


@pytest.mark.slow
@pytest.mark.parametrize(("accumulate", "background"), [(1, False), (2, False), (1, True)],
                         ids=["accumulate-1", "accumulate-2", "background"])
def test_logs_each_optimizer_step_once_and_leaves_training_unchanged(
    tmp_path: Path, accumulate: int, background: bool
) -> None:
    plain, plain_rng = fit(tmp_path / "plain", [], accumulate_grad_batches=accumulate)
    before, after = Snapshot(), Snapshot()
    attributions = callback(every_n_steps=2, background=background)
    watched, watched_rng = fit(tmp_path / "watched", [before, attributions, after],
                               accumulate_grad_batches=accumulate)

    for (name, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(plain_rng, watched_rng)
    assert len(before.seen) == len(after.seen) == 6 * accumulate  # batches
    for (modes, grads, rng), (modes2, grads2, rng2) in zip(before.seen, after.seen, strict=True):
        assert modes == modes2 and all(modes) and torch.equal(rng, rng2)
        assert all(g is not None and g2 is not None and torch.equal(g, g2)
                   for g, g2 in zip(grads, grads2, strict=True))

    assert attributions.logged_steps == [0, 2, 4, 6]
    acc = read_events(tmp_path / "watched")
    assert image_steps(acc) == {"torchvis/input": [0], **{tag: [0, 2, 4, 6] for tag in MAPS}}
    assert [e.step for e in acc.Scalars("torchvis/probe_accuracy")] == [0, 2, 4, 6]
    # Logged at global step 6, right after the last optimizer step: the final weights.
    for tag in MAPS:
        np.testing.assert_array_equal(logged_image(acc, tag, 6), expected_image(watched, tag))


@pytest.mark.slow
def test_validation_logs_under_no_grad_and_under_inference_mode(tmp_path: Path) -> None:
    # Fit: validation (under no_grad) after every 3 training batches, plus a sanity check (skipped).
    attributions = callback(every_n_steps=None, on_validation=True)
    torch.manual_seed(0)
    model = Tiny()
    trainer(tmp_path / "fit", [attributions], max_steps=6, val_check_interval=3, num_sanity_val_steps=1,
            ).fit(model, loader(12, seed=1), loader(8, seed=3, shuffle=False))
    assert model.validation_contexts == [(False, False)] * 3  # sanity check, steps 3 and 6
    assert attributions.logged_steps == [3, 6]
    fitted = read_events(tmp_path / "fit")
    assert image_steps(fitted) == {"torchvis/input": [3], **{tag: [3, 6] for tag in MAPS}}

    # trainer.validate runs under torch.inference_mode by default.
    model.validation_contexts.clear()
    trainer(tmp_path / "validate", [attributions]).validate(model, loader(8, seed=3, shuffle=False),
                                                            verbose=False)
    assert model.validation_contexts == [(False, True)]
    assert attributions.logged_steps == [0]
    validated = read_events(tmp_path / "validate")
    assert image_steps(validated) == {"torchvis/input": [0], **{tag: [0] for tag in MAPS}}
    for tag in MAPS:
        expected = expected_image(model, tag)
        np.testing.assert_array_equal(logged_image(fitted, tag, 6), expected)
        np.testing.assert_array_equal(logged_image(validated, tag, 0), expected)


@pytest.mark.slow
def test_only_global_rank_zero_computes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pl.Trainer, "is_global_zero", property(lambda self: False))
    attributions = callback(every_n_steps=1)
    model, _ = fit(tmp_path, [attributions])
    assert model.forwards == 6  # the training forwards only
    assert attributions.logged_steps == []
    assert image_steps(read_events(tmp_path)) == {}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_probe_follows_the_model_to_the_gpu(tmp_path: Path) -> None:
    attributions = callback(every_n_steps=3)  # the probe is on the CPU
    model, _ = fit(tmp_path, [attributions], accelerator="gpu")
    assert attributions.logged_steps == [0, 3, 6]
    acc = read_events(tmp_path)
    model.cuda()  # Lightning hands it back on the CPU
    for tag in MAPS:  # cuDNN may pick another algorithm: allow one grey level
        logged, expected = logged_image(acc, tag, 6).astype(int), expected_image(model, tag).astype(int)
        np.testing.assert_allclose(logged, expected, atol=1)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(logger=False), ValueError, "TensorBoardLogger; the trainer's loggers: none"),
        (dict(logger="csv"), ValueError, "TensorBoardLogger; the trainer's loggers: CSVLogger"),
        (dict(layer="conf"), ValueError, "unknown layer 'conf'; closest: 'conv'"),
        (dict(window=4), TypeError, "option 'window' is taken by none"),
    ],
)
def test_mistakes_fail_before_the_first_step(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    if kwargs.get("logger") == "csv":
        kwargs["logger"] = CSVLogger(str(tmp_path))
    trainer_args = {k: kwargs.pop(k) for k in list(kwargs) if k == "logger"}
    torch.manual_seed(0)
    model = Tiny()
    with pytest.raises(error, match=match):
        trainer(tmp_path, [callback(**kwargs)], max_steps=6, **trainer_args).fit(model, loader(24, seed=1))
    assert model.forwards == 0


def test_bad_arguments_fail_at_construction() -> None:
    probe_x, probe_y = data(8, seed=2)
    with pytest.raises(ValueError, match="every_n_steps must be a positive int or None; got 0"):
        AttributionCallback(probe_x, probe_y, every_n_steps=0)
    with pytest.raises(ValueError, match="nothing would be logged"):
        AttributionCallback(probe_x, probe_y, every_n_steps=None)
    with pytest.raises(ValueError, match="must share the batch size"):  # any input kind, checked here
        AttributionCallback((probe_x, probe_x[:3]), probe_y)


def test_lightning_is_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Lightning, torchvis imports and torchvis.lightning says how to get it (in-process: a
    fresh interpreter would cost seconds of torch import)."""
    ours = [name for name in sys.modules if name.split(".")[0] == "torchvis"]
    for name in ours:
        monkeypatch.delitem(sys.modules, name)
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    try:
        for name in ("torchvis", "torchvis.tracking.tensorboard", "torchvis.tracking.monitor"):
            importlib.import_module(name)
        hint = r'^torchvis.tracking.lightning needs Lightning: pip install "torchvis\[lightning\]"$'
        with pytest.raises(ImportError, match=hint):
            importlib.import_module("torchvis.tracking.lightning")
    finally:  # the fresh copies must not outlive the test; monkeypatch puts the originals back
        for name in [n for n in sys.modules if n.split(".")[0] == "torchvis" and n not in ours]:
            del sys.modules[name]


class SignalAndTable(pl.LightningModule):
    """A signal [B,2,16] (Conv1d) and a table [B,3], 2 classes: the callback's probe is a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 + 3, 2)

    def forward(self, signal: Tensor, table: Tensor) -> Tensor:
        return self.fc(torch.cat([torch.relu(self.conv(signal)).mean(dim=2), table], dim=1))

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        signal, table, y = batch
        return F.cross_entropy(self(signal, table), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_tuple_probe_of_signals_and_a_table_is_logged_per_input(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    signal, table = torch.randn(16, 2, 16, generator=g), torch.randn(16, 3, generator=g)
    y = torch.arange(16) % 2
    cb = AttributionCallback((signal[:4], table[:4]), y[:4], methods=("saliency",), every_n_steps=2,
                             feature_names=["a", "b", "c"])
    torch.manual_seed(0)
    data_loader = DataLoader(TensorDataset(signal, table, y), batch_size=4)
    trainer(tmp_path, [cb], max_steps=4, limit_val_batches=0).fit(SignalAndTable(), data_loader)
    steps = image_steps(read_events(tmp_path))
    assert steps == {"torchvis/input/x0": [0], "torchvis/input/x1": [0],
                     "torchvis/saliency/x0": [0, 2, 4], "torchvis/saliency/x1": [0, 2, 4]}
