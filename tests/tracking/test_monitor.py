"""Monitor: training unchanged bit for bit, every logged step on disk, nothing between steps, errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import (
    IMAGES,
    SCALARS,
    TENSORS,
    EventAccumulator,
)
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from torchvis.core.inputs import Inputs
from torchvis.tracking.monitor import Monitor
from torchvis.tracking.tensorboard import PNGWriter

MEAN, STD = 0.5, 0.25


class DropoutCNN(nn.Module):
    """[B,1,12,12] -> [B,3]; dropout draws from the global RNG in training mode. Counts forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8 * 6 * 6, 3)
        self.forwards = 0

    def forward(self, x: Tensor) -> Tensor:
        self.forwards += 1
        x = F.max_pool2d(torch.relu(self.conv2(torch.relu(self.conv1(x)))), 2)
        return self.fc(self.drop(x).flatten(1))


def data(n: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Normalised inputs [n,1,12,12] (pictures in [0, 1]) and labels [n]."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 12, 12, generator=g) - MEAN) / STD, torch.randint(0, 3, (n,), generator=g)


def read_events(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={IMAGES: 0, TENSORS: 0, SCALARS: 0})
    acc.Reload()
    return acc


def tag_steps(acc: EventAccumulator) -> list[tuple[str, int]]:
    """Every (tag, step) pair of images, text and scalars, one per event."""
    tags = acc.Tags()
    return sorted([(t, e.step) for t in tags["images"] for e in acc.Images(t)]
                  + [(t, e.step) for t in tags["tensors"] for e in acc.Tensors(t)]
                  + [(t, e.step) for t in tags["scalars"] for e in acc.Scalars(t)])


def train(steps: int, on_step: Callable[[int, nn.Module], None] | None = None) -> tuple[nn.Module, Tensor]:
    """A few seeded SGD steps; ``on_step`` runs between backward and the optimizer step, when the
    gradients it must not touch are live. Returns the model and the global RNG state after."""
    torch.manual_seed(0)
    model = DropoutCNN()
    x, y = data(32, seed=1)
    model.train()
    for step in range(steps):
        batch = slice(8 * (step % 4), 8 * (step % 4) + 8)
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        if on_step is not None:
            on_step(step, model)
        with torch.no_grad():  # plain SGD by hand: torch.optim's first step imports torch._dynamo (seconds)
            for p in model.parameters():
                assert p.grad is not None
                p.sub_(0.1 * p.grad)
                p.grad = None
    return model, torch.get_rng_state()


def test_training_is_bit_identical_with_the_monitor(tmp_path: Path) -> None:
    probe_x, probe_y = data()
    monitors: list[Monitor] = []

    def log_every_step(step: int, model: nn.Module) -> None:
        if not monitors:
            monitors.append(Monitor(model, SummaryWriter(str(tmp_path)), probe_x, probe_y, every=1,
                                    methods=("saliency", "grad_cam", "guided_backprop", "occlusion"),
                                    layer="conv2", mean=MEAN, std=STD, window=4))
        assert monitors[0].step(step)
        assert all(module.training for module in model.modules())

    plain, plain_rng = train(6)
    watched, watched_rng = train(6, log_every_step)
    monitors[0].close()
    assert monitors[0].logged_steps == list(range(6))
    for (name, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(plain_rng, watched_rng)
    assert len(read_events(tmp_path).Images("torchvis/occlusion")) == 6

    # The comparison can fail: one draw from the global RNG per step changes the dropout masks.
    def draw(step: int, model: nn.Module) -> None:
        torch.rand(1)

    drawn, _ = train(6, draw)
    assert not torch.equal(drawn.state_dict()["fc.weight"], plain.state_dict()["fc.weight"])


def test_every_logged_step_is_on_disk_after_close(tmp_path: Path) -> None:
    model = DropoutCNN()
    probe_x, probe_y = data()
    writer = SummaryWriter(str(tmp_path), max_queue=1000, flush_secs=1000)  # nothing flushes by itself
    with Monitor(model, writer, probe_x, probe_y, layer="conv2", every=3, mean=MEAN, std=STD) as monitor:
        logged = [step for step in range(11) if monitor.step(step)]
    assert logged == monitor.logged_steps == [0, 3, 6, 9]
    expected = [("torchvis/input", 0)] + [(tag, step) for step in logged for tag in (
        "torchvis/saliency", "torchvis/grad_cam", "torchvis/classes/text_summary", "torchvis/probe_accuracy")]
    assert tag_steps(read_events(tmp_path)) == sorted(expected)
    writer.close()


def test_nothing_runs_between_logging_steps(tmp_path: Path) -> None:
    model = DropoutCNN().train()
    probe_x, probe_y = data()
    with PNGWriter(tmp_path) as sink:
        monitor = Monitor(model, sink, probe_x, probe_y, layer="conv2", every=5, mean=MEAN, std=STD)
        assert model.forwards == 0  # construction runs nothing
        assert [monitor.step(s) for s in range(1, 5)] == [False] * 4
        assert model.forwards == 0 and not list(tmp_path.iterdir())
        assert monitor.step(5) and model.forwards > 0
        assert monitor.step(5)  # the same step again: logged again (log() is the same, unconditionally)
    for module in model.modules():
        assert not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)
        assert module.training
    kept = [name for name, value in vars(monitor).items() if isinstance(value, (Tensor, Inputs))]
    assert sorted(kept) == ["_inputs", "_probe"]
    assert monitor.labels == probe_y.tolist()  # kept on the host: only read, never sent to the model
    # One copy of the probe in memory while the dtype matches: what the model gets shares its storage.
    assert monitor._inputs.first.data_ptr() == monitor._probe.first.data_ptr()
    assert monitor.images.data_ptr() == monitor._probe.first.data_ptr() and len(monitor._probe.tensors) == 1
    assert all(p.grad is None for p in model.parameters())
    monitor.close()
    with pytest.raises(RuntimeError, match="closed"):
        monitor.step(10)


def test_probe_is_a_copy(tmp_path: Path) -> None:
    probe_x, probe_y = data()
    pictures = probe_x * STD + MEAN
    with PNGWriter(tmp_path) as sink:
        monitor = Monitor(DropoutCNN(), sink, probe_x, probe_y, methods=("saliency",), mean=MEAN, std=STD,
                          target=probe_y)
        probe_x.zero_()
        probe_y.fill_(2)
        monitor.log(4)
    logged = np.asarray(Image.open(tmp_path / "torchvis-input" / "step_000004.png").convert("L"))
    # 8 tiles of 12 px enlarged 8x to 96 px, 4 per row (two even rows), 2 px of padding.
    assert logged.shape == (2 * 98 + 2, 4 * 98 + 2)
    corners = [(2 + 98 * (k // 4), 2 + 98 * (k % 4)) for k in range(8)]
    tiles = [logged[top : top + 96, left : left + 96] for top, left in corners]
    big = (pictures[:, 0] * 255).round().numpy().repeat(8, axis=1).repeat(8, axis=2)
    np.testing.assert_allclose(np.stack(tiles), big, atol=1)
    text = (tmp_path / "torchvis-classes" / "step_000004.md").read_text(encoding="utf-8")
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and "#" not in line]
    labels = data()[1].tolist()
    assert [int(r[1]) for r in rows] == labels  # true column: the labels as given, not the later 2s
    assert [int(r[-1]) for r in rows] == labels  # explained: target=labels


def test_interpreter_exit_flushes_without_close(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import torch
        from torch import nn
        from torch.utils.tensorboard import SummaryWriter
        from torchvis.tracking.monitor import Monitor
        torch.set_num_threads(1)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 5))
        x = torch.rand(16, 3, 32, 32)
        writer = SummaryWriter({str(tmp_path / "run")!r}, max_queue=1000, flush_secs=1000)
        monitor = Monitor(model, writer, x, torch.arange(16) % 5, layer="0", every=1)
        for step in range(5):
            monitor.step(step)
        # no close(): the interpreter exits with events still queued for the writer thread
    """))
    subprocess.run([sys.executable, str(script)], check=True, timeout=120, cwd=tmp_path)
    expected = [("torchvis/input", 0)] + [(tag, step) for step in range(5) for tag in (
        "torchvis/saliency", "torchvis/grad_cam", "torchvis/classes/text_summary", "torchvis/probe_accuracy")]
    assert tag_steps(read_events(tmp_path / "run")) == sorted(expected)


def closed_writer(tmp_path: Path) -> SummaryWriter:
    writer = SummaryWriter(str(tmp_path / "run"))
    writer.close()
    return writer


def vanished_logdir(tmp_path: Path) -> SummaryWriter:
    writer = SummaryWriter(str(tmp_path / "run"))
    shutil.rmtree(tmp_path / "run")
    (tmp_path / "run").write_text("a file where the log directory was")
    return writer


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"labels": torch.tensor([0, 1])}, ValueError, "labels must be 8 integer class indices"),
        ({"layer": "conv9"}, ValueError, "unknown layer 'conv9'; closest: 'conv2', 'conv1'"),
        ({"every": 0}, ValueError, "every must be a positive int"),
        ({"every": -5}, ValueError, "every must be a positive int"),
        ({"every": 2.5}, ValueError, "every must be a positive int"),
        ({"methods": ("grad_cam", "gradcam")}, ValueError, "unknown method 'gradcam'"),
        ({"methods": ("occlusion",)}, TypeError, "needs the option"),
        ({"target": [0, 1, 2]}, ValueError, "target must hold 8 integer class indices"),
        ({"mean": None, "std": None}, ValueError, "pass the mean and std"),
        ({"writer": closed_writer}, ValueError, "the writer SummaryWriter is closed"),
        ({"writer": vanished_logdir}, OSError, "cannot write to the log directory"),
    ],
)
def test_bad_input_fails_at_construction(
    tmp_path: Path, change: dict[str, object], error: type[Exception], match: str
) -> None:
    model = DropoutCNN()
    probe_x, probe_y = data()
    kwargs: dict[str, object] = {"writer": lambda path: PNGWriter(path / "png"), "images": probe_x,
                                 "labels": probe_y, "layer": "conv2", "mean": MEAN, "std": STD, **change}
    make_writer = kwargs.pop("writer")
    assert callable(make_writer)
    with pytest.raises(error, match=match):
        Monitor(model, make_writer(tmp_path), **kwargs)  # type: ignore[arg-type]
    assert model.forwards == 0


def test_writer_closed_later_is_a_clear_error(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    monitor = Monitor(DropoutCNN(), writer, *data(), layer="conv2", mean=MEAN, std=STD)
    writer.close()
    with pytest.raises(ValueError, match="the writer SummaryWriter is closed"):
        monitor.step(0)
    assert len(list(tmp_path.iterdir())) == 1  # no new event file
    monitor.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_probe_follows_the_model_to_the_gpu(tmp_path: Path) -> None:
    model = DropoutCNN()
    probe_x, probe_y = data()
    with PNGWriter(tmp_path) as sink:
        monitor = Monitor(model, sink, probe_x, probe_y, layer="conv2", mean=MEAN, std=STD)
        assert monitor.images.device.type == "cpu"
        model.cuda()
        monitor.log(0)
        assert monitor.images.device.type == "cuda" and probe_x.device.type == "cpu"
        cuda = Monitor(model, sink, probe_x, probe_y, layer="conv2", mean=MEAN, std=STD, prefix="gpu")
        assert cuda.images.device.type == "cuda"
        cuda.log(1)
    cpu_model = DropoutCNN()
    cpu_model.load_state_dict(model.state_dict())
    with PNGWriter(tmp_path / "cpu") as sink:
        Monitor(cpu_model, sink, probe_x, probe_y, layer="conv2", mean=MEAN, std=STD, prefix="gpu").log(1)
    for tag in ("gpu-saliency", "gpu-grad_cam", "gpu-input"):
        on_gpu = np.asarray(Image.open(tmp_path / tag / "step_000001.png"), dtype=int)
        on_cpu = np.asarray(Image.open(tmp_path / "cpu" / tag / "step_000001.png"), dtype=int)
        assert np.abs(on_gpu - on_cpu).max() <= 2, tag


# --- background logging, dtype changes ----------------------------------------------------------


def pngs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_background_logging_trains_bit_identically_and_logs_the_same_maps(tmp_path: Path) -> None:
    probe_x, probe_y = data()
    monitors: dict[str, Monitor] = {}

    def logger(kind: str) -> Callable[[int, nn.Module], None]:
        def log_every_step(step: int, model: nn.Module) -> None:
            if kind not in monitors:
                monitors[kind] = Monitor(
                    model, PNGWriter(tmp_path / kind), probe_x, probe_y, every=1, layer="conv2",
                    methods=("saliency", "grad_cam", "occlusion"), mean=MEAN, std=STD, window=4,
                    background=kind == "background", queue_size=2)
            assert monitors[kind].step(step)
        return log_every_step

    plain, plain_rng = train(6)
    foreground, _ = train(6, logger("foreground"))
    background, background_rng = train(6, logger("background"))
    for monitor in monitors.values():
        monitor.close()
    for (name, a), (_, b) in zip(plain.state_dict().items(), background.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(plain_rng, background_rng)
    # The snapshot is the weights of its step exactly: the same bytes as logging in the foreground.
    logged = pngs(tmp_path / "background")
    assert len(logged) == 1 + 6 * 3 and logged == pngs(tmp_path / "foreground")


class Sink(PNGWriter):
    """A PNGWriter that raises at one step, or waits for ``gate`` before writing images."""

    def __init__(self, folder: Path, fail_at: int | None = None) -> None:
        super().__init__(folder)
        self.fail_at, self.gate = fail_at, None
        self.gate_open = __import__("threading").Event()
        self.gate_open.set()

    def add_images(self, tag: str, img_tensor: object, global_step: int | None = None, **kw: object) -> None:
        self.gate_open.wait(timeout=60)
        if global_step == self.fail_at:
            raise OSError("disk full")
        super().add_images(tag, img_tensor, global_step)


def test_background_error_surfaces_at_the_next_step_and_at_close(tmp_path: Path) -> None:
    model = DropoutCNN()
    sink = Sink(tmp_path, fail_at=2)
    monitor = Monitor(model, sink, *data(), layer="conv2", every=2, mean=MEAN, std=STD, background=True)
    assert monitor.step(0) and monitor.step(2)
    monitor._background.jobs.join()  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="background logging of step 2 failed: OSError: disk full"):
        monitor.step(3)  # a non-logging step reports it too
    assert monitor.step(4)
    monitor.wait()  # step 4 written, nothing failed: no error
    assert (tmp_path / "torchvis-saliency" / "step_000004.png").exists()
    sink.fail_at = 6
    assert monitor.step(6)
    with pytest.raises(RuntimeError, match="background logging of step 6 failed"):
        monitor.wait()  # waits for the queued step and raises its error
    # An error still pending at close is raised there, after the queue drained.
    monitor2 = Monitor(model, Sink(tmp_path / "b", fail_at=0), *data(), layer="conv2", mean=MEAN, std=STD,
                       background=True)
    monitor2.log(0)
    with pytest.raises(RuntimeError, match="step 0 failed"):
        monitor2.close()
    monitor.close()
    assert (tmp_path / "torchvis-saliency" / "step_000004.png").exists()


def test_background_queue_is_bounded_and_blocks_rather_than_drops(tmp_path: Path) -> None:
    import threading

    model = DropoutCNN()
    sink = Sink(tmp_path)
    sink.gate_open.clear()  # the worker is stuck writing step 0
    monitor = Monitor(model, sink, *data(), layer="conv2", methods=("saliency",), mean=MEAN, std=STD,
                      every=1, background=True, queue_size=1)
    monitor.step(0)  # taken by the worker, which gives its slot back once it loaded the weights
    jobs = monitor._background.jobs  # type: ignore[union-attr]
    while jobs.unfinished_tasks and not jobs.empty():
        pass  # until the worker took step 0
    monitor.step(1)  # queued, in the only slot
    third = threading.Thread(target=monitor.step, args=(2,))
    third.start()
    third.join(timeout=0.5)
    assert third.is_alive(), "a full queue must block the training thread, not drop the step"
    sink.gate_open.set()
    third.join(timeout=60)
    monitor.close()
    assert sorted(p.name for p in (tmp_path / "torchvis-saliency").iterdir()) == [
        "step_000000.png", "step_000001.png", "step_000002.png"]


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_monitor_follows_a_dtype_change(tmp_path: Path, dtype: torch.dtype, background: bool) -> None:
    model = DropoutCNN()
    with PNGWriter(tmp_path) as sink:
        monitor = Monitor(model, sink, *data(), layer="conv2", every=1, mean=MEAN, std=STD,
                          background=background)
        monitor.step(0)
        model.to(dtype)
        monitor.step(1)
        model.float()
        monitor.step(2)
        monitor.close()
    for step in range(3):
        assert (tmp_path / "torchvis-grad_cam" / f"step_{step:06d}.png").exists()
    assert monitor.images.dtype == torch.float32
    if dtype == torch.float64:  # exact round trip of the weights; the float32 probe was kept
        first, last = (tmp_path / "torchvis-saliency" / f"step_{s:06d}.png" for s in (0, 2))
        assert first.read_bytes() == last.read_bytes()


def test_numpy_targets_and_labels(tmp_path: Path) -> None:
    probe_x, probe_y = data()
    with PNGWriter(tmp_path) as sink:
        for target in (np.int64(1), np.array(1), torch.tensor(1), probe_y.numpy()):
            Monitor(DropoutCNN(), sink, probe_x, probe_y.numpy(), layer="conv2", mean=MEAN, std=STD,
                    target=target).log(0)
        from torchvis.tracking.tensorboard import log_attributions

        logged = log_attributions(sink, DropoutCNN(), probe_x, np.int64(2), step=1, labels=probe_y.numpy(),
                                  layer="conv2", mean=MEAN, std=STD)
    assert "torchvis/grad_cam" in logged


def test_floating_forward_arguments_follow_the_model_dtype(tmp_path: Path) -> None:
    """The probe and the floating tensors among its forward arguments take the model's dtype, at
    construction and after the model changes dtype, from the first copy (no loss on a round trip)."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x: Tensor, scale: Tensor) -> Tensor:
            return self.linear(x) * scale

    model = Scaled()
    x, scale = torch.rand(2, 4), torch.rand(2, 1, dtype=torch.float64) + 0.5
    with PNGWriter(tmp_path) as sink:
        monitor = Monitor(model, sink, x, [0, 1], forward_args=(scale,), methods=("saliency",), every=1)
        dtypes = [(monitor._inputs.first.dtype, monitor._inputs.forward_args[0].dtype)]
        for convert in (nn.Module.double, nn.Module.half, nn.Module.float):
            convert(model)
            monitor._follow(model)
            dtypes.append((monitor._inputs.first.dtype, monitor._inputs.forward_args[0].dtype))
        monitor.close()
    assert dtypes == [(torch.float32, torch.float32), (torch.float64, torch.float64),
                      (torch.float16, torch.float16), (torch.float32, torch.float32)]
    torch.testing.assert_close(monitor._inputs.forward_args[0], scale.float(), rtol=0, atol=0)


@pytest.mark.parametrize("background", [False, True])
def test_logging_steps_do_not_repeat_the_construction_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, background: bool
) -> None:
    """The probe, labels, layers and options are checked once, at construction; a logging step (in
    either mode) logs without checking them again (on a GPU the label checks are host syncs)."""
    from torchvis.tracking import monitor as monitor_module
    from torchvis.tracking import tensorboard

    calls: list[str] = []
    for module in (tensorboard, monitor_module):
        checked = module.check_logging

        def counting(*args: object, _checked: Callable[..., Inputs] = checked, **kwargs: object) -> Inputs:
            calls.append("check")
            return _checked(*args, **kwargs)

        monkeypatch.setattr(module, "check_logging", counting)
    model = DropoutCNN()
    with Monitor(model, PNGWriter(tmp_path), *data(), layer="conv2", every=1, mean=MEAN, std=STD,
                 background=background) as monitor:
        assert calls == ["check"]
        for step in range(3):
            monitor.step(step)
        monitor.wait()
    assert calls == ["check"]
    assert (tmp_path / "torchvis-grad_cam" / "step_000002.png").exists()
