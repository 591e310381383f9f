"""``layer=None`` never picks a module whose output a later op overwrote in place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchvis.core.passes import gradient_pass
from torchvis.methods.cam import grad_cam


class BatchNormThenInPlaceReLU(nn.Module):
    """conv -> bn -> ``F.relu(..., inplace=True)`` -> spatial mean -> linear: bn's output tensor is
    the post-ReLU map once the forward pass is over, so ``bn`` must not be chosen; ``conv`` is."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            # Shifted statistics, so that the ReLU zeroes part of every channel.
            self.bn.running_mean.copy_(torch.tensor([0.5, -0.3, 0.2]))
            self.bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
        self.double().eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.bn(self.conv(x)), inplace=True).mean(dim=(2, 3)))


def by_hand(model: BatchNormThenInPlaceReLU, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Grad-CAM at ``conv`` in closed form: the conv output ``A`` and ``relu(sum_k alpha_k A_k)``.

    ``dS/dA_k = w[t,k] * gamma_k / sqrt(var_k + eps) * [bn(A)_k > 0] / (h*w)``; ``alpha_k`` is its
    spatial mean (Selvaraju et al. 2017).
    """
    bn = model.bn
    assert bn.running_mean is not None and bn.running_var is not None
    a = F.conv2d(x, model.conv.weight, model.conv.bias, padding=1)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    normed = (a - bn.running_mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None]
    h, w = a.shape[-2:]
    grad = model.head.weight[target][:, :, None, None] * scale[:, None, None] * (normed > 0) / (h * w)
    alpha = grad.mean(dim=(2, 3), keepdim=True)
    return a.detach(), (alpha * a).sum(dim=1, keepdim=True).clamp_min(0).detach()


def test_layer_none_skips_an_output_changed_in_place() -> None:
    model = BatchNormThenInPlaceReLU()
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1])
    activation, cam = by_hand(model, x, target)
    assert 0 < int((cam == 0).sum()) < cam.numel() // 2  # the ReLUs matter, the map is not empty

    with pytest.warns(UserWarning, match="layer=None: using 'conv'"):
        result = gradient_pass(model, x, target, layers=[None])
    assert result.layer_names == ("conv",)
    torch.testing.assert_close(result.activations["conv"], activation, rtol=1e-12, atol=1e-12)

    with pytest.warns(UserWarning, match="layer=None: using 'conv'"):
        got = grad_cam(model, x, target, upsample=False)
    torch.testing.assert_close(got, cam, rtol=1e-10, atol=1e-12)
