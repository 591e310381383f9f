"""TensorBoard logging and the Monitor with probes of every kind: tuples, forward arguments, tables,
signals, callable and index targets; event files read back."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import IMAGES, TENSORS, EventAccumulator
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

import torchvis
from torchvis.core.targets import class_logit
from torchvis.rendering import image, kinds
from torchvis.rendering.figure import figure_rgb
from torchvis.tracking import tensorboard as tb
from torchvis.tracking.monitor import Monitor
from torchvis.tracking.tensorboard import PNGWriter, check_target, log_attributions

B = 4
NAMES = ["age", "dose", "weight", "height"]


class ImageAndTable(nn.Module):
    """An image ``[B,1,8,8]`` and a table ``[B,4]`` times a per-example mask (an extra argument)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.head = nn.Linear(3 + 4, 3)

    def forward(self, img: Tensor, table: Tensor, mask: Tensor) -> Tensor:
        pooled = torch.relu(self.conv(img)).mean(dim=(2, 3))
        return self.head(torch.cat([pooled, table * mask], dim=1))


class WithSixD(nn.Module):
    """A signal ``[B,2,16]`` and a 6-D tensor that torchvis cannot draw."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.head = nn.Linear(3, 2)

    def forward(self, signal: Tensor, six: Tensor) -> Tensor:
        return self.head(torch.relu(self.conv(signal)).mean(dim=2)) + six.flatten(1).sum(dim=1, keepdim=True)


def two_inputs(seed: int = 0) -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ImageAndTable().eval()
    mask = (torch.rand(B, 4, generator=g) > 0.3).float()
    return model, torch.rand(B, 1, 8, 8, generator=g), torch.randn(B, 4, generator=g), mask


def read_events(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={IMAGES: 0, TENSORS: 0})
    acc.Reload()
    return acc


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def text_of(acc: EventAccumulator, tag: str) -> str:
    return acc.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


def test_a_tuple_probe_logs_one_picture_per_input_and_method(tmp_path: Path) -> None:
    model, img, table, mask = two_inputs()
    writer = SummaryWriter(str(tmp_path))
    logged = log_attributions(writer, model, (img, table), class_logit(1), step=7,
                              methods=("saliency", "gradient_x_input"), forward_args=(mask,),
                              feature_names=[None, NAMES])
    writer.close()
    acc = read_events(tmp_path)
    expected = {f"torchvis/{k}/x{i}" for k in ("input", "saliency", "gradient_x_input") for i in (0, 1)}
    assert set(acc.Tags()["images"]) == expected == set(logged)
    for tag in expected:
        (event,) = acc.Images(tag)
        assert event.step == 7
        np.testing.assert_array_equal(decode(event.encoded_image_string),
                                      logged[tag][0].permute(1, 2, 0).numpy())
    # The image input and its maps are drawn as a lone image input would be: the same grid, bit for bit.
    maps = torchvis.saliency(model, (img, table), class_logit(1), forward_args=(mask,))
    grid = image.to_uint8(image.grid(image.enlarge(image.render_map(maps[0], img, image.look_of("saliency"))),
                                     nrow=image.grid_columns(B)))
    torch.testing.assert_close(logged["torchvis/saliency/x0"][0], grid, rtol=0, atol=0)
    torch.testing.assert_close(logged["torchvis/input/x0"][0],
                               image.to_uint8(image.grid(image.enlarge(img), nrow=image.grid_columns(B))),
                               rtol=0, atol=0)
    # The table's picture is its bar charts drawn in one figure: the same pixels.
    pictures = kinds.map_pictures(maps[1], table, image.look_of("saliency"), NAMES)
    figure = tb.plots.plot_grid(pictures, image.grid_columns(B))  # type: ignore[arg-type]
    np.testing.assert_array_equal(logged["torchvis/saliency/x1"][0].permute(1, 2, 0).numpy(),
                                  figure_rgb(figure))
    rows = text_of(acc, "torchvis/classes").splitlines()
    assert rows[0].split(" | ")[-1] == "explained |"
    assert all(row.endswith("| target: class_logit |") for row in rows[2:])
    assert len(rows) == 2 + B


def test_an_output_indexed_by_a_tuple_logs_the_scores_it_explains(tmp_path: Path) -> None:
    class PerStep(nn.Module):  # [B,C,L] -> [B,2,L]: a score per class and time step
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 2, 3, padding=1)

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(x)

    torch.manual_seed(0)
    model = PerStep().eval()
    x = torch.randn(B, 2, 12)
    with PNGWriter(tmp_path) as sink:
        logged = log_attributions(sink, model, x, (1, 5), step=0, methods=("saliency",))
    assert set(logged) == {"torchvis/input", "torchvis/saliency"}
    text = (tmp_path / "torchvis-classes" / "step_000000.md").read_text()
    lines = text.splitlines()[2:]
    scores = [float(line.split("|")[3]) for line in lines]
    np.testing.assert_allclose(scores, model(x)[:, 1, 5].detach().numpy(), rtol=1e-3)
    assert all("output[(1, 5)]" in line for line in lines)
    with PNGWriter(tmp_path / "b") as sink, pytest.raises(ValueError, match="leave labels out"):
        log_attributions(sink, model, x, (1, 5), step=0, methods=("saliency",), labels=[0] * B)


def test_monitor_and_callback_take_a_per_example_index_without_labels(tmp_path: Path) -> None:
    """An index ``[B, k]`` into a larger output is not a class: no labels are asked for, and the
    scores logged are the indexed outputs."""
    from torchvis.tracking.lightning import AttributionCallback

    model = nn.Conv1d(2, 2, 3, padding=1).eval()
    x = torch.randn(B, 2, 12, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([[0, 3], [1, 5], [1, 0], [0, 11]])
    with PNGWriter(tmp_path) as sink:
        with Monitor(model, sink, x, None, target=index, methods=("saliency",), every=1) as monitor:
            monitor.step(0)
    lines = (tmp_path / "torchvis-classes" / "step_000000.md").read_text().splitlines()[2:]
    expected = model(x)[torch.arange(B), index[:, 0], index[:, 1]].detach().numpy()
    np.testing.assert_allclose([float(line.split("|")[3]) for line in lines], expected, rtol=1e-3)
    assert [line.split("|")[2].strip() for line in lines] == [f"output[{tuple(i.tolist())}]" for i in index]
    AttributionCallback(x, None, target=index, methods=("saliency",))


def test_monitor_logs_a_model_with_one_score_per_example_without_labels(tmp_path: Path) -> None:
    """A model returning ``[B]`` (a regression, a binary logit) with ``target=None``: no labels exist,
    none are asked for, and the text shows each example's score, the output itself."""
    from torchvis.tracking.lightning import AttributionCallback

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(3, 1), nn.Flatten(0)).eval()
    with torch.no_grad():
        model[4].weight.abs_()  # every channel raises the score: a CAM with something in it
    x = torch.rand(B, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with PNGWriter(tmp_path) as sink:
        with Monitor(model, sink, x, None, methods=("saliency", "grad_cam"), layer="1", every=1) as monitor:
            monitor.step(0)
    assert (tmp_path / "torchvis-saliency" / "step_000000.png").exists()
    assert (tmp_path / "torchvis-grad_cam" / "step_000000.png").exists()
    lines = (tmp_path / "torchvis-classes" / "step_000000.md").read_text().splitlines()[2:]
    np.testing.assert_allclose([float(line.split("|")[3]) for line in lines], model(x).detach().numpy(),
                               rtol=1e-3)
    scalars = tmp_path / "scalars.csv"  # where PNGWriter writes every scalar
    assert not scalars.exists() or "probe_accuracy" not in scalars.read_text()
    AttributionCallback(x, None, methods=("saliency",))
    # Labels for a model without classes are refused at the first step, where the output is seen.
    labels = torch.zeros(B, dtype=torch.long)
    with PNGWriter(tmp_path / "b") as sink, Monitor(model, sink, x, labels, methods=("saliency",)) as given, \
            pytest.raises(ValueError, match="leave labels out"):
        given.log(0)


def test_monitor_logs_a_classifier_without_labels(tmp_path: Path) -> None:
    """A ``[B, classes]`` model with no labels: the text has no true column and no count of correct
    predictions, and no accuracy is logged; with labels both are there."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(3, 4)).eval()
    x = torch.rand(B, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    predicted = model(x).argmax(dim=1).tolist()
    for labels, folder in ((None, tmp_path / "without"), (torch.tensor(predicted), tmp_path / "with")):
        with PNGWriter(folder) as sink, Monitor(model, sink, x, labels, methods=("saliency",)) as monitor:
            monitor.log(0)
        text = (folder / "torchvis-classes" / "step_000000.md").read_text()
        scalars = folder / "scalars.csv"
        if labels is None:
            assert "| true |" not in text and "correct" not in text
            assert not scalars.exists() or "probe_accuracy" not in scalars.read_text()
        else:
            assert "| true |" in text and f"{B} of {B} correct" in text
            assert "torchvis/probe_accuracy,0,1.0" in scalars.read_text()
        shown = [line.split("|")[2 if labels is None else 3].strip() for line in text.splitlines() if
                 line.startswith("| ") and line.split("|")[1].strip().isdigit()]
        assert shown == [str(c) for c in predicted]


def test_the_callback_keeps_its_own_copy_of_the_forward_arguments() -> None:
    from torchvis.tracking.lightning import AttributionCallback

    model, img, table, mask = two_inputs()
    callback = AttributionCallback((img, table), [0] * B, forward_args=(mask,), methods=("saliency",))
    before = mask.clone()
    mask.add_(1)
    kept = callback.kwargs["forward_args"][0]
    assert kept is not mask and torch.equal(kept, before)


@pytest.mark.parametrize("background", [False, True])
def test_monitor_takes_a_tuple_probe_and_says_once_what_it_cannot_draw(
    tmp_path: Path, background: bool
) -> None:
    torch.manual_seed(0)
    model = WithSixD()
    signal, six = torch.randn(B, 2, 16), torch.zeros(B, 1, 1, 1, 1, 2)
    writer = SummaryWriter(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's default: a repeated warning is shown once
        with Monitor(model, writer, (signal, six), None, target=class_logit(0), every=2,
                     methods=("saliency",), background=background) as monitor:
            for step in range(6):
                monitor.step(step)
    writer.close()
    said = [str(w.message) for w in caught if w.category is kinds.UndrawableWarning]
    why = ("cannot draw a 6-D input of shape [4, 1, 1, 1, 1, 2]; torchvis draws tables [B,N], signals "
           "[B,C,L], images [B,C,H,W] and volumes [B,C,D,H,W]; it is left out")
    assert said == [f"torchvis/input/x1: {why}", f"torchvis/saliency/x1: {why}"]
    acc = read_events(tmp_path)
    assert sorted(acc.Tags()["images"]) == ["torchvis/input/x0", "torchvis/saliency/x0"]
    assert [e.step for e in acc.Images("torchvis/saliency/x0")] == [0, 2, 4]
    assert "target: class_logit" in text_of(acc, "torchvis/classes")


def test_monitor_passes_forward_args_and_feature_names_and_follows_the_dtype(tmp_path: Path) -> None:
    model, img, table, mask = two_inputs(1)
    monitor = Monitor(model, PNGWriter(tmp_path), (img, table), torch.tensor([0, 1, 2, 0]), every=1,
                      methods=("saliency",), forward_args=(mask,), feature_names=NAMES)
    monitor.step(0)
    model.double()
    monitor.step(1)
    assert all(t.dtype == torch.float64 for t in monitor.images)  # type: ignore[union-attr]
    assert monitor._inputs.forward_args[0].dtype == torch.float64
    monitor.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "scalars.csv", "torchvis-classes", "torchvis-input-x0", "torchvis-input-x1",
        "torchvis-saliency-x0", "torchvis-saliency-x1"]
    assert sorted(p.name for p in (tmp_path / "torchvis-saliency-x1").iterdir()) == [
        "step_000000.png", "step_000001.png"]


@pytest.mark.parametrize("target", [None, 2, [0, 1, 2, 0], (3, 1), [(0, 1)] * B,
                                    torch.zeros(B, 2, dtype=torch.long), class_logit(0), np.int64(1)])
def test_check_target_takes_every_kind_of_target(target: object) -> None:
    check_target(target, B)  # type: ignore[arg-type]


@pytest.mark.parametrize(("target", "match"), [
    (True, "got True"), (-1, "got -1"), ((1, -2), "indices must be >= 0"),
    ([0, 1], "4 integer class indices"), (torch.zeros(B), "integer class indices"), ("cat", "got str"),
])
def test_check_target_rejects_what_no_output_takes(target: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_target(target, B)  # type: ignore[arg-type]


def test_metrics_are_refused_for_probes_they_do_not_score_yet(tmp_path: Path) -> None:
    model, img, table, mask = two_inputs()
    with pytest.raises(ValueError, match=r"metrics \(deletion, insertion\) in the monitor need one image"):
        Monitor(model, PNGWriter(tmp_path), (img, table), [0] * B, forward_args=(mask,),
                methods=("saliency",), metrics=("deletion",))


class MaskedImage(nn.Module):
    """An image classifier whose logits are scaled by a per-example forward argument."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(192, 3))

    def forward(self, x: Tensor, scale: Tensor) -> Tensor:
        return self.body(x) * scale[:, None]


def test_metrics_score_an_image_probe_with_forward_args_and_a_callable_target() -> None:
    """The streamed deletion/insertion equal the metric functions called with the same maps, the
    forward argument and the callable target (scored by its own value)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = MaskedImage().eval()
    g = torch.Generator().manual_seed(1)
    img, scale = torch.rand(B, 1, 8, 8, generator=g), torch.rand(B, generator=g) + 0.5
    target = class_logit(1)

    class Scalars:
        def __init__(self) -> None:
            self.values: dict[str, float] = {}

        def add_images(self, *args: object) -> None: ...
        def add_text(self, *args: object) -> None: ...
        def add_scalar(self, tag: str, value: float, step: int) -> None:
            self.values[tag] = value

    sink = Scalars()
    log_attributions(sink, model, img, target, methods=("saliency",), step=0, forward_args=(scale,),
                     metrics=("deletion", "insertion"))
    sal = torchvis.saliency(model, img, target, forward_args=(scale,))
    same: dict[str, Any] = {"pixels_per_step": 4, "forward_args": (scale,)}  # 4 = ceil(64 / 20)
    expected = {
        "torchvis/deletion/saliency": torchvis.deletion(model, img, sal, target, **same),
        "torchvis/insertion/saliency": torchvis.insertion(model, img, sal, target, **same),
    }
    assert set(expected) <= set(sink.values)
    for tag, value in expected.items():
        assert sink.values[tag] == pytest.approx(float(value.mean()), rel=1e-6), tag


def test_logging_a_tuple_probe_leaves_the_model_the_inputs_and_the_rng_as_they_were(tmp_path: Path) -> None:
    model, img, table, mask = two_inputs(2)
    model.train()
    copies = [t.clone() for t in (img, table, mask)]
    rng = torch.get_rng_state()
    with PNGWriter(tmp_path) as sink:
        log_attributions(sink, model, (img, table), step=0, methods=("saliency", "guided_backprop"),
                         forward_args=(mask,), feature_names=[None, NAMES])
    assert torch.equal(torch.get_rng_state(), rng)
    for t, copy in zip((img, table, mask), copies, strict=True):
        assert torch.equal(t, copy) and not t.requires_grad
    for module in model.modules():
        assert module.training
        assert not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)
    assert all(p.grad is None for p in model.parameters())
