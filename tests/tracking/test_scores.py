"""Faithfulness scores streamed over training: scalars and the custom-scalars layout read back from the
event file, values equal to the metrics computed directly, checks at construction, Lightning."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import SCALARS, TENSORS, EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

import torchvis
from torchvis.tracking.monitor import Monitor
from torchvis.tracking.scores import log_scores, scores_layout
from torchvis.tracking.tensorboard import PNGWriter

MEAN, STD = 0.5, 0.25


class SmallNet(nn.Module):
    """[B,1,12,12] -> [B,3]: conv, ReLU, pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


def setup(seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SmallNet()
    g = torch.Generator().manual_seed(seed)
    return model, (torch.rand(6, 1, 12, 12, generator=g) - MEAN) / STD, torch.randint(0, 3, (6,), generator=g)


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchvis.methods.cam.EmptyMapWarning)
        yield


def read(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={TENSORS: 0, SCALARS: 0})
    acc.Reload()
    return acc


def expected(model: nn.Module, x: Tensor, metric: str, method: str, **options: Any) -> float:
    """The metric computed directly, as the monitor should: the predicted class, 21 points on 144 pixels."""
    maps = torchvis.explain(model, x, methods=["saliency", "grad_cam"], layer="relu")
    fn = getattr(torchvis, metric)
    return float(fn(model, x, maps[method], None, pixels_per_step=math.ceil(144 / 20), **options).mean())


def test_monitor_streams_one_scalar_per_metric_and_method(tmp_path: Path) -> None:
    model, x, y = setup()
    with SummaryWriter(str(tmp_path)) as writer, Monitor(
        model, writer, x, y, layer="relu", every=2, mean=MEAN, std=STD, metrics=("deletion", "insertion"),
    ) as monitor:
        monitor.step(0)
        with torch.no_grad():
            model.fc.weight.mul_(-1)  # "training": the scores must follow the model
        monitor.step(2)
    acc = read(tmp_path)
    tags = set(acc.Tags()["scalars"])
    wanted = {f"torchvis/{m}/{k}" for m in ("deletion", "insertion") for k in ("saliency", "grad_cam")}
    assert wanted <= tags
    for tag in wanted:
        assert [e.step for e in acc.Scalars(tag)] == [0, 2]
    now = {tag: acc.Scalars(tag)[1].value for tag in wanted}
    for metric in ("deletion", "insertion"):
        for key in ("saliency", "grad_cam"):
            assert now[f"torchvis/{metric}/{key}"] == pytest.approx(expected(model, x, metric, key), abs=1e-6)
    with torch.no_grad():
        model.fc.weight.mul_(-1)
    before = acc.Scalars("torchvis/deletion/saliency")[0].value
    assert before == pytest.approx(expected(model, x, "deletion", "saliency"), abs=1e-6)


def test_the_custom_scalars_layout_is_registered_once(tmp_path: Path) -> None:
    model, x, y = setup()
    with SummaryWriter(str(tmp_path)) as writer, Monitor(
        model, writer, x, y, layer="relu", every=1, mean=MEAN, std=STD, metrics=("deletion", "insertion"),
        prefix="probe",
    ) as monitor:
        for step in range(3):
            monitor.step(step)
    acc = read(tmp_path)
    events = acc.Tensors("custom_scalars__config__")
    assert len(events) == 1
    layout = layout_pb2.Layout()
    layout.ParseFromString(events[0].tensor_proto.string_val[0])
    [category] = layout.category
    assert category.title == "probe: faithfulness"
    charts = {chart.title: list(chart.multiline.tag) for chart in category.chart}
    assert charts == {"deletion (lower is better)": ["^probe/deletion/"],
                      "insertion (higher is better)": ["^probe/insertion/"]}
    import re

    scalar_tags = acc.Tags()["scalars"]
    for title, (pattern,) in charts.items():
        metric = title.split()[0]
        assert sorted(t for t in scalar_tags if re.match(pattern, t)) == [f"probe/{metric}/grad_cam",
                                                                          f"probe/{metric}/saliency"]


def test_log_scores_without_metrics_scores_nothing() -> None:
    model, x, _ = setup()
    written: list[tuple[str, float]] = []

    class Sink:
        def add_scalar(self, tag: str, value: float, step: int) -> None:
            written.append((tag, value))

    assert log_scores(Sink(), model, x, {"saliency": x}, None, metrics=(), step=0) == {}
    assert written == []


def test_without_metrics_nothing_more_is_logged(tmp_path: Path) -> None:
    model, x, y = setup()
    with SummaryWriter(str(tmp_path)) as writer, Monitor(model, writer, x, y, layer="relu", mean=MEAN,
                                                         std=STD) as monitor:
        monitor.step(0)
    acc = read(tmp_path)
    assert acc.Tags()["scalars"] == ["torchvis/probe_accuracy"]
    assert acc.Tags()["tensors"] == [] or "custom_scalars__config__" not in acc.Tags()["tensors"]


def test_metric_options_reach_the_metrics_and_png_sinks_get_the_scalars(tmp_path: Path) -> None:
    model, x, y = setup()
    with PNGWriter(tmp_path) as sink, Monitor(
        model, sink, x, y, methods=["saliency"], mean=MEAN, std=STD, metrics=["deletion"],
        metric_options={"pixels_per_step": 12, "baseline": -2.0},
    ) as monitor:
        monitor.step(0)
    rows = [line.split(",") for line in (tmp_path / "scalars.csv").read_text().splitlines()]
    [(tag, step, value)] = [r for r in rows if r[0] != "torchvis/probe_accuracy"]
    assert (tag, step) == ("torchvis/deletion/saliency", "0")
    sal = torchvis.saliency(model, x)
    assert float(value) == pytest.approx(
        torchvis.deletion(model, x, sal, pixels_per_step=12, baseline=-2.0).mean().item(), abs=1e-6)


def test_metric_names_and_options_are_checked_at_construction(tmp_path: Path) -> None:
    model, x, y = setup()
    sink = PNGWriter(tmp_path)
    kw: dict[str, Any] = dict(layer="relu", mean=MEAN, std=STD)
    with pytest.raises(ValueError, match=r"unknown metric 'deletoin' \(did you mean 'deletion'\?\)"):
        Monitor(model, sink, x, y, metrics=("deletoin",), **kw)
    with pytest.raises(TypeError, match="sequence of names"):
        Monitor(model, sink, x, y, metrics="deletion", **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="twice"):
        Monitor(model, sink, x, y, metrics=("insertion", "insertion"), **kw)
    with pytest.raises(TypeError, match="metric option 'steps'"):
        Monitor(model, sink, x, y, metrics=("insertion",), metric_options={"steps": 3}, **kw)
    for own in ("forward_args", "forward_kwargs"):  # the monitor's own arguments, not metric options
        with pytest.raises(TypeError, match=f"metric option '{own}'"):
            Monitor(model, sink, x, y, metrics=("insertion",), metric_options={own: None}, **kw)
    assert not list(tmp_path.iterdir())  # nothing was logged
    with pytest.raises(ValueError, match="unknown metric"):
        torchvis.log_attributions(sink, model, x, step=0, metrics=("auc",), **kw)
    assert scores_layout("p", ()) == {"p: faithfulness": {}}


def test_lightning_callback_streams_the_scores(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    from torchvis.tracking.lightning import AttributionCallback

    class Module(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = setup()[0]

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="unknown metric"):
        AttributionCallback(*setup()[1:], metrics=("delete",))
    _, x, y = setup()
    callback = AttributionCallback(x, y, layer="net.relu", every_n_steps=2, mean=MEAN, std=STD,
                                   metrics=("deletion", "insertion"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(devices=1, accelerator="cpu", max_steps=2, callbacks=[callback],
                             logger=TensorBoardLogger(str(tmp_path), name="", version=""),
                             enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False)
        trainer.fit(Module(), DataLoader(TensorDataset(x, y), batch_size=3))
    acc = read(tmp_path)
    for tag in ("torchvis/deletion/saliency", "torchvis/insertion/grad_cam"):
        assert [e.step for e in acc.Scalars(tag)] == [0, 2]
    assert len(acc.Tensors("custom_scalars__config__")) == 1


def test_background_scores_equal_the_foreground_ones_for_the_same_weights(tmp_path: Path) -> None:
    """The worker thread scores a snapshot on its shadow copy: the same floats as the training thread
    would log for those weights, at every step, though the model changes between logging steps."""
    logged = {}
    for kind in ("foreground", "background"):
        model, x, y = setup(1)
        with SummaryWriter(str(tmp_path / kind)) as writer, Monitor(
            model, writer, x, y, layer="relu", every=1, mean=MEAN, std=STD, metrics=("deletion", "insertion"),
            metric_options={"pixels_per_step": 5}, background=kind == "background", queue_size=2,
        ) as monitor:
            for step in range(3):
                monitor.step(step)
                with torch.no_grad():  # "training" right after the step: the snapshot must not see it
                    model.fc.weight.mul_(-0.5).add_(0.1)
                    model.conv.bias.add_(0.2)
        acc = read(tmp_path / kind)
        logged[kind] = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
                        if "/deletion/" in tag or "/insertion/" in tag}
    assert len(logged["foreground"]) == 4
    assert all(len(points) == 3 for points in logged["foreground"].values())
    assert logged["background"] == logged["foreground"]  # exactly, not approximately
