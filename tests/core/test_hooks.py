"""The hook core: capture, resolve_layer, and that nothing stays attached."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchvis.core.hooks import capture, feature_maps, forward_hooks, guided_relus, resolve_layer, submodules


class Boom(Exception):
    pass


class Raise(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        raise Boom("model failed")


def conv_relu(seed: int = 0) -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=True)).double()


def attached(model: nn.Module) -> list[str]:
    """Names of modules that still carry any hook."""
    return [
        name
        for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
    ]


def test_capture_records_output_before_later_inplace_op(randn: Callable[..., Tensor]) -> None:
    model, x = conv_relu(), randn(0, 2, 2, 5, 5)
    conv = model[0]
    assert isinstance(conv, nn.Conv2d)
    expected = F.conv2d(x, conv.weight, conv.bias, padding=1).detach()
    assert expected.min() < 0  # the ReLU after it would change these values if it acted on the record
    with capture(model, ["0"]) as rec:
        out = model(x)
    assert torch.equal(rec.output("0"), expected)
    assert torch.equal(rec.outputs["0"].detach(), expected)
    assert torch.equal(out, expected.clamp_min(0))
    assert rec.calls["0"] == 1
    assert attached(model) == []


def test_capture_without_copy_reports_a_record_overwritten_in_place(randn: Callable[..., Tensor]) -> None:
    model, x = conv_relu(), randn(0, 2, 2, 5, 5)  # conv -> nn.ReLU(inplace=True)
    conv = model[0]
    assert isinstance(conv, nn.Conv2d)
    expected = F.conv2d(x, conv.weight, conv.bias, padding=1).detach()
    with torch.no_grad(), capture(model, ["0"], copy=False) as rec:
        out = model(x)
    assert rec.outputs["0"] is out  # uncopied: the in-place ReLU wrote over the record
    assert rec.modified() == ["0"]
    with pytest.raises(RuntimeError, match="modified in place"):
        rec.output("0")
    with torch.no_grad(), capture(model, ["0"]) as rec:  # copy=True, the default
        model(x)
    assert rec.modified() == [] and torch.equal(rec.output("0"), expected)
    plain = nn.Sequential(conv, nn.ReLU())
    with torch.no_grad(), capture(plain, ["0"], copy=False) as rec:
        out = plain(x)
    assert rec.modified() == [] and torch.equal(rec.output("0"), expected)
    assert torch.equal(out, expected.clamp_min(0)) and attached(plain) == []


def test_recording_grads_match_autograd(randn: Callable[..., Tensor]) -> None:
    model, x = conv_relu(1), randn(1, 2, 2, 5, 5)
    v = randn(2, 2, 3, 5, 5)
    with capture(model, ["0", "1"]) as rec:
        score = (model(x.requires_grad_(True)) * v).sum()
        g_conv, g_relu = torch.autograd.grad(score, [rec.outputs["0"], rec.outputs["1"]], retain_graph=True)
        (g_x,) = torch.autograd.grad(score, x)
    assert torch.equal(rec.grads["0"], g_conv) and torch.equal(rec.grads["1"], g_relu)
    # Closed form: d sum(v * relu(a)) / da = v where a > 0, and v at the ReLU's output.
    a = rec.outputs["0"].detach()
    assert torch.equal(g_conv, v * (a > 0)) and torch.equal(g_relu, v)
    assert g_x.abs().sum() > 0 and attached(model) == []


def test_recording_ignores_backward_passes_after_the_block(randn: Callable[..., Tensor]) -> None:
    model, x = conv_relu(2), randn(2, 2, 2, 5, 5)
    with capture(model, ["0"]) as rec:
        out = model(x.requires_grad_(True))
    torch.autograd.grad(out.sum(), x)
    assert "0" not in rec.grads  # the tensor hook went with the block


def test_capture_counts_calls_and_keeps_the_last(randn: Callable[..., Tensor]) -> None:
    relu = nn.ReLU()
    model = nn.Sequential(relu, nn.Identity(), relu)
    with torch.no_grad(), capture(model, [relu]) as rec:
        model(randn(0, 1, 1, 3, 3) - 5)
    assert rec.calls["0"] == 2
    assert torch.equal(rec.outputs["0"], torch.zeros(1, 1, 3, 3, dtype=torch.float64))


def test_recording_output_refuses_a_tensor_changed_in_place(randn: Callable[..., Tensor]) -> None:
    model = conv_relu()
    with torch.no_grad(), capture(model, ["0"]) as rec:
        model(randn(0, 1, 2, 4, 4))
    rec.outputs["0"].mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        rec.output("0")
    with pytest.raises(RuntimeError, match="did not run"):
        rec.output("1")


def test_hooks_removed_when_the_model_raises(randn: Callable[..., Tensor]) -> None:
    model = nn.Sequential(*conv_relu(), Raise())
    x = randn(0, 1, 2, 4, 4)
    with pytest.raises(Boom), capture(model, ["0", "1"]):
        model(x)
    with pytest.raises(Boom), feature_maps(model):
        model(x)
    with pytest.raises(Boom), forward_hooks([(model[0], lambda *a: None)], [(model[1], lambda *a: None)]):
        model(x)
    with pytest.raises(Boom), guided_relus():
        model(x)
    assert attached(model) == []
    assert torch._C._len_torch_function_stack() == 0


def test_guided_relus_sees_every_relu_spelling(randn: Callable[..., Tensor]) -> None:
    x = randn(0, 4).requires_grad_(True)
    with guided_relus() as report:
        a = F.relu(x) + torch.relu(x) + x.relu() + nn.ReLU()(x)
        b = x * 1
        b.relu_()
        F.gelu(x)
    assert report.relu_calls == 5 and dict(report.untreated) == {"gelu": 1}
    assert torch._C._len_torch_function_stack() == 0
    # Guided rule: the negative upstream gradient stops at every ReLU, so nothing reaches x.
    (grad,) = torch.autograd.grad((a + b).sum() * -1, x, retain_graph=True)
    assert torch.equal(grad, torch.zeros_like(grad))
    (grad,) = torch.autograd.grad(a.sum() + b.sum(), x)
    assert torch.equal(grad, 5.0 * (x > 0))


def test_feature_maps_in_finishing_order(randn: Callable[..., Tensor]) -> None:
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU()), nn.Flatten()).double()
    with torch.no_grad(), feature_maps(model) as maps:
        model(randn(0, 1, 1, 2, 2))
    assert [m.name for m in maps] == ["0.0", "0.1", "0"]
    assert maps[-1].output.shape == (1, 2, 2, 2) and attached(model) == []


def test_resolve_layer_by_name_and_by_module() -> None:
    inner = nn.Sequential(nn.ReLU(), nn.Linear(1, 1))
    model = nn.Sequential(nn.Conv2d(1, 1, 1), inner)
    assert resolve_layer(model, "1.1") == ("1.1", inner[1])
    assert resolve_layer(model, inner[0]) == ("1.0", inner[0])
    assert resolve_layer(model, "") == ("", model)


def test_resolve_layer_rejects_foreign_module_and_unknown_name() -> None:
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Sequential(nn.ReLU(), nn.Linear(1, 1)))
    with pytest.raises(ValueError, match="not a submodule"):
        resolve_layer(model, nn.ReLU())
    with pytest.raises(ValueError, match=r"unknown layer '1\.2'.*'1\.1'") as info:
        resolve_layer(model, "1.2")
    assert "'1.0'" in str(info.value)
    with pytest.raises(TypeError):
        resolve_layer(model, 3)  # type: ignore[arg-type]


@pytest.mark.parametrize("compile_with", ["script", "trace"])
def test_torchscript_models_are_refused_with_a_clear_error(
    small_cnn: Callable[[int], nn.Module], randn: Callable[..., Tensor], compile_with: str
) -> None:
    from torchvis.methods.cam import grad_cam

    model, x = small_cnn(0), randn(0, 2, 3, 8, 8)
    # Scripted modules refuse hooks; traced ones would accept them and silently never call them.
    compiled = torch.jit.script(model) if compile_with == "script" else torch.jit.trace(model, x)
    with pytest.raises(TypeError, match="TorchScript module"), capture(compiled, ["conv3"]):
        compiled(x)
    with pytest.raises(TypeError, match="TorchScript module"):
        grad_cam(compiled, x, layer="conv3")


def test_recording_without_grads_adds_no_tensor_hook(randn: Callable[..., Tensor]) -> None:
    """``grads=False`` (what the passes use: they take gradients from autograd.grad) records the outputs
    only; a backward inside the block reaches no hook."""
    model, x = conv_relu(3), randn(4, 1, 2, 5, 5)
    with capture(model, ["0"], grads=False) as rec:
        out = model(x.requires_grad_(True))
        (g,) = torch.autograd.grad(out.sum(), rec.outputs["0"])
        assert rec.outputs["0"]._backward_hooks is None
    assert rec.grads == {} and g.shape == rec.outputs["0"].shape and attached(model) == []


def test_submodules_walks_like_modules_with_shared_modules_once_and_empty_slots_skipped() -> None:
    shared = nn.ReLU()
    inner = nn.Sequential(nn.Conv2d(1, 2, 3), shared)
    model = nn.Sequential(inner, nn.Sequential(shared, nn.Linear(2, 2)), nn.Identity())
    model.register_module("slot", None)  # a registered empty slot: no module
    model.add_module("again", inner)  # one module under two names
    assert [id(m) for m in submodules(model)] == [id(m) for m in model.modules()]
    assert len(submodules(model)) == 7  # model, inner, conv, relu, second block, linear, identity
