"""log_attributions and PNGWriter: event files read back, pixel values, looks, and errors."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import references as ref
import torch
from conftest import SmallCNN, seeded
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import (
    IMAGES,
    SCALARS,
    TENSORS,
    EventAccumulator,
)
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from torchvis.methods.spec import Look
from torchvis.rendering.image import grid, render
from torchvis.tracking.tensorboard import PNGWriter, classes_text, log_attributions

MEAN, STD = (0.2, 0.5, 0.4), (0.3, 0.25, 0.5)


def read_events(logdir: Path) -> EventAccumulator:
    """Every event under ``logdir``, nothing dropped (the default keeps 4 images per tag)."""
    acc = EventAccumulator(str(logdir), size_guidance={IMAGES: 0, TENSORS: 0, SCALARS: 0})
    acc.Reload()
    return acc


def decode(png: bytes) -> np.ndarray:
    """PNG bytes -> uint8 [H,W,3]."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def hwc(logged: Tensor) -> np.ndarray:
    """A logged uint8 [1,3,H,W] grid as [H,W,3]."""
    return logged[0].permute(1, 2, 0).numpy()


def expected_grid(tiles: Tensor, factor: int = 8, columns: int = 5) -> np.ndarray:
    """Reference uint8 [H,W,3] of [B,3,H,W] pictures in [0, 1]: each pixel repeated ``factor`` times
    along both axes (12 px tiles -> 96 px), ``columns`` tiles per row (10 tiles: 5 + 5)."""
    big = tiles.float()[:, :, :, None, :, None].expand(-1, -1, -1, factor, -1, factor)
    big = big.reshape(tiles.shape[0], tiles.shape[1], tiles.shape[2] * factor, tiles.shape[3] * factor)
    return (grid(big, nrow=columns) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def table(text: str) -> list[dict[str, str]]:
    """The rows of the markdown table in the classes text, as dicts by column name."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
            for line in lines[2:]]


def predicted_class(cell: str) -> int:
    return int(re.sub(r"[*✗ ]", "", cell))


@pytest.fixture
def probe() -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    """A float32 SmallCNN (3 channels, 5 classes), its normalised inputs [10,3,12,12], the raw
    pictures in [0, 1] and labels."""
    model = seeded(3, lambda: SmallCNN(classes=5, channels=3)).float()
    pictures = torch.rand(10, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    x = (pictures - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    labels = torch.arange(10) % 5
    return model, x, pictures, labels


def test_event_file_round_trip(tmp_path: Path, probe: tuple[nn.Module, Tensor, Tensor, Tensor]) -> None:
    model, x, pictures, labels = probe
    x_before = x.clone()
    methods = ("saliency", "grad_cam", "guided_backprop", "occlusion")
    with SummaryWriter(str(tmp_path)) as writer:
        first = log_attributions(writer, model, x, step=0, labels=labels, methods=methods, layer="conv3",
                                 mean=MEAN, std=STD, class_names=list("abcde"), window=4)
        second = log_attributions(writer, model, x, step=10, labels=labels, methods=methods, layer="conv3",
                                  mean=MEAN, std=STD, class_names=list("abcde"), window=4, log_inputs=False)
    assert torch.equal(x, x_before)
    acc = read_events(tmp_path)

    tags = {f"torchvis/{m}" for m in methods}
    assert set(acc.Tags()["images"]) == tags | {"torchvis/input"}
    assert set(first) == tags | {"torchvis/input"} and set(second) == tags
    for tag in tags:
        events = acc.Images(tag)
        assert [e.step for e in events] == [0, 10]
        for event, logged in zip(events, (first[tag], second[tag]), strict=True):
            # 10 tiles of 12x12 enlarged 8x to 96x96, 5 per row, 2 pixels of padding: 2 rows -> 198 x 492.
            assert (event.height, event.width) == (198, 492)
            pixels = decode(event.encoded_image_string)
            np.testing.assert_array_equal(pixels, hwc(logged))
            assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # not blank
    assert [e.step for e in acc.Images("torchvis/input")] == [0]

    # The input grid is the denormalised input; Grad-CAM and saliency are the references, rendered.
    target = model(x).argmax(dim=1)
    np.testing.assert_allclose(decode(acc.Images("torchvis/input")[0].encoded_image_string),
                               expected_grid(pictures), atol=1)
    cam = render(ref.grad_cam(model, x, target, "conv3").float(), pictures.float())
    assert np.abs(hwc(first["torchvis/grad_cam"]).astype(int) - expected_grid(cam)).max() <= 1
    sal = render(ref.saliency(model, x, target).float(), signed=True)
    assert np.abs(hwc(first["torchvis/saliency"]).astype(int) - expected_grid(sal)).max() <= 1

    # The text: true and predicted classes per tile; the scalar: the accuracy.
    texts = acc.Tensors("torchvis/classes/text_summary")
    assert [t.step for t in texts] == [0, 10]
    rows = table(texts[0].tensor_proto.string_val[0].decode())
    assert [r["#"] for r in rows] == [str(i) for i in range(10)]
    assert [r["true"] for r in rows] == ["abcde"[k] for k in labels.tolist()]
    assert ["abcde".index(re.sub(r"[*✗ ]", "", r["predicted"])) for r in rows] == target.tolist()
    probability = model(x).softmax(dim=1).max(dim=1).values
    assert [float(r["p"]) for r in rows] == pytest.approx(probability.tolist(), abs=0.005)
    accuracy = (target == labels).double().mean().item()
    assert [(s.step, s.value) for s in acc.Scalars("torchvis/probe_accuracy")] == [
        (0, pytest.approx(accuracy)), (10, pytest.approx(accuracy))]


def linear_probe() -> tuple[nn.Module, Tensor]:
    """Flatten -> linear on [2,C,4,4]: class 0 weighs row 0 by +1, row 1 by -1, rows 2-3 by 0."""
    linear = nn.Linear(16, 2, bias=False)
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[0, :4] = 1.0
        linear.weight[0, 4:8] = -1.0
    model = nn.Sequential(nn.Flatten(), linear)
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    return model, x


def tile(logged: Tensor, k: int, size: int = 4, factor: int = 24) -> np.ndarray:
    """Tile ``k`` of a one-row grid of ``size`` px inputs shown ``factor`` times larger (4 px -> 96 px),
    one value per input pixel, [size,size,3]; each input pixel must be a uniform square."""
    big = size * factor
    left = 2 + k * (big + 2)
    block = hwc(logged)[2 : 2 + big, left : left + big].astype(int)
    pixels = block[::factor, ::factor]
    assert (block == pixels.repeat(factor, axis=0).repeat(factor, axis=1)).all()
    return pixels


def test_default_looks_have_closed_form_pixels(tmp_path: Path) -> None:
    model, x = linear_probe()
    with PNGWriter(tmp_path) as sink:
        out = log_attributions(sink, model, x, 0, step=0, methods=("saliency", "occlusion"), window=1)
    red, blue, white = [255, 0, 0], [0, 0, 255], [255, 255, 255]
    for k in range(2):
        # Saliency is the weight row: +1 red, -1 blue, 0 exactly white (bwr, signed, on its own).
        sal = tile(out["torchvis/saliency"], k)
        assert (sal[0] == red).all() and (sal[1] == blue).all() and (sal[2:] == white).all()
        # One-pixel zero occlusion is w * x: signed, blended half and half over the input.
        occ = tile(out["torchvis/occlusion"], k)
        grey = np.round(255 * (x[k, 0, 2:].numpy() + 1) / 2)
        np.testing.assert_allclose(occ[2:], np.repeat(grey[..., None], 3, axis=-1), atol=1)
        assert (occ[0, :, 0] > occ[0, :, 2]).all() and (occ[1, :, 2] > occ[1, :, 0]).all()


def test_rgb_look_keeps_channels_on_grey() -> None:
    linear = nn.Linear(48, 2, bias=False)
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[0, :16] = 1.0  # red channel +1
        linear.weight[0, 16:32] = -1.0  # green channel -1
    model = nn.Sequential(nn.Flatten(), linear)
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    class Recorder:
        def __init__(self) -> None:
            self.images: dict[str, Tensor] = {}

        def add_images(self, tag: str, img_tensor: Tensor, global_step: int | None = None) -> None:
            self.images[tag] = img_tensor

        def add_text(self, tag: str, text_string: str, global_step: int | None = None) -> None:
            pass

    recorder = Recorder()
    out = log_attributions(recorder, model, x, 0, step=0, methods=("guided_backprop",))
    assert recorder.images.keys() == out.keys()
    assert recorder.images["torchvis/guided_backprop"].dtype == torch.uint8
    for k in range(2):
        assert (tile(out["torchvis/guided_backprop"], k) == [255, 0, 128]).all()
    # Overridden: the same map as a heat overlay ignores the sign.
    out = log_attributions(recorder, model, x, 0, step=1, methods=("guided_backprop",),
                           looks={"guided_backprop": Look.SIGNED}, log_inputs=False)
    assert (tile(out["torchvis/guided_backprop"], 0) == [255, 255, 255]).all()  # channel sum is 0


def test_png_writer_stores_what_tensorboard_stores(tmp_path: Path) -> None:
    model, x = linear_probe()
    labels = torch.tensor([0, 1])
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        log_attributions(writer, model, x, step=7, labels=labels, methods=("saliency",))
    with PNGWriter(tmp_path / "png") as sink:
        log_attributions(sink, model, x, step=7, labels=labels, methods=("saliency",))
        sink.add_images("raw float/x", torch.rand(3, 1, 5, 5), 12)  # float, grey, 3 images: tiled
    acc = read_events(tmp_path / "tb")
    for tag in ("torchvis/saliency", "torchvis/input"):
        png = tmp_path / "png" / tag.replace("/", "-") / "step_000007.png"
        assert png.read_bytes() == acc.Images(tag)[0].encoded_image_string
    text = (tmp_path / "png" / "torchvis-classes" / "step_000007.md").read_text(encoding="utf-8")
    assert text == acc.Tensors("torchvis/classes/text_summary")[0].tensor_proto.string_val[0].decode()
    assert decode((tmp_path / "png" / "raw_float-x" / "step_000012.png").read_bytes()).shape == (5, 15, 3)
    lines = (tmp_path / "png" / "scalars.csv").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("torchvis/probe_accuracy,7,")
    with pytest.raises(ValueError, match="closed"):
        sink.add_images("a", torch.rand(1, 3, 2, 2), 1)
    with pytest.raises(ValueError, match="closed"):
        log_attributions(sink, model, x, step=8, methods=("saliency",))
    with pytest.raises(ValueError, match="global_step"):
        PNGWriter(tmp_path / "png").add_images("a", torch.rand(1, 3, 2, 2))
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="cannot create"):
        PNGWriter(tmp_path / "file" / "sub")


def test_classes_text_marks_mistakes_and_explained_class() -> None:
    text = classes_text(["cat", "dog"], [0, 1], [0.9, 0.6], [0, 0], [1, 1])
    assert text.splitlines()[0] == "1 of 2 correct"
    assert table(text) == [
        {"#": "0", "true": "cat", "predicted": "cat", "p": "0.90", "explained": "dog"},
        {"#": "1", "true": "cat", "predicted": "**dog** ✗", "p": "0.60", "explained": "dog"},
    ]
    unlabelled = classes_text(["cat", "dog"], [1], [0.5], None, None)
    assert table(unlabelled) == [{"#": "0", "predicted": "dog", "p": "0.50"}]


def test_explicit_target_and_prefix() -> None:
    model, x = linear_probe()
    calls: list[tuple[str, str, int | None]] = []

    class Texts:
        def add_images(self, tag: str, img_tensor: Tensor, global_step: int | None = None) -> None:
            assert img_tensor.device.type == "cpu" and img_tensor.shape[:2] == (1, 3)

        def add_text(self, tag: str, text_string: str, global_step: int | None = None) -> None:
            calls.append((tag, text_string, global_step))

    log_attributions(Texts(), model, x, [1, 1], step=3, methods=("saliency",), prefix="probe/a")
    ((tag, text, step),) = calls
    assert tag == "probe/a/classes" and step == 3
    assert [r["explained"] for r in table(text)] == ["1", "1"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"methods": ("salience",)}, ValueError, "unknown method 'salience'"),
        ({"methods": ()}, ValueError, "methods is empty"),
        ({"methods": ("occlusion",)}, TypeError, r"needs the option\(s\) \['window'\]"),
        ({"windw": 3}, TypeError, "option 'windw' is taken by none"),
        ({"layer": "conv9"}, ValueError, "unknown layer 'conv9'; closest: 'conv3'"),
        ({"labels": [0, 1]}, ValueError, "labels must be 10 integer class indices"),
        ({"labels": torch.full((10,), 0.5)}, ValueError, "integer class indices"),
        ({"labels": torch.full((10,), 7)}, ValueError, "labels go up to 7; the model has 5 classes"),
        ({"std": None}, ValueError, "give both mean and std"),
        ({"mean": MEAN, "std": (1.0, 0.0, 1.0)}, ValueError, "std entries must be positive"),
        ({"mean": (0.1, 0.2), "std": (1.0, 1.0)}, ValueError, r"one value per input channel \(3\)"),
        ({"mean": None, "std": None}, ValueError, "pass the mean and std"),
        ({"class_names": ["a", "b"]}, ValueError, "class_names has 2 names; the model has 5 classes"),
    ],
)
def test_bad_arguments_fail_before_logging(
    tmp_path: Path, probe: tuple[nn.Module, Tensor, Tensor, Tensor], kwargs: dict[str, object],
    error: type[Exception], match: str,
) -> None:
    model, x, _, _ = probe
    base: dict[str, object] = {"methods": ("saliency",), "mean": MEAN, "std": STD, "layer": "conv3"}
    with PNGWriter(tmp_path) as sink, pytest.raises(error, match=match):
        log_attributions(sink, model, x, step=0, **{**base, **kwargs})  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_writer_must_be_an_open_sink(tmp_path: Path) -> None:
    model, x = linear_probe()
    writer = SummaryWriter(str(tmp_path))
    writer.close()
    with pytest.raises(ValueError, match="the writer SummaryWriter is closed"):
        log_attributions(writer, model, x, step=0)
    assert len(list(tmp_path.iterdir())) == 1  # no second event file was opened
    with pytest.raises(TypeError, match="has no add_images"):
        log_attributions(object(), model, x, step=0)  # type: ignore[arg-type]

    class ImagesOnly:
        def add_images(self, tag: str, img_tensor: Tensor, global_step: int | None = None) -> None:
            pass

    with pytest.raises(TypeError, match="the writer ImagesOnly has no add_text"):
        log_attributions(ImagesOnly(), model, x, step=0)  # type: ignore[arg-type]
