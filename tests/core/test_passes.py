"""The shared gradient pass records its layers uncopied unless an in-place op could overwrite them."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torchvis
from torchvis.core.hooks import has_in_place_modules
from torchvis.core.passes import gradient_pass


class Net(nn.Module):
    """conv1 -> ReLU -> conv2 -> batch-norm (+ the ReLU output) -> ReLU -> dropout -> GAP -> linear.

    ``kind`` says how the ReLUs and the sum run: ``"plain"`` out of place; ``"functional"`` in place on
    the previous op's output with ``F.relu(inplace=True)``, ``+=`` and ``relu_`` (invisible to a module
    walk); ``"modules"`` with ``nn.ReLU(inplace=True)`` modules. Every kind computes the same values.
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv1 = nn.Conv2d(2, 4, 3)
        self.relu = nn.ReLU(inplace=kind == "modules")
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)
        self.forwards = 0

    def forward(self, x: Tensor) -> Tensor:
        self.forwards += 1
        a = self.conv1(x)
        if self.kind == "functional":
            h = F.relu(a, inplace=True)
            y = self.bn(self.conv2(h))
            y += h
            y.relu_()
        else:
            h = self.relu(a)
            y = self.relu(self.bn(self.conv2(h)) + h)
        return self.fc(self.drop(y.mean(dim=(2, 3))))


def build(kind: str) -> Net:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Net(kind).double().eval()
        with torch.no_grad():
            model.bn.running_mean.uniform_(-0.5, 0.5)
            model.bn.running_var.uniform_(0.5, 2.0)
    return model


def reference(x: Tensor, layer: str, eval_mode: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Logits, input gradient, and the layer's output and gradient, from the out-of-place twin and a
    plain forward hook; with ``eval_mode=False`` the dropout draws from the global RNG as it is now."""
    model = build("plain")
    model.train(not eval_mode)  # batch-norm on the batch's statistics, as gradient_pass runs it then
    kept: list[Tensor] = []
    handle = getattr(model, layer).register_forward_hook(lambda m, i, out: kept.append(out))
    try:
        leaf = x.detach().clone().requires_grad_(True)
        logits = model(leaf)
    finally:
        handle.remove()
    score = logits.gather(1, logits.argmax(dim=1, keepdim=True)).sum()
    gx, ga = torch.autograd.grad(score, [leaf, kept[0]])
    return logits.detach(), gx, kept[0].detach(), ga


@pytest.mark.parametrize("eval_mode", [True, False])
@pytest.mark.parametrize("layer", ["conv1", "bn"])
@pytest.mark.parametrize("kind", ["plain", "functional", "modules"])
def test_pass_equals_the_out_of_place_reference_bit_for_bit(
    kind: str, layer: str, eval_mode: bool, randn: Callable[..., Tensor]
) -> None:
    model, x = build(kind).train(not eval_mode), randn(0, 3, 2, 7, 7)
    torch.manual_seed(7)  # the dropout masks (eval_mode=False) come from here, in both runs
    expected = reference(x, layer, eval_mode)
    torch.manual_seed(7)
    got = gradient_pass(model, x, layers=[layer], input_grad=True, eval_mode=eval_mode)
    # One forward, unless a functional in-place op overwrote the uncopied record: then one more, with
    # copies, from the same RNG state (the same dropout masks).
    assert model.forwards == (2 if kind == "functional" else 1)
    assert expected[2].min() < 0  # the ReLU after the layer changes these values when it acts on them
    names = ["logits", "input grad", "activation", "layer grad"]
    for name, want, have in zip(names, expected, (got.logits, got.input_grads[0], got.activations[layer],
                                                  got.grads[layer]), strict=True):
        torch.testing.assert_close(have, want, rtol=0, atol=0, msg=name)


def test_pass_without_in_place_ops_records_the_tensor_the_model_used(randn: Callable[..., Tensor]) -> None:
    model, x = build("plain"), randn(1, 2, 2, 7, 7)
    received: list[Tensor] = []
    handle = model.relu.register_forward_pre_hook(lambda m, args: received.append(args[0]))
    try:
        got = gradient_pass(model, x, layers=["conv1"], input_grad=True)
    finally:
        handle.remove()
    # No copy: the recorded output is the very tensor the ReLU after conv1 read.
    assert got.activations["conv1"].data_ptr() == received[0].data_ptr()
    assert model.forwards == 1


def test_a_model_that_changes_its_forward_arguments_runs_once() -> None:
    """A forward argument the model changes in place (a call counter) would be seen changed by a rerun:
    with extra arguments the layers are recorded with copies, one forward, the single-forward map."""

    class Counts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = build("functional")

        def forward(self, x: Tensor, calls: Tensor) -> Tensor:
            calls += 1
            return self.net(x) * calls

    model = Counts()
    x = torch.randn(2, 2, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    calls = torch.zeros((), dtype=torch.float64)
    got = torchvis.grad_cam(model, x, 0, layer="net.conv1", forward_args=(calls,), upsample=None)
    assert model.net.forwards == 1 and calls.item() == 1
    _, _, a, _ = reference(x, "conv1", eval_mode=True)
    plain = build("plain")
    kept: list[Tensor] = []
    handle = plain.conv1.register_forward_hook(lambda m, i, out: kept.append(out))
    (g,) = torch.autograd.grad(plain(x)[:, 0].sum(), [kept.pop()])  # calls == 1: the score is the logit
    handle.remove()
    expected = (g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1, keepdim=True).clamp_min(0)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_has_in_place_modules() -> None:
    assert has_in_place_modules(build("modules"))
    assert not has_in_place_modules(build("plain"))
    assert not has_in_place_modules(build("functional"))  # functional ops: seen after the forward
    assert has_in_place_modules(nn.Sequential(nn.Linear(2, 2), nn.Dropout(inplace=True)))


@pytest.mark.parametrize("kind", ["functional", "modules"])
def test_grad_cam_at_a_layer_overwritten_in_place(kind: str, randn: Callable[..., Tensor]) -> None:
    # Closed form of Grad-CAM on the reference's activation and gradient (Selvaraju et al. 2017).
    x = randn(2, 3, 2, 7, 7)
    _, _, a, g = reference(x, "conv1", eval_mode=True)
    expected = (g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1, keepdim=True).clamp_min(0)
    got = torchvis.grad_cam(build(kind), x, layer="conv1", upsample=None)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_a_rerun_in_eval_mode_keeps_other_threads_draws() -> None:
    """With other threads alive an eval-mode call leaves the global RNG alone (restoring it would
    rewind their draws); the rerun after an overwritten record must not rewind it either."""
    import threading

    model, x = build("functional"), torch.randn(2, 2, 6, 6, dtype=torch.float64)
    drawn = threading.Event()
    done = threading.Event()

    def draw() -> None:  # another thread's draw from the global RNG, during the first forward
        torch.rand(10)
        drawn.set()

    original = model.conv2.forward

    def conv2_that_lets_another_thread_draw(t: Tensor) -> Tensor:
        if not drawn.is_set():
            worker = threading.Thread(target=draw)
            worker.start()
            worker.join()
        return original(t)

    idle = threading.Thread(target=done.wait)  # keeps the process multi-threaded
    idle.start()
    try:
        model.conv2.forward = conv2_that_lets_another_thread_draw  # type: ignore[method-assign]
        before = torch.get_rng_state()
        gradient_pass(model, x, layers=["conv1"])
        assert model.forwards == 2  # the ReLU overwrote conv1's record: the forward ran again
        assert not torch.equal(torch.get_rng_state(), before)  # the other thread's draw stands
    finally:
        done.set()
        idle.join()


@pytest.mark.parametrize("plain_too", [True, False], ids=["with-the-plain-pass", "guided-alone"])
def test_guided_passes_refuse_torchscript_before_any_pass(plain_too: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvis.core.passes as passes

    ran: list[bool] = []
    real = passes.gradient_pass
    monkeypatch.setattr(passes, "gradient_pass", lambda *a, **k: ran.append(True) or real(*a, **k))
    scripted = torch.jit.script(build("plain"))
    with pytest.raises(TypeError, match="TorchScript"):
        passes.shared_passes(scripted, torch.randn(1, 2, 6, 6, dtype=torch.float64), input_grad=plain_too,
                             guided=True)
    assert ran == []  # not after the plain pass, nor by the guided pass itself


def test_a_guided_gradient_pass_refuses_torchscript_itself() -> None:
    with pytest.raises(TypeError, match="TorchScript"):
        gradient_pass(torch.jit.script(build("plain")), torch.randn(1, 2, 6, 6, dtype=torch.float64),
                      input_grad=True, guided=True)


def test_a_guided_call_walks_the_model_for_torchscript_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvis.core.passes as passes

    checked: list[bool] = []
    real = passes.check_guidable
    monkeypatch.setattr(passes, "check_guidable", lambda m: checked.append(True) or real(m))
    torchvis.guided_grad_cam(build("plain"), torch.randn(1, 2, 6, 6, dtype=torch.float64), layer="conv2")
    assert checked == [True]


def test_guided_grad_cam_names_itself_for_a_layer_without_spatial_dimensions() -> None:
    with pytest.raises(ValueError, match="guided Grad-CAM needs a layer"):
        torchvis.guided_grad_cam(build("plain"), torch.randn(1, 2, 6, 6, dtype=torch.float64), layer="fc")


@pytest.mark.parametrize("method", ["grad_cam", "layer_cam", "guided_grad_cam"])
def test_a_cam_on_features_without_spatial_dimensions_names_the_layer_not_the_upsampling(method: str) -> None:
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    with pytest.raises(ValueError, match="needs a layer whose output is a feature map"):
        getattr(torchvis, method)(model, torch.randn(2, 6, dtype=torch.float64), layer="1")


def test_guided_grad_cam_from_the_passes_refuses_upsample_none_itself() -> None:
    from torchvis.core.passes import shared_passes
    from torchvis.methods.cam import guided_grad_cam_from

    (shared,) = shared_passes(build("plain"), torch.randn(1, 2, 6, 6, dtype=torch.float64), layers=["conv2"],
                              guided=True)
    with pytest.raises(ValueError, match="upsample cannot be None"):
        guided_grad_cam_from(shared, upsample=None)
