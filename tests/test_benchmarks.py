"""The benchmark harness: its measuring pieces on closed forms, and one smoke run on the digits CNN.

No timing is asserted; the peers are never required (a run with them hidden must still pass).
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives beside `torchvis`

from benchmarks import attribution, floors  # noqa: E402
from benchmarks.attribution import Row, check_targets, format_table  # noqa: E402
from benchmarks.timing import Timing, paired, peak_bytes  # noqa: E402
from torchvis.apps.digits import DigitsCNN  # noqa: E402
from torchvis.core.passes import gradient_pass  # noqa: E402
from torchvis.methods.gradient import saliency  # noqa: E402

CPU = torch.device("cpu")
PEER_MODULES = ("captum", "captum.attr", "pytorch_grad_cam", "pytorch_grad_cam.utils.model_targets",
                "torchcam", "torchcam.methods")
OURS = {
    "saliency", "guided_backprop", "grad_cam layer=conv2", "grad_cam layer=None",
    "guided_grad_cam layer=conv2", "explain saliency+grad_cam@conv2,conv1", "the three called separately",
    "occlusion",
}


def digits() -> DigitsCNN:
    return DigitsCNN(generator=torch.Generator().manual_seed(0)).eval()


def is_peer(name: str) -> bool:
    return name.split()[0] in ("captum", "pytorch-grad-cam", "torchcam")


def test_timing_ratio_is_the_median_of_paired_ratios() -> None:
    timing = Timing(seconds=(2.0, 9.0, 6.0), floor=(1.0, 3.0, 2.0))
    assert (timing.median, timing.floor_median, timing.ratio) == (6.0, 2.0, 3.0)


def test_paired_alternates_the_order_and_warms_up() -> None:
    calls: list[str] = []
    timing = paired(lambda: calls.append("a"), lambda: calls.append("f"), CPU, repeats=4, warmup=1)
    assert "".join(calls) == "af" + "af" + "fa" + "af" + "fa"
    assert len(timing.seconds) == len(timing.floor) == 4


def test_paired_stops_at_the_budget_after_the_minimum() -> None:
    timing = paired(lambda: None, lambda: None, CPU, repeats=50, warmup=0, budget=0.0, min_repeats=3)
    assert len(timing.seconds) == 3


def test_peak_bytes_is_the_high_water_mark_not_the_total() -> None:
    def two_in_turn() -> Tensor:
        first = torch.empty(1_000_000)  # 4 MB, freed before the second
        del first
        return torch.empty(250_000)  # 1 MB

    def two_at_once() -> tuple[Tensor, Tensor]:
        return torch.empty(1_000_000), torch.empty(250_000)

    assert 4_000_000 <= peak_bytes(two_in_turn, CPU) < 4_100_000
    assert 5_000_000 <= peak_bytes(two_at_once, CPU) < 5_100_000


def test_input_and_layer_floors_compute_what_the_methods_compute() -> None:
    model, x = digits(), torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(floors.input_floor(model, x)(), saliency(model, x), atol=1e-6)
    layer_grad = floors.layer_floor(model, x, model.conv2)()
    assert torch.allclose(layer_grad, gradient_pass(model, x, layers=["conv2"]).grads["conv2"], atol=1e-6)
    assert not any(module._forward_hooks for module in model.modules())


def test_occluded_chunk_blanks_the_windows_in_raster_order() -> None:
    x = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4) + 1
    chunk = floors.occluded_chunk(x, 5, (2, 2), (2, 2))
    # Flat index k = window * batch + example: windows (0,0), (0,0), (0,2), (0,2), (2,0).
    for k, (example, i, j) in enumerate([(0, 0, 0), (1, 0, 0), (0, 0, 2), (1, 0, 2), (0, 2, 0)]):
        expected = x[example].clone()
        expected[:, i : i + 2, j : j + 2] = 0
        assert torch.equal(chunk[k], expected)


def test_forward_images_pushes_the_total_in_chunks() -> None:
    sizes: list[int] = []

    class Count(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            sizes.append(x.shape[0])
            return x.flatten(1)

    floors.forward_images(Count(), torch.zeros(4, 1, 2, 2), total=10)()
    assert sizes == [4, 4, 2]


def test_check_targets_judges_each_ratio_and_compares_occlusion_with_captum() -> None:
    def row(name: str, ratio: float, model: str = "resnet18") -> Row:
        return Row(model, 224, 1, "cpu", name, "", ratio=ratio)

    rows = [
        row("saliency", 1.02), row("guided_backprop", 1.2), row("grad_cam layer=layer4", 1.04),
        row("grad_cam layer=None", 1.3), row("occlusion", 1.05), row("occlusion batch_size=16", 0.9),
        row("captum Occlusion ppe=1", 1.6), row("captum Occlusion ppe=16", 1.16),
        row("occlusion", 1.2, model="digits"), row("captum Occlusion ppe=64", 1.1, model="digits"),
    ]
    assert check_targets(rows) == [
        "resnet18 224² b1 saliency: 1.020 (≤ 1.05) holds",
        "resnet18 224² b1 guided_backprop: 1.200 (≤ 1.05) MISSED",
        "resnet18 224² b1 grad_cam layer=layer4: 1.040 (≤ 1.05) holds",
        "resnet18 224² b1 occlusion: 1.050 (≤ 1.1) holds; faster than Captum's best "
        "(captum Occlusion ppe=16: 1.160)",
        "digits 224² b1 occlusion: 1.200 (≤ 1.1) MISSED; NOT faster than Captum's best "
        "(captum Occlusion ppe=64: 1.100)",
    ]


@pytest.fixture
def no_peers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every peer library looks uninstalled: importing it raises ImportError."""
    for name in PEER_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    yield


def smoke(tmp_path: Path, *extra: str) -> tuple[dict[str, Row], dict[str, Any]]:
    out = tmp_path / "bench.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = attribution.main([
            "--models", "digits", "--batch", "2", "--repeats", "1", "--warmup", "0", "--window", "14",
            "--stride", "7", "--training-repeats", "2", "--json", str(out), *extra,
        ])
    written = json.loads(out.read_text())
    assert written["rows"] == result["rows"] and written["meta"]["threads"] == torch.get_num_threads()
    assert written["meta"]["command"].startswith("python -m benchmarks.attribution --models digits")
    rows = {r["name"]: Row(**r) for r in written["rows"]}
    return rows, written


def test_smoke_run_on_digits_without_peers(tmp_path: Path, no_peers: None) -> None:
    rows, written = smoke(tmp_path, "--training")
    assert OURS <= set(rows)
    for name in OURS:
        row = rows[name]
        assert row.note == "" or name == "occlusion", row.note
        assert row.ms and row.floor_ms and row.ratio and row.images_per_s and row.repeats == 1
        # One repeat: the paired ratio is that repeat's ratio.
        assert row.ratio == pytest.approx(row.ms / row.floor_ms)
        assert row.min_ratio == row.max_ratio == row.ratio  # the spread of one pair
        assert row.images_per_s == pytest.approx(2 / (row.ms / 1e3))
        assert row.peak_mb is not None and row.peak_mb > 0
    # 3 windows a side of 14 pixels with stride 7 on 28²: 9 windows, 2 examples.
    occlusion = rows["occlusion"]
    assert occlusion.floor.startswith("18 fwd images, batch ") and "9 windows" in occlusion.note
    peers = [row for name, row in rows.items() if is_peer(name)]
    assert len(peers) == 9 and all(row.note.startswith("not installed") and row.ms is None for row in peers)
    monitor = rows["train step + Monitor.step, not logging"]
    assert monitor.ratio and monitor.call_us is not None and monitor.call_us > 0
    assert "train step + Monitor.step, logging" in rows
    background = rows["train step + Monitor.step, logging, background"]
    assert background.ratio and background.call_us is not None
    assert background.note.startswith("the weight snapshot")
    table = format_table(list(rows.values()))
    assert "## digits 28² batch 2 on cpu" in table and "## digits training 28² batch 64 on cpu" in table
    assert any(line.startswith("digits 28² b2 saliency: ") for line in written["targets"])


def test_smoke_run_with_the_peers_that_are_installed(tmp_path: Path) -> None:
    methods = ("--methods", "saliency", "grad_cam", "occlusion")
    rows, _ = smoke(tmp_path, *methods, "--no-memory", "--max-images", "40")
    installed = {name: row for name, row in rows.items() if is_peer(name)}
    for name, row in installed.items():
        if row.note.startswith("not installed"):
            continue
        if name == "captum Occlusion ppe=64":  # 64 x 2 images per forward > --max-images 40
            assert row.note.startswith("skipped: 128 images per forward") and row.ms is None
            continue
        # The same function, computed by another library: the maps agree to float32 rounding.
        assert row.note == "" and row.ms and row.rel_diff is not None and row.rel_diff < 1e-4, (name, row)
    if not installed or all(row.note.startswith("not installed") for row in installed.values()):
        pytest.skip("no peer library installed")


def test_gpu_script_dry_run_appends_a_dated_section(tmp_path: Path) -> None:
    import os
    import subprocess

    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", str(root / "benchmarks" / "gpu.sh"), "--dry-run", "--results", str(results)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\n## GPU run: CPU dry run (")  # appended, not replaced
    assert "Command: `bash benchmarks/gpu.sh --dry-run --results" in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith(("| cnn_tiny", "| vit_tiny"))]
    from torchvis.methods import METHODS

    methods = {*METHODS, "occlusion incremental", "occlusion naive", "explain saliency+grad_cam"}
    methods.discard("occlusion")
    # Two models x two batches x three precisions x every method, each cell measured or n/a.
    assert len(rows) == 2 * 2 * 3 * len(methods) and {row[3] for row in rows} == methods
    for model, batch, precision, method, ms, _, note in (row[:7] for row in rows):
        assert precision in ("fp32", "bf16", "bf16 channels-last")
        # Every cell measured, the ViT's layer methods too (its tokens read with reshape="auto").
        assert float(ms) > 0 and note.strip(" |") == "", (model, batch, precision, method, note)
    assert "| digits training | 8 | fp32 | train step + Monitor.step, logging |" in text


def test_vit_benchmark_measures_grad_cam_against_its_floor() -> None:
    from torchvision.models.vision_transformer import VisionTransformer

    from benchmarks import vit
    from torchvis.methods.cam import grad_cam

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = VisionTransformer(image_size=28, patch_size=7, num_layers=2, num_heads=2, hidden_dim=8,
                                  mlp_dim=16, num_classes=4).eval()
        nn.init.normal_(model.heads.head.weight)
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    layer = "encoder.layers.encoder_layer_1.ln_1"
    timing = vit.measure(model, x, layer=layer, repeats=3)
    assert len(timing.seconds) == len(timing.floor) == 3
    # The floor's gradient is the one Grad-CAM reads: the map from it equals grad_cam's.
    seen: dict[str, Tensor] = {}
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, i, o: seen.update(a=o))
    grad = vit.floor(model, x, module)
    handle.remove()
    to_map = lambda t: t[:, 1:].reshape(2, 4, 4, 8).permute(0, 3, 1, 2)  # noqa: E731
    heat = (to_map(grad).mean(dim=(2, 3), keepdim=True) * to_map(seen["a"])).sum(dim=1, keepdim=True).relu()
    expected = torch.nn.functional.interpolate(heat, size=(28, 28), mode="bilinear", align_corners=False)
    torch.testing.assert_close(grad_cam(model, x, vit.TARGET, layer=layer, reshape="auto"), expected.detach())


def test_per_call_measures_ours_minus_the_floor_for_each_method() -> None:
    """A smoke run (no timing is judged): one value per method and round, and the floors compute what
    the methods compute on the tiny model."""
    from benchmarks import per_call

    extra = per_call.measure(rounds=2, calls=2)
    assert list(extra) == ["saliency", "guided_backprop", "grad_cam", "explain saliency+grad_cam",
                           "promises alone"]
    assert all(len(values) == 2 and all(math.isfinite(v) for v in values) for values in extra.values())
    model, x = per_call.tiny_model()
    cases = per_call.cases(model, x)
    ours, floor = cases["saliency"]
    torch.testing.assert_close(ours(), floor(), rtol=0, atol=0)  # the predicted class, the same gradient
    promised, _ = cases["promises alone"]
    torch.testing.assert_close(promised(), floor(), rtol=0, atol=0)
