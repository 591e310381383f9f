"""DDP: examples/ddp_monitor.py on two CPU processes (gloo, loopback); rank 0 logs, the ranks stay equal."""

from __future__ import annotations

import importlib.util
import io
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

from torchvis.tracking.tensorboard import log_attributions

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ddp_monitor.py"


def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ddp_monitor", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class NullSink:
    def add_images(self, tag: str, img_tensor: object, global_step: int | None = None) -> None: ...

    def add_text(self, tag: str, text_string: str, global_step: int | None = None) -> None: ...


@pytest.mark.slow
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_rank_zero_monitor_under_ddp(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", str(EXAMPLE), "--out", str(tmp_path), "--steps", "6", "--every", "2",
        "--timeout", "45",  # a collective issued on rank 0 alone fails here instead of hanging
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)  # its own process group, to kill the workers too
    try:
        output, _ = launcher.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        output, _ = launcher.communicate()
        pytest.fail(f"the DDP run hung (a collective on one rank only?):\n{output[-4000:]}")
    assert launcher.returncode == 0, output[-4000:]

    ddp_monitor = example()
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the example's --seed: the weights both ranks started from
        model = ddp_monitor.QuadrantCNN()
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name, initial in model.named_parameters():
        assert torch.equal(rank0[name], rank1[name]), name
        assert not torch.equal(rank0[name], initial), f"{name} never trained"

    # One event file, rank 0's, holding every logging step.
    assert len(list(tmp_path.rglob("events.out.tfevents.*"))) == 1
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={IMAGES: 0, SCALARS: 0})
    acc.Reload()
    maps = ("torchvis/saliency", "torchvis/grad_cam")
    assert {t: [e.step for e in acc.Images(t)] for t in acc.Tags()["images"]} == {
        "torchvis/input": [0], **{tag: [0, 2, 4, 6] for tag in maps}}
    assert [e.step for e in acc.Scalars("torchvis/probe_accuracy")] == [0, 2, 4, 6]

    # The last grid shows the final weights: recomputed here from rank 0's file, pixel for pixel.
    model.load_state_dict(rank0)
    probe_x, probe_y = ddp_monitor.quadrant_images(8, seed=1000)
    expected = log_attributions(NullSink(), model, probe_x, labels=probe_y, step=6, layer="relu2",
                                mean=ddp_monitor.MEAN, std=ddp_monitor.STD)
    for tag in maps:
        [event] = [e for e in acc.Images(tag) if e.step == 6]
        logged = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        np.testing.assert_array_equal(logged, expected[tag][0].permute(1, 2, 0).numpy())
