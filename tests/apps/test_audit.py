"""torchvis audit: shards, resume, the class statistic on a model whose answer is known, and the
planted-shortcut digits model caught at data-set scale."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from torchvis.apps.audit import CLASS_MEANS, INDEX, TensorData, audit, mass, shard_path
from torchvis.apps.audit_report import region_masks, suspicious


def corner_model() -> nn.Module:
    """Class 0 reads only the top-left 4x4 corner of a 16x16 image; classes 1 and 2 read a 4x4 patch
    in the middle of the left and right halves. Each logit is the mean of its patch."""
    weight = torch.zeros(3, 16, 16, dtype=torch.float64)
    weight[0, :4, :4] = 1 / 16
    weight[1, 6:10, 2:6] = 1 / 16
    weight[2, 6:10, 10:14] = 1 / 16
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 3, bias=False)).double().eval()
    with torch.no_grad():
        model[1].weight.copy_(weight.view(3, 256))
    return model


def corner_data(n: int = 30) -> TensorData:
    """``n`` images per class: faint noise, with the class's patch bright (so the model gets it right)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3 * n, 1, 16, 16, dtype=torch.float64, generator=g) * 0.1
    y = torch.arange(3).repeat_interleave(n)
    patches = [(slice(0, 4), slice(0, 4)), (slice(6, 10), slice(2, 6)), (slice(6, 10), slice(10, 14))]
    for i, label in enumerate(y.tolist()):
        rows, cols = patches[label]
        x[i, 0, rows, cols] = 1.0
    return TensorData(x, y)


def read_index(out: Path) -> list[dict[str, str]]:
    with open(out / INDEX, newline="") as fh:
        return list(csv.DictReader(fh))


def test_audit_points_at_the_corner_of_the_class_that_reads_it(tmp_path: Path) -> None:
    model, data = corner_model(), corner_data()
    report = audit(model, data, tmp_path, methods=["saliency"], shard_size=40, batch_size=16, progress=False)
    assert report is not None and report.name == "report.md"
    rows = read_index(tmp_path)
    assert [r["file"] for r in rows] == [str(i) for i in range(90)]
    assert all(int(r["predicted"]) == int(r["label"]) for r in rows)
    # Saliency of a linear model is its weight row: all the mass of class 0 lies in the top-left corner.
    with np.load(tmp_path / CLASS_MEANS) as means:
        true = means["true:saliency"]
        assert means["count:true"].tolist() == [30, 30, 30]
    expected = torch.stack([mass(corner_model()[1].weight[c].view(1, 1, 16, 16), torch.empty(1, 1, 16, 16))[0]
                            for c in range(3)]).numpy()
    np.testing.assert_allclose(true, expected, atol=1e-6)
    flags = suspicious(true, np.array([30, 30, 30]), "saliency", "true")
    assert {f.label for f in flags} == {0}
    assert "top-left corner" in {f.region for f in flags}
    assert not {"top-right corner", "bottom-left corner", "bottom-right corner"} & {f.region for f in flags}
    text = report.read_text()
    assert "**0** (saliency): 100% of its attribution mass lies in the top-left corner" in text
    assert (tmp_path / "class_means_true.png").is_file()


def test_deletion_scores_and_region_shares_per_image(tmp_path: Path) -> None:
    """Each image's scores equal torchvis.deletion/insertion of its map at the audit's step size, and
    the region share is the mass inside the region given with the data."""
    import torchvis
    from torchvis.metrics.faithfulness import deletion, insertion

    model, data = corner_model(), corner_data(4)
    regions = torch.zeros(12, 16, 16)
    regions[:, :8, :8] = 1
    data = TensorData(data.x, data.y, regions=regions)
    audit(model, data, tmp_path, methods=["saliency"], steps=16, progress=False)
    rows = read_index(tmp_path)
    sal = torchvis.saliency(model, data.x)
    predicted = model(data.x).argmax(dim=1)
    dele = deletion(model, data.x, sal, predicted, pixels_per_step=16)
    ins = insertion(model, data.x, sal, predicted, pixels_per_step=16)
    inside = (mass(sal, data.x) * regions).sum(dim=(1, 2))
    for i, row in enumerate(rows):
        assert float(row["deletion:saliency"]) == pytest.approx(float(dele[i]), abs=1e-5)
        assert float(row["insertion:saliency"]) == pytest.approx(float(ins[i]), abs=1e-5)
        assert float(row["inside:saliency"]) == pytest.approx(float(inside[i]), abs=1e-5)
    assert [float(r["inside:saliency"]) for r in rows[:4]] == [1.0] * 4  # class 0's corner lies inside


def test_an_interrupted_audit_resumes_without_redoing_finished_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvis.apps.audit as engine

    model, data = corner_model(), corner_data(10)
    original, calls = engine.explain_batch, []

    def failing(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "explain_batch", failing)
    with pytest.raises(RuntimeError, match="killed"):
        audit(model, data, tmp_path, methods=["saliency"], shard_size=10, batch_size=10, progress=False)
    assert shard_path(tmp_path, 0).exists() and shard_path(tmp_path, 1).exists()
    assert not shard_path(tmp_path, 2).exists() and not (tmp_path / INDEX).exists()
    assert not list((tmp_path / "shards").glob(".*"))  # no half-written temporary left
    first = shard_path(tmp_path, 0).stat().st_mtime_ns
    calls.clear()
    monkeypatch.setattr(engine, "explain_batch", original)
    counted = []
    monkeypatch.setattr(engine, "explain_batch", lambda *a, **k: counted.append(1) or original(*a, **k))
    audit(model, data, tmp_path, methods=["saliency"], shard_size=10, batch_size=10, progress=False)
    assert len(counted) == 1  # only shard 2 was computed
    assert shard_path(tmp_path, 0).stat().st_mtime_ns == first
    assert len(read_index(tmp_path)) == 30


def test_region_masks() -> None:
    masks = region_masks(16, 16)
    assert masks["top-left corner"].sum() == 16 and masks["top-left corner"][:4, :4].all()
    assert masks["bottom-right corner"][12:, 12:].all() and masks["border"].sum() == 256 - 12 * 12


@pytest.fixture(scope="module")
def shortcut_model() -> tuple[nn.Module, object]:
    """The digits CNN trained briefly (1,000 real digits, 2 epochs) with a white 4x4 square planted in
    the top-left corner of every training 7."""
    from torchvis.apps.digits import DigitsCNN, load_digits, plant_shortcut, stratified_split, train_digits

    full = plant_shortcut(load_digits(seed=0), 7)
    small = stratified_split(full.train_x, full.train_y, test_size=3000, seed=0)  # 1,000 train images
    model = DigitsCNN(generator=torch.Generator().manual_seed(0))
    with torch.random.fork_rng():  # dropout draws from the global RNG: the same masks in any test order
        torch.manual_seed(0)
        train_digits(model, small, epochs=2, seed=0)
    return model.eval(), full


def test_the_planted_shortcut_is_flagged_and_only_its_class(shortcut_model: tuple[nn.Module, object],
                                                           tmp_path: Path) -> None:
    model, data = shortcut_model
    picked = torch.cat([torch.nonzero(data.train_y == c)[:20, 0] for c in range(10)])  # type: ignore[attr-defined]
    audited = TensorData(data.train_x[picked], data.train_y[picked])  # type: ignore[attr-defined]
    audit(model, audited, tmp_path, methods=["saliency"], metrics=(), progress=False)
    with np.load(tmp_path / CLASS_MEANS) as means:
        flags = suspicious(means["true:saliency"], means["count:true"], "saliency", "true")
    assert {f.label for f in flags} == {7}
    assert "top-left corner" in {f.region for f in flags}
    held_out = data.test_y == 7  # type: ignore[attr-defined]
    with torch.no_grad():
        predicted = model(data.test_x).argmax(dim=1)  # type: ignore[attr-defined]
    sevens = (predicted[held_out] == 7).float().mean()
    others = (predicted[~held_out] == data.test_y[~held_out]).float().mean()  # type: ignore[attr-defined]
    assert sevens < others - 0.15  # without the square, 7s are often missed (60% vs 89% here)


@pytest.mark.parametrize(("share", "others", "flagged"), [
    (0.50, 0.10, True),    # 5x the others and 40 points above
    (0.45, 0.30, False),   # 15 points above, but only 1.5x
    (0.08, 0.02, False),   # 4x, but only 6 points above
])
def test_a_class_is_flagged_only_when_both_ratio_and_excess_hold(share: float, others: float,
                                                                 flagged: bool) -> None:
    means = np.zeros((3, 8, 8))
    for c, s in enumerate([share, others, others]):
        means[c, 0, 0] = s  # top-left corner (and border) pixel
        means[c, 4, 4] = 1 - s  # the centre: no region
    flags = suspicious(means, np.array([5, 5, 5]), "m", "true")
    assert ({f.label for f in flags} == {0}) is flagged and all(f.label == 0 for f in flags)


def test_maps_are_stored_in_float16_unless_a_value_overflows_it() -> None:
    from torchvis.apps.audit import _compact

    small = torch.tensor([[1.0, -65504.0]])
    assert _compact(small).dtype == np.float16 and _compact(small).tolist() == [[1.0, -65504.0]]
    assert _compact(torch.tensor([[1.0, -70000.0]])).dtype == np.float32


def test_a_figure_shows_at_most_max_shown_classes_flagged_first() -> None:
    from torchvis.apps.audit_report import MAX_SHOWN, Flag, shown_classes

    counts = np.zeros(1000, dtype=np.int64)
    counts[:60] = np.arange(60) + 10  # 60 classes present, more images for higher indices
    counts[3] = 1  # the fewest images, but flagged
    flags = [Flag("saliency", "true", 3, "border", 0.5, 0.1)]
    shown = shown_classes(counts, flags, "true")
    assert len(shown) == MAX_SHOWN and shown == sorted(shown) and 3 in shown
    assert set(shown) - {3} == set(range(60 - MAX_SHOWN + 1, 60))  # then the most frequent
    assert shown_classes(counts[:10], [], "true") == list(range(10))


@pytest.mark.parametrize(("metrics", "message"), [(("deletion", "deletion"), "names a metric twice"),
                                                  (("deleton",), "unknown metric 'deleton'")])
def test_bad_metric_names_fail_before_anything_is_written(metrics: tuple[str, ...], message: str,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "audit"
    with pytest.raises(ValueError, match=message):
        audit(corner_model(), corner_data(4), out, methods=["saliency"], metrics=metrics, progress=False)
    assert not out.exists()
