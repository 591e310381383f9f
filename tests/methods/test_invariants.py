"""Hygiene of every registered method (and explain): the model, its gradients, the input and the global
RNG are as before the call — also when the model raises — and attribution runs in eval mode."""

from __future__ import annotations

import copy
from typing import Any

import conftest
import pytest
import torch
import torch.nn.modules.module as module_globals
from torch import Tensor, nn

import torchvis
from torchvis.core import hooks
from torchvis.methods import METHODS, SPECS, Need, explain
from torchvis.methods.perturbation import occlusion
from torchvis.methods.score import score_cam

# Methods that run forward passes only, so they also work under torch.inference_mode().
GRADIENT_FREE = {name for name, spec in SPECS.items() if Need.PERTURBATION in spec.needs}
CALLS = [*METHODS, "explain"]


class Boom(Exception):
    pass


class Fuse(nn.Module):
    """Identity that raises :class:`Boom` on its ``fail_at``-th call."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_at: int | None = None
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise Boom(f"call {self.calls}")
        return x


class HygieneNet(nn.Module):
    """conv -> batch-norm -> in-place ReLU -> dropout -> conv -> ReLU -> fuse -> GAP -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fuse = Fuse()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.relu1(self.bn1(self.conv1(x))))
        return self.head(self.fuse(self.relu2(self.conv2(x))))


class FunctionalHygieneNet(HygieneNet):
    """HygieneNet with its first ReLU a functional in-place one: no module says ``inplace``, so the
    shared pass records "bn1" uncopied, sees the ReLU overwrite it and runs the forward again."""

    def __init__(self) -> None:
        super().__init__()
        self.relu1 = nn.ReLU()  # unused and not in place: no module says inplace, so records go uncopied

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(torch.nn.functional.relu(self.bn1(self.conv1(x)), inplace=True))
        return self.head(self.fuse(self.relu2(self.conv2(x))))


def options_for(name: str) -> dict[str, Any]:
    """What the registered method needs on HygieneNet; "bn1" is followed by an in-place ReLU."""
    return conftest.options_for(name, layer="bn1")


def run(name: str, model: nn.Module, x: Tensor, **kwargs: Any) -> dict[str, Tensor]:
    """Call one registered method (or explain with all of them) as a user would."""
    if name == "explain":
        options = {k: v for n in METHODS for k, v in options_for(n).items() if k != "layer"}
        return explain(model, x, methods=list(METHODS), layer="bn1", **options, **kwargs)
    return {name: METHODS[name](model, x, **options_for(name), **kwargs)}


def used_model(mode: str, build: type[HygieneNet] = HygieneNet) -> HygieneNet:
    """A HygieneNet with real gradients on its parameters (one left None), non-trivial batch-norm
    statistics, and the given mix of training flags."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build().double().train()
        for _ in range(3):
            x = torch.randn(4, 3, 6, 6, dtype=torch.float64) * 2 + 1
            model(x).logsumexp(dim=1).sum().backward()
    model.head[2].bias.grad = None
    model.fuse.calls = 0
    if mode == "mixed":
        model.bn1.eval()
        model.head.eval()
    elif mode == "eval-but-dropout":
        model.eval()
        model.drop.train()
    return model


def user_input(kind: str) -> Tensor:
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if kind == "leaf-with-grad":
        x.requires_grad_(True)
        x.grad = torch.full_like(x, 0.25)
    return x


def snapshot(model: nn.Module, x: Tensor) -> dict[str, Any]:
    def clone(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().clone()

    return {
        "training": {name: m.training for name, m in model.named_modules()},
        "params": {name: clone(p) for name, p in model.named_parameters()},
        "grads": {name: clone(p.grad) for name, p in model.named_parameters()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "buffers": {name: clone(b) for name, b in model.named_buffers()},
        "x": (clone(x), x.requires_grad, clone(x.grad), x._version),
        "rng": torch.get_rng_state(),
        # _global_forward_hooks, _global_backward_hooks, ... (torch.nn.modules.module)
        "global_hooks": {
            name: dict(value) for name, value in vars(module_globals).items()
            if name.startswith("_global_") and isinstance(value, dict)
        },
    }


def assert_same_tensors(before: dict[str, Tensor | None], after: dict[str, Tensor | None], what: str) -> None:
    assert before.keys() == after.keys()
    for name, old in before.items():
        new = after[name]
        if old is None or new is None:
            assert old is None and new is None, f"{what} {name}: None changed"
        else:
            assert torch.equal(old, new), f"{what} {name} changed"


def assert_untouched(model: nn.Module, x: Tensor, before: dict[str, Any]) -> None:
    after = snapshot(model, x)
    hooked = [
        name
        for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
    ]
    assert hooked == [], f"hooks left on {hooked}"
    assert after["global_hooks"] == before["global_hooks"]
    assert torch._C._len_torch_function_stack() == 0, "a torch function mode was left active"
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert_same_tensors(before["params"], after["params"], "parameter")
    assert_same_tensors(before["grads"], after["grads"], ".grad of")
    x_old, x_new = before["x"], after["x"]
    assert torch.equal(x_old[0], x_new[0]) and x_old[1] == x_new[1] and x_old[3] == x_new[3]
    assert_same_tensors({"x": x_old[2]}, {"x": x_new[2]}, "x.grad")
    assert torch.equal(after["rng"], before["rng"]), "the global RNG moved"


@pytest.mark.parametrize("x_kind", ["plain", "leaf-with-grad"])
@pytest.mark.parametrize("mode", ["train", "mixed", "eval-but-dropout"])
@pytest.mark.parametrize("outcome", ["normal", "raise-in-1st-forward", "raise-in-2nd-forward"])
@pytest.mark.parametrize("name", CALLS)
def test_call_leaves_everything_as_it_was(name: str, outcome: str, mode: str, x_kind: str) -> None:
    check_call(name, outcome, used_model(mode), user_input(x_kind))


@pytest.mark.parametrize("outcome", ["normal", "raise-in-1st-forward", "raise-in-2nd-forward"])
@pytest.mark.parametrize("name", CALLS)
def test_call_that_runs_the_forward_again_leaves_everything_as_it_was(name: str, outcome: str) -> None:
    # The layer methods at "bn1" run the forward twice here; "raise-in-2nd-forward" raises in the rerun.
    assert not hooks.has_in_place_modules(FunctionalHygieneNet())  # else the pass would copy up front
    model = used_model("train", FunctionalHygieneNet)
    check_call(name, outcome, model, user_input("leaf-with-grad"))
    if outcome == "normal" and name in SPECS and SPECS[name].needs == {Need.LAYER_GRADIENT}:
        assert model.fuse.calls == 2, "the CAM's one pass must have run its forward again"


def check_call(name: str, outcome: str, model: HygieneNet, x: Tensor) -> None:
    eval_twin = copy.deepcopy(model).eval()
    before = snapshot(model, x)
    assert any(g is not None for g in before["grads"].values())
    assert any(m.training for m in model.modules())
    if outcome == "raise-in-1st-forward":
        model.fuse.fail_at = 1
        with pytest.raises(Boom):
            run(name, model, x)
        result = None
    elif outcome == "raise-in-2nd-forward":
        # Raises only for calls that run the model twice: a second pass (guided Grad-CAM, occlusion,
        # explain, ...) or a rerun of the first (the layer methods on FunctionalHygieneNet).
        model.fuse.fail_at = 2
        try:
            result = run(name, model, x)
        except Boom:
            result = None
    else:
        result = run(name, model, x)
    assert_untouched(model, x, before)
    # The batch-norm's running statistics (buffers) were used, not updated.
    assert_same_tensors(before["buffers"], snapshot(model, x)["buffers"], "buffer")
    if result is not None:
        # Eval mode: dropout off and batch-norm on running statistics, exactly as in an eval-mode copy.
        expected = run(name, eval_twin, x.detach())
        assert result.keys() == expected.keys()
        for key in result:
            torch.testing.assert_close(result[key], expected[key], rtol=1e-12, atol=1e-12, msg=key)
            assert not result[key].requires_grad


@pytest.mark.parametrize("build", [HygieneNet, FunctionalHygieneNet])
@pytest.mark.parametrize("name", CALLS)
def test_train_mode_attribution_does_not_move_the_global_rng(name: str, build: type[HygieneNet]) -> None:
    # eval_mode=False keeps dropout active: its masks come from a forked RNG.
    model, x = used_model("train", build), user_input("leaf-with-grad")
    before = snapshot(model, x)
    first = run(name, model, x, eval_mode=False)
    assert_untouched(model, x, before)
    assert_same_tensors(first, run(name, model, x, eval_mode=False), "map")  # type: ignore[arg-type]
    # The masks do come from the global RNG's state: another seed, other masks, another map.
    with torch.random.fork_rng():
        torch.manual_seed(12345)
        reseeded = run(name, model, x, eval_mode=False)
    assert any(not torch.equal(first[k], reseeded[k]) for k in first)


@pytest.mark.parametrize("name", CALLS)
def test_works_under_no_grad_and_inference_mode_as_documented(name: str) -> None:
    model, x = used_model("train"), user_input("plain")
    expected = run(name, model, x)
    with torch.no_grad():
        under_no_grad = run(name, model, x)
    for key in expected:
        torch.testing.assert_close(under_no_grad[key], expected[key], rtol=0, atol=0)
    before = snapshot(model, x)
    gradient_free = name in GRADIENT_FREE
    with torch.inference_mode():
        if gradient_free:
            under_inference = run(name, model, x)
        else:
            with pytest.raises(RuntimeError, match=r"inference_mode\(\)"):
                run(name, model, x)
    assert_untouched(model, x, before)
    if gradient_free:
        for key in expected:
            torch.testing.assert_close(under_inference[key], expected[key], rtol=0, atol=0)


class RectifiesInput(HygieneNet):
    """HygieneNet on relu(x), computed in place on the caller's tensor or not."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(torch.relu_(x) if self.inplace else torch.relu(x))


@pytest.mark.parametrize("name", CALLS)
def test_model_that_changes_its_input_in_place(name: str) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = RectifiesInput(inplace=True).double().eval()
    twin = RectifiesInput(inplace=False).double().eval()
    twin.load_state_dict(model.state_dict())
    x = user_input("plain")
    before = snapshot(model, x)
    got = run(name, model, x)
    assert_untouched(model, x, before)
    expected = run(name, twin, x)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


# --- a Conv1d model with the layer methods: N-d maps, tuple outputs, layer inputs, bad layers ----------

LAYER_CALLS = [name for name, spec in SPECS.items() if spec.takes_layer] + ["explain"]


class Pair(nn.Module):
    """Returns its input and its negation: a tuple output."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, -x


class SignalHygieneNet(nn.Module):
    """conv1d -> batch-norm -> in-place ReLU -> dropout -> pair[0] -> conv1d -> ReLU -> fuse -> GAP ->
    linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(4)
        self.relu1 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.5)
        self.pair = Pair()
        self.conv2 = nn.Conv1d(4, 4, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fuse = Fuse()
        self.head = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x: Tensor) -> Tensor:
        x = self.pair(self.drop(self.relu1(self.bn1(self.conv1(x)))))[0]
        return self.head(self.fuse(self.relu2(self.conv2(x))))


def used_signal_model() -> SignalHygieneNet:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SignalHygieneNet().double().train()
        for _ in range(3):
            model(torch.randn(4, 2, 9, dtype=torch.float64) * 2 + 1).logsumexp(dim=1).sum().backward()
    model.fuse.calls = 0
    return model


SIGNAL_CASES: dict[str, tuple[dict[str, Any], type[Exception] | None, str]] = {
    "conv": ({"layer": "relu2"}, None, ""),
    "tuple-element": ({"layer": "pair[0]"}, None, ""),
    "layer-input": ({"layer": ("conv2", 0), "layer_input": True}, None, ""),
    "raise-in-forward": ({"layer": "relu2"}, Boom, "call 1"),
    "no-spatial-dims": ({"layer": "head.2"}, ValueError, r"got shape \[2, 3\] from layer 'head.2'"),
    "tuple-without-index": ({"layer": "pair"}, ValueError, r"'pair' returned a tuple of 2"),
    "index-out-of-range": ({"layer": "pair[2]"}, ValueError, "index 2 is out of range"),
    "reshape-wrong-rank": ({"layer": "relu2", "reshape": lambda t: t.flatten(1)}, ValueError,
                           r"gave shape \[2, 28\]; it must give"),
}


@pytest.mark.parametrize("case", list(SIGNAL_CASES))
@pytest.mark.parametrize("name", LAYER_CALLS)
def test_signal_model_layer_methods_leave_everything_as_it_was(name: str, case: str) -> None:
    options, error, message = SIGNAL_CASES[case]
    model = used_signal_model()
    x = torch.randn(2, 2, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    before = snapshot(model, x)
    if error is Boom:
        model.fuse.fail_at = 1
    call = (lambda: explain(model, x, methods=LAYER_CALLS[:-1], **options)) if name == "explain" else (
        lambda: METHODS[name](model, x, **options))
    if error is None:
        result = call()
        maps = result.values() if isinstance(result, dict) else [result]
        assert all(m.shape[-1] == 7 and m.dim() == 3 for m in maps)
    else:
        with pytest.raises(error, match=message):
            call()
    assert_untouched(model, x, before)
    assert_same_tensors(before["buffers"], snapshot(model, x)["buffers"], "buffer")


# --- other input kinds: tabular, signal, two inputs with forward_args, a plain function ------------


class KindNet(nn.Module):
    """A tabular [B,6] or signal [B,2,10] network with batch-norm, in-place ReLU, dropout and a fuse;
    with ``meta``, an image [B,3,6,6] + metadata [B,4] network gated by a per-example ``mask``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "tabular":
            self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(inplace=True),
                                      nn.Dropout(0.5))
        elif kind == "signal":
            self.body = nn.Sequential(nn.Conv1d(2, 8, 3), nn.BatchNorm1d(8), nn.ReLU(inplace=True),
                                      nn.Dropout(0.5), nn.AdaptiveAvgPool1d(1), nn.Flatten())
        else:
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                                      nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.meta = nn.Linear(4, 4)
        self.fuse = Fuse()
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor, meta: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        features = self.body(x)
        if meta is not None:
            assert mask is not None
            features = torch.cat([features, torch.relu(self.meta(meta * mask))], dim=1)
        return self.head(self.fuse(features))


KIND_SHAPES = {"tabular": (6,), "signal": (2, 10), "two-input": (3, 6, 6)}


def kind_case(kind: str, mode: str) -> tuple[nn.Module, tuple[Tensor, ...], dict[str, Any]]:
    """A used KindNet (gradients on its parameters, trained batch-norm statistics) in ``mode``, the
    user's inputs (the first a leaf with a .grad), and the extra arguments to pass."""
    net = "two-input" if kind == "function" else kind
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = KindNet(net).double().train()
        x = torch.randn(2, *KIND_SHAPES[net], dtype=torch.float64)
        meta, mask = torch.randn(2, 4, dtype=torch.float64), (torch.rand(2, 4) > 0.3).double()
        for _ in range(2):
            model(torch.randn_like(x).repeat(2, *[1] * (x.dim() - 1)),
                  *((meta.repeat(2, 1), mask.repeat(2, 1)) if net == "two-input" else ())).sum().backward()
    model.fuse.calls = 0
    if mode == "eval-but-dropout" or kind == "function":  # a plain function runs the modes it finds
        model.eval()
        model.body[3].train()
    x.requires_grad_(True)
    x.grad = torch.full_like(x, 0.25)
    if net == "two-input":
        return model, (x, meta), {"forward_args": (mask,)}
    return model, (x,), {}


def kind_methods(kind: str) -> list[str]:
    """Every method that takes these inputs: the CAMs only where the first input is an image, the
    hook methods not on a plain function."""
    names = list(CALLS)
    if kind == "function":
        return [n for n in names if n == "explain" or not SPECS[n].needs_hooks]
    if kind != "two-input":
        return [n for n in names if n == "explain" or not SPECS[n].takes_layer]
    return names


def run_kind(name: str, model: Any, x: Any, extra: dict[str, Any], kind: str) -> dict[str, Any]:
    if name == "explain":
        methods = [n for n in kind_methods(kind) if n != "explain"]
        options = {k: v for n in methods for k, v in options_for(n).items() if k != "layer"}
        layer = "body.2" if any(SPECS[n].takes_layer for n in methods) else None
        return explain(model, x, methods=methods, layer=layer, **options, **extra)
    options = {**options_for(name), **({"layer": "body.2"} if SPECS[name].takes_layer else {})}
    return {name: METHODS[name](model, x, **options, **extra)}


def tensors_of(result: dict[str, Any]) -> dict[str, Tensor]:
    flat: dict[str, Tensor] = {}
    for key, value in result.items():
        for i, t in enumerate(value if isinstance(value, tuple) else (value,)):
            flat[f"{key}[{i}]"] = t
    return flat


KIND_CASES = [(kind, name) for kind in ("tabular", "signal", "two-input", "function")
              for name in kind_methods(kind)]


@pytest.mark.parametrize("outcome", ["normal", "raise-in-1st-forward", "raise-in-2nd-forward"])
@pytest.mark.parametrize("kind, name", KIND_CASES, ids=[f"{k}-{n}" for k, n in KIND_CASES])
def test_every_input_kind_leaves_everything_as_it_was(kind: str, name: str, outcome: str) -> None:
    model, xs, extra = kind_case(kind, "train")
    eval_twin = copy.deepcopy(model).eval()
    if kind == "function":
        eval_twin.body[3].train()
    called: Any = (lambda *args, **kw: model(*args, **kw)) if kind == "function" else model
    twin: Any = (lambda *args, **kw: eval_twin(*args, **kw)) if kind == "function" else eval_twin
    x = xs if len(xs) > 1 else xs[0]
    befores = [snapshot(model, t) for t in xs]
    mask_before = [a.clone() for a in extra.get("forward_args", ())]
    model.fuse.fail_at = {"normal": None, "raise-in-1st-forward": 1, "raise-in-2nd-forward": 2}[outcome]
    result = None
    try:
        result = run_kind(name, called, x, extra, kind)
    except Boom:
        assert outcome != "normal"
    if outcome == "raise-in-1st-forward":
        assert result is None
    for t, before in zip(xs, befores, strict=True):
        assert_untouched(model, t, before)
        assert_same_tensors(before["buffers"], snapshot(model, t)["buffers"], "buffer")
    for old, new in zip(mask_before, extra.get("forward_args", ()), strict=True):
        assert torch.equal(old, new) and new._version == 0
    if result is not None and kind != "function":  # a plain function keeps its dropout on: masks differ
        expected = tensors_of(run_kind(name, twin, tuple(t.detach() for t in xs) if len(xs) > 1
                                       else xs[0].detach(), extra, kind))
        got = tensors_of(result)
        assert got.keys() == expected.keys()
        for key in got:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-12, atol=1e-12, msg=key)
            assert not got[key].requires_grad


# --- occlusion, Score-CAM, deletion/insertion and the sanity check on other inputs ------------------


class TabularHygiene(nn.Module):
    """features [B,6] times a per-example ``scale`` -> linear -> batch-norm -> ReLU -> dropout -> fuse
    -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)
        self.drop = nn.Dropout(0.5)
        self.fuse = Fuse()
        self.lin2 = nn.Linear(5, 3)

    def forward(self, x: Tensor, scale: Tensor) -> Tensor:
        return self.lin2(self.fuse(self.drop(torch.relu(self.bn(self.lin1(x * scale))))))


class TwoInputHygiene(nn.Module):
    """An image [B,3,6,6] (conv -> batch-norm -> in-place ReLU -> dropout -> fuse -> GAP) and metadata
    [B,4] (linear), scaled by a per-example ``gain``, plus a shared keyword ``bias``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.5)
        self.fuse = Fuse()
        self.meta = nn.Linear(4, 4)
        self.head = nn.Linear(8, 3)

    def forward(self, image: Tensor, meta: Tensor, gain: Tensor, *, bias: Tensor) -> Tensor:
        seen = self.fuse(self.drop(self.relu(self.bn(self.conv(image))))).mean(dim=(2, 3)) * gain[:, None]
        return self.head(torch.cat([seen, self.meta(meta)], dim=1)) + bias


def used_kind(kind: str, mode: str) -> nn.Module:
    """A model with gradients on its parameters (one None), used batch-norm statistics, given modes."""
    g = torch.Generator().manual_seed(3)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = (TabularHygiene() if kind == "tabular" else TwoInputHygiene()).double().train()
        for _ in range(3):
            args = kind_inputs(kind, g, batch=4)
            model(*args[0], *args[1], **args[2]).logsumexp(dim=1).sum().backward()
    next(p for p in reversed(list(model.parameters()))).grad = None
    model.fuse.calls = 0  # type: ignore[union-attr]
    if mode == "mixed":
        model.bn.eval()  # type: ignore[union-attr]
    return model


Call = tuple[tuple[Tensor, ...], tuple[Tensor, ...], dict[str, Tensor]]


def kind_inputs(kind: str, g: torch.Generator, batch: int = 2) -> Call:
    """(attributed inputs, forward_args, forward_kwargs) of a model kind, float64."""
    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, dtype=torch.float64, generator=g)

    if kind == "tabular":
        return (randn(batch, 6),), (randn(batch, 6).exp(),), {}
    return (randn(batch, 3, 6, 6), randn(batch, 4)), (randn(batch).exp(),), {"bias": randn(1, 3)}


KIND_CALLS = ["occlusion", "score_cam", "deletion", "insertion", "deletion_insertion", "sanity_check"]
# Score-CAM needs a spatial layer, which the features model has not.
CALL_KINDS = [(call, kind) for call in KIND_CALLS for kind in ("tabular", "two-inputs")
              if (call, kind) != ("score_cam", "tabular")]


def run_other(call: str, kind: str, model: nn.Module, x: tuple[Tensor, ...], args: tuple[Tensor, ...],
             kwargs: dict[str, Tensor], maps: Any) -> Any:
    """One call on a tabular model (one input) or a two-input model (a tuple), with forward arguments."""
    single = kind == "tabular"
    xs: Any = x[0] if single else x
    extra: dict[str, Any] = {"forward_args": args, "forward_kwargs": kwargs}
    if call == "occlusion":
        return occlusion(model, xs, 1, window=2 if single else (2, 2), batch_size=3, **extra)
    if call == "score_cam":
        return score_cam(model, xs, 1, layer="bn", batch_size=3, **extra)
    if call == "deletion":
        return torchvis.deletion(model, xs, maps, 1, pixels_per_step=5, batch_size=3, return_curves=True,
                                 **extra).scores
    if call == "insertion":
        start: Any = 0.25 if single else ("blur", 0.0)
        return torchvis.insertion(model, xs, maps, None, pixels_per_step=5, start=start, batch_size=3,
                                  return_curves=True, **extra).scores
    if call == "deletion_insertion":
        both = torchvis.deletion_insertion(model, xs, maps, 1, pixels_per_step=5, baseline=0.5,
                                     start=0.25 if single else ("blur", 0.0), batch_size=3,
                                     return_curves=True, **extra)
        return torch.cat([both["deletion"].scores, both["insertion"].scores])
    result = torchvis.sanity_check(model, xs, ["saliency", "occlusion"], 1, window=2 if single else (2, 2),
                                   **extra)
    return torch.tensor([[row.spearman_abs, row.spearman] for row in result.rows], dtype=torch.float64)


def tensor_state(tensors: tuple[Tensor, ...]) -> list[tuple[Tensor, bool, Tensor | None, int]]:
    return [(t.detach().clone(), t.requires_grad, None if t.grad is None else t.grad.clone(), t._version)
            for t in tensors]


@pytest.mark.parametrize("x_kind", ["plain", "leaf-with-grad"])
@pytest.mark.parametrize("mode", ["train", "mixed"])
@pytest.mark.parametrize("outcome", ["normal", "raise-in-1st-forward", "raise-in-2nd-forward"])
@pytest.mark.parametrize("call, kind", CALL_KINDS)
def test_other_inputs_leave_everything_as_it_was(call: str, kind: str, outcome: str, mode: str,
                                                 x_kind: str) -> None:
    model = used_kind(kind, mode)
    eval_twin = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(11)
    x, args, kwargs = kind_inputs(kind, g)
    maps = tuple(torch.randn(t.shape, dtype=torch.float64, generator=g) for t in x)
    maps_arg: Any = maps[0] if kind == "tabular" else maps
    if x_kind == "leaf-with-grad":
        for t in x:
            t.requires_grad_(True)
            t.grad = torch.full_like(t, 0.25)
    before = snapshot(model, x[0])
    before_inputs = tensor_state(x + args + tuple(kwargs.values()))
    fuse: Fuse = model.fuse  # type: ignore[assignment]
    if outcome == "raise-in-1st-forward":
        fuse.fail_at = 1
        with pytest.raises(Boom):
            run_other(call, kind, model, x, args, kwargs, maps_arg)
        result = None
    elif outcome == "raise-in-2nd-forward":
        fuse.fail_at = 2
        with pytest.raises(Boom):  # every call here runs the model (or its copy) more than once
            run_other(call, kind, model, x, args, kwargs, maps_arg)
        result = None
    else:
        result = run_other(call, kind, model, x, args, kwargs, maps_arg)
    fuse.fail_at = None
    assert_untouched(model, x[0], before)
    assert_same_tensors(before["buffers"], snapshot(model, x[0])["buffers"], "buffer")
    after_inputs = tensor_state(x + args + tuple(kwargs.values()))
    for (v0, r0, g0, n0), (v1, r1, g1, n1) in zip(before_inputs, after_inputs, strict=True):
        assert torch.equal(v0, v1) and r0 == r1 and n0 == n1, "an input or forward argument changed"
        assert (g0 is None and g1 is None) or (g0 is not None and g1 is not None and torch.equal(g0, g1))
    if result is not None:
        plain = tuple(t.detach() for t in x)
        expected = run_other(call, kind, eval_twin, plain, args, kwargs, maps_arg)
        for got, want in zip(result if isinstance(result, tuple) else (result,),
                             expected if isinstance(expected, tuple) else (expected,), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
            assert not got.requires_grad


class RectifiesFeatures(TabularHygiene):
    """TabularHygiene on relu(x), computed in place on the caller's tensor or not."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: Tensor, scale: Tensor) -> Tensor:
        return super().forward(torch.relu_(x) if self.inplace else torch.relu(x), scale)


@pytest.mark.parametrize("call", ["occlusion", "deletion", "insertion", "deletion_insertion", "sanity_check"])
def test_a_features_model_that_changes_its_input_in_place(call: str) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = RectifiesFeatures(inplace=True).double().eval()
    twin = RectifiesFeatures(inplace=False).double().eval()
    twin.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(5)
    x, args, kwargs = kind_inputs("tabular", g)
    maps = torch.randn(x[0].shape, dtype=torch.float64, generator=g)
    before = snapshot(model, x[0])
    got = run_other(call, "tabular", model, x, args, kwargs, maps)
    assert_untouched(model, x[0], before)
    torch.testing.assert_close(got, run_other(call, "tabular", twin, x, args, kwargs, maps), rtol=0, atol=0,
                               equal_nan=True)
