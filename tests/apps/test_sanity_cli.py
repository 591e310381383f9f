"""``torchvis sanity``: the figure, table and CSV match the library's sanity check; bad input exits 2
with nothing written."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import torchvis
from torchvis.apps.cli import main
from torchvis.apps.digits import MNIST_MEAN, MNIST_STD, DigitsCNN, save_checkpoint
from torchvis.apps.loading import Preprocess, read_image


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random digits checkpoint, its TorchScript twin, and three grey 28x28 pictures."""
    root = tmp_path_factory.mktemp("sanity-assets")
    model = DigitsCNN(generator=torch.Generator().manual_seed(0))
    save_checkpoint(model, root / "digits.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(model.eval()), root / "digits.ts")
    folder = root / "digits"
    folder.mkdir()
    g = torch.Generator().manual_seed(1)
    for i in range(3):
        pixels = (torch.rand(28, 28, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"d{i}.png")
    return {p.name: p for p in root.iterdir()}


def test_sanity_writes_figures_table_and_csv(assets: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["sanity", str(assets["digits"]), "--model", str(assets["digits.pt"]), "--methods",
                 "saliency,grad_cam,occlusion", "--layer", "relu2", "--layers", "fc2,conv2", "--window", "7",
                 "--seed", "3", "--out", str(out), "--no-progress"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["d0.png", "d1.png", "d2.png", "sanity.csv", "sanity.txt"]
    from torchvis.apps.digits import load_digits_model

    model = load_digits_model(assets["digits.pt"])
    pre = Preprocess(28, (MNIST_MEAN,), (MNIST_STD,))
    x = torch.cat([read_image(assets["digits"] / f"d{i}.png", pre) for i in range(3)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = torchvis.sanity_check(model, x, ["saliency", "grad_cam", "occlusion"], layers=["fc2", "conv2"],
                                     seed=3, layer="relu2", window=7)
    assert (out / "sanity.txt").read_text() == str(want) + "\n"
    assert str(want) in capsys.readouterr().out
    with open(out / "sanity.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["method"], r["stage"]) for r in rows] == [(m, s) for m in ("saliency", "grad_cam", "occlusion")
                                                         for s in ("fc2", "conv2")]
    for row, expected in zip(rows, want.rows, strict=True):
        for field in ("spearman_abs", "spearman", "ssim"):
            value = getattr(expected, field)
            want = "" if value is None else pytest.approx(value, abs=1e-6)
            assert (row[field] if value is None else float(row[field])) == want
        assert int(row["constant"]) == expected.constant and int(row["examples"]) == 3
    figure = np.asarray(Image.open(out / "d1.png"))
    assert figure.ndim == 3 and figure.shape[2] == 3 and figure.std() > 10


@pytest.mark.parametrize("extra, message", [
    (["--layers", "fc9"], "--layers: unknown layer 'fc9'"),
    (["--layers", "relu1"], "'relu1' has no parameters"),
    (["--layers", "fc2,fc2"], "twice"),
    (["--methods", "salience"], "unknown method"),
    (["--layer", "nope"], "--layer"),
    (["--target", "10"], "out of range"),
])
def test_bad_input_exits_2_and_writes_nothing(assets: dict[str, Path], tmp_path: Path, extra: list[str],
                                              message: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["sanity", str(assets["digits"]), "--model", str(assets["digits.pt"]), "--out", str(out),
                 *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_torchscript_is_refused(assets: dict[str, Path], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["sanity", str(assets["digits"]), "--model", str(assets["digits.ts"]), "--size", "28",
                 "--mean", str(MNIST_MEAN), "--std", str(MNIST_STD), "--out", str(out)]) == 2
    assert "not TorchScript" in capsys.readouterr().err
    assert not out.exists()
