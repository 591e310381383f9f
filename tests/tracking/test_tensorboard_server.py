"""End to end: log with a Monitor, start the real tensorboard server on loopback, read it back over HTTP."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from torchvis.tracking.monitor import Monitor

DEADLINE_S = 60  # for the server to start and load the run; it usually takes a few seconds


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """``(logdir, base URL)`` of a tensorboard serving ``logdir`` on 127.0.0.1 at a port the OS picks;
    stopped (and killed if need be) afterwards."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    output = tmp_path / "tensorboard.log"
    log = output.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
         "--port", "0", "--load_fast", "false", "--reload_interval", "1",
         # The dashboard keeps 10 images and 10 texts per tag unless told otherwise.
         "--samples_per_plugin", "images=100,text=100"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not (found := re.search(r"http://127\.0\.0\.1:(\d+)/", output.read_text())):
            assert process.poll() is None, output.read_text()
            assert time.monotonic() < deadline, "tensorboard did not start in time"
            time.sleep(0.2)
        yield logdir, f"http://127.0.0.1:{found.group(1)}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
        return body


def get_json(url: str) -> Any:
    return json.loads(get(url))


def test_tensorboard_serves_what_the_monitor_logged(server: tuple[Path, str]) -> None:
    logdir, base = server
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    x = torch.rand(4, 3, 10, 10)
    steps = list(range(0, 24, 2))  # 12 logging steps: more than the dashboard's default 10 per tag
    with SummaryWriter(str(logdir / "run1")) as writer, Monitor(
        model, writer, x, [0, 1, 2, 0], layer="0", every=2, class_names=["cat", "dog", "owl"]
    ) as monitor:
        for step in range(24):
            monitor.step(step)

    images = "/data/plugin/images"
    deadline = time.monotonic() + DEADLINE_S
    while True:
        tags = get_json(base + images + "/tags")
        served = get_json(base + images + "/images?" + urllib.parse.urlencode(
            {"run": "run1", "tag": "torchvis/grad_cam", "sample": 0})) if "run1" in tags else []
        if len(served) == len(steps):
            break
        assert time.monotonic() < deadline, f"tensorboard did not load the run: {tags}"
        time.sleep(0.5)
    assert set(tags["run1"]) == {"torchvis/input", "torchvis/saliency", "torchvis/grad_cam"}
    assert [entry["step"] for entry in served] == steps

    for tag, size in (("torchvis/grad_cam", (206, 206)), ("torchvis/input", (206, 206))):
        entries = get_json(base + images + "/images?" + urllib.parse.urlencode(
            {"run": "run1", "tag": tag, "sample": 0}))
        png = get(base + images + "/individualImage?" + entries[-1]["query"])
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        # 4 tiles of 10x10 enlarged 10x to 100x100, 2 per row, 2 pixels of padding.
        assert pixels.shape == (*size, 3)
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
        if tag == "torchvis/input":
            tiles = np.stack([pixels[2 + 102 * (k // 2) : 102 + 102 * (k // 2),
                                     2 + 102 * (k % 2) : 102 + 102 * (k % 2)] for k in range(4)])
            pixel = (x.permute(0, 2, 3, 1) * 255).round().numpy()
            big = pixel.repeat(10, axis=1).repeat(10, axis=2)  # each pixel a 10x10 square
            np.testing.assert_allclose(tiles, big, atol=1)

    text = get_json(base + "/data/plugin/text/text?" + urllib.parse.urlencode(
        {"run": "run1", "tag": "torchvis/classes/text_summary"}))
    assert [entry["step"] for entry in text] == steps
    names = ["cat", "dog", "owl"]
    predicted = model(x).argmax(dim=1).tolist()
    for k, label in enumerate([0, 1, 2, 0]):
        row = rf"<td>{k}</td>\s*<td>{names[label]}</td>\s*<td>(<strong>)?{names[predicted[k]]}"
        assert re.search(row, text[-1]["text"]), text[-1]["text"]
