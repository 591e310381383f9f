"""Threads: concurrent calls on one model give the sequential results; hooks act only in their own
thread; a training thread is never changed silently — its forward is refused while a call holds the
model in eval mode.

Interleavings are forced, not hoped for: a :class:`Rendezvous` module in the model makes every armed
thread wait, inside its first forward, until all of them are inside theirs — so every call's hooks
and mode changes are live while the other threads run the same modules.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchvis.core.lease import ConcurrentUseError
from torchvis.methods.cam import grad_cam, guided_grad_cam
from torchvis.methods.combine import explain
from torchvis.methods.gradient import guided_backprop, saliency
from torchvis.methods.perturbation import occlusion

THREADS = 4
ROUNDS = 40
TIMEOUT = 20.0


class Rendezvous(nn.Module):
    """Identity; in a thread that armed it, the first forward waits at ``barrier`` until all parties
    are inside theirs, then calls ``pause`` (if set)."""

    def __init__(self) -> None:
        super().__init__()
        self.barrier: threading.Barrier | None = None
        self.pause: Callable[[], None] | None = None
        self.local = threading.local()

    def arm(self) -> None:
        self.local.armed = True

    def forward(self, x: Tensor) -> Tensor:
        if getattr(self.local, "armed", False):
            self.local.armed = False
            if self.barrier is not None:
                self.barrier.wait(timeout=TIMEOUT)
            if self.pause is not None:
                self.pause()
        return x


def build() -> nn.Sequential:
    """conv -> BN -> ReLU -> rendezvous -> dropout -> conv -> ReLU -> GAP -> linear, float64, train
    mode, with non-trivial running statistics."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), Rendezvous(), nn.Dropout(0.5),
            nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
        ).double().train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(8, 3, 8, 8, dtype=torch.float64) * 2 + 1)
    model[1].eval()  # a module the user keeps in eval mode on purpose must stay so
    return model


def inputs(n: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=g) for _ in range(n)]


Call = Callable[[nn.Module, Tensor], Tensor]
CALLS: dict[str, Call] = {
    "saliency": lambda m, x: saliency(m, x),
    "guided_backprop": lambda m, x: guided_backprop(m, x),
    "grad_cam": lambda m, x: grad_cam(m, x, layer="2"),
    "grad_cam_auto": lambda m, x: grad_cam(m, x),
    "guided_grad_cam": lambda m, x: guided_grad_cam(m, x, layer="5"),
    "occlusion": lambda m, x: occlusion(m, x, window=3),
    "explain": lambda m, x: torch.cat([v.flatten() for v in explain(
        m, x, methods=["saliency", "grad_cam", "occlusion"], layer="5", window=4).values()]),
}


def state(model: nn.Module) -> tuple[dict[str, bool], dict[str, Tensor]]:
    return ({n: m.training for n, m in model.named_modules()},
            {n: b.clone() for n, b in model.named_buffers()})


def assert_state(model: nn.Module, before: tuple[dict[str, bool], dict[str, Tensor]]) -> None:
    modes, buffers = state(model)
    assert modes == before[0]
    for name, old in before[1].items():
        assert torch.equal(buffers[name], old), f"buffer {name} changed"
    hooked = [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == [] and not torch.nn.modules.module._global_forward_pre_hooks


def run_threads(work: list[Callable[[], Any]]) -> list[Any]:
    """Run each function in its own thread; returns results (or the exception raised) in order."""
    results: list[Any] = [None] * len(work)

    def runner(i: int) -> None:
        try:
            results[i] = work[i]()
        except BaseException as err:  # noqa: BLE001 - reported to the test
            results[i] = err

    threads = [threading.Thread(target=runner, args=(i,)) for i in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=4 * TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return results


@pytest.mark.filterwarnings("ignore:layer=None")
def test_concurrent_calls_give_the_sequential_results() -> None:
    model = build()
    rendezvous: Rendezvous = model[3]  # type: ignore[assignment]
    names = list(CALLS)
    xs = inputs(len(names))
    before = state(model)
    expected = {name: CALLS[name](model, x) for name, x in zip(names, xs, strict=True)}
    assert_state(model, before)
    for round_ in range(ROUNDS):
        chosen = [names[(round_ + k) % len(names)] for k in range(THREADS)]
        rendezvous.barrier = threading.Barrier(THREADS)

        def work(name: str) -> Callable[[], Tensor]:
            def call() -> Tensor:
                rendezvous.arm()
                return CALLS[name](model, xs[names.index(name)])
            return call

        results = run_threads([work(name) for name in chosen])
        for name, got in zip(chosen, results, strict=True):
            assert isinstance(got, Tensor), f"round {round_}, {name}: {got!r}"
            assert torch.equal(got, expected[name]), f"round {round_}: {name} differs from its sequential map"
        assert_state(model, before)


def test_concurrent_train_mode_calls_give_the_sequential_results() -> None:
    # eval_mode=False: dropout masks from the (forked) global RNG, BN on batch statistics; such calls
    # on one model run one at a time, so each sees the same RNG state as alone.
    model = build()
    xs = inputs(THREADS)
    before, rng = state(model), torch.get_rng_state()
    expected = [saliency(model, x, eval_mode=False) for x in xs]
    for _ in range(10):
        barrier = threading.Barrier(THREADS)

        def work(x: Tensor, barrier: threading.Barrier = barrier) -> Callable[[], Tensor]:
            def call() -> Tensor:
                barrier.wait(timeout=TIMEOUT)
                return saliency(model, x, eval_mode=False)
            return call

        for got, want in zip(run_threads([work(x) for x in xs]), expected, strict=True):
            assert isinstance(got, Tensor) and torch.equal(got, want)
    assert_state(model, before)
    assert torch.equal(torch.get_rng_state(), rng)


def test_hooks_do_not_act_on_another_threads_forward() -> None:
    # While one thread's grad_cam has its capture hook on "2", another thread runs the model plainly
    # (eval mode: nothing to refuse) and under inference_mode: both get the plain output.
    model = build().eval()
    rendezvous: Rendezvous = model[3]  # type: ignore[assignment]
    x, y = inputs(2)
    expected_map, expected_out = grad_cam(model, x, layer="2"), model(y)
    for _ in range(ROUNDS):
        rendezvous.barrier = threading.Barrier(2)

        def explaining() -> Tensor:
            rendezvous.arm()
            return grad_cam(model, x, layer="2")

        def predicting() -> Tensor:
            rendezvous.arm()
            with torch.inference_mode():
                return model(y)

        got_map, got_out = run_threads([explaining, predicting])
        assert isinstance(got_map, Tensor) and torch.equal(got_map, expected_map)
        assert isinstance(got_out, Tensor) and torch.equal(got_out, expected_out)


def train_steps(
    model: nn.Module, steps: int, before_step: Callable[[int], None] | None = None
) -> list[Tensor]:
    """Seeded SGD steps (dropout draws from a private RNG so that other threads cannot move it);
    returns the parameters after each completed step; stops at the first error, which it raises."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    history = []
    for step in range(steps):
        x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=g)
        y = torch.randint(0, 3, (4,), generator=g)
        if before_step is not None:
            before_step(step)
        optimizer.zero_grad()
        with torch.random.fork_rng():
            torch.manual_seed(step)
            F.cross_entropy(model(x), y).backward()
        optimizer.step()
        history.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())
    return history


def test_training_while_explaining_is_refused_never_silent() -> None:
    # Forced: the explaining thread is inside its forward (model in eval mode) when the training
    # thread runs a step: the step must raise, before any module ran.
    model, reference = build(), build()
    alone = train_steps(reference, 1)
    rendezvous: Rendezvous = model[3]  # type: ignore[assignment]
    x = inputs(1)[0]
    expected = saliency(model, x)
    for _ in range(10):
        inside, tried = threading.Event(), threading.Event()
        rendezvous.pause = lambda inside=inside, tried=tried: (inside.set(), tried.wait(timeout=TIMEOUT))
        before = state(model)

        def explaining() -> Tensor:
            rendezvous.arm()
            return saliency(model, x)

        def training(inside: threading.Event = inside, tried: threading.Event = tried) -> Any:
            inside.wait(timeout=TIMEOUT)
            try:
                return train_steps(model, 1)
            finally:
                tried.set()

        got, trained = run_threads([explaining, training])
        assert isinstance(got, Tensor) and torch.equal(got, expected)
        assert isinstance(trained, ConcurrentUseError), trained
        assert "Monitor(..., background=True)" in str(trained)
        assert_state(model, before)  # the refused step ran no module: statistics untouched
    # Refused, not half-done: training now, alone, gives what training alone gives.
    rendezvous.pause = None
    assert torch.equal(train_steps(model, 1)[0], alone[0])


def test_free_running_training_thread_is_identical_or_refused() -> None:
    # Unforced: a training loop and an explaining loop on one model; every step that completed
    # equals the same step trained alone, and a step that overlapped a call raised.
    reference = build()
    alone = train_steps(reference, 30)
    for _ in range(3):
        model, stop, x = build(), threading.Event(), inputs(1)[0]

        def explaining(model: nn.Module = model, stop: threading.Event = stop, x: Tensor = x) -> int:
            calls = 0
            while not stop.is_set():
                try:
                    saliency(model, x)
                except RuntimeError as err:  # an optimizer step changed the weights under the backward
                    assert "Training and explaining the same model concurrently" in str(err)
                calls += 1
                time.sleep(0.002)  # leave the training thread gaps to run in
            return calls

        def training(model: nn.Module = model, stop: threading.Event = stop) -> Any:
            try:
                return train_steps(model, 30)
            finally:
                stop.set()

        calls, trained = run_threads([explaining, training])
        assert isinstance(calls, int)
        if isinstance(trained, ConcurrentUseError):
            continue  # refused loudly
        assert isinstance(trained, list)
        for step, (got, want) in enumerate(zip(trained, alone, strict=True)):
            assert torch.equal(got, want), f"training step {step} changed silently"


def test_mode_change_in_another_thread_fails_the_call_and_stays() -> None:
    model = build().eval()
    rendezvous: Rendezvous = model[3]  # type: ignore[assignment]
    rendezvous.barrier = threading.Barrier(2)
    x = inputs(1)[0]

    switched = threading.Event()
    rendezvous.pause = lambda: (switched.wait(timeout=TIMEOUT), None)[1]  # until the switch is done

    def explaining() -> Tensor:
        rendezvous.arm()
        return saliency(model, x)

    def switching() -> None:
        rendezvous.barrier.wait(timeout=TIMEOUT)  # type: ignore[union-attr]
        model.train()
        switched.set()

    got, _ = run_threads([explaining, switching])
    assert isinstance(got, ConcurrentUseError) and "changed in another thread" in str(got)
    assert all(m.training for m in model.modules())  # the other thread's choice is kept


def test_nested_call_with_another_eval_mode_is_an_error() -> None:
    model = build()

    class Nested(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            saliency(model, x.detach(), eval_mode=False)
            return x

    model[3] = Nested()
    with pytest.raises(RuntimeError, match="same eval_mode"):
        saliency(model, inputs(1)[0])
    assert not torch.nn.modules.module._global_forward_pre_hooks


def test_a_lease_goes_with_its_model() -> None:
    import gc

    from torchvis.core import lease

    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()
    saliency(model, inputs(1)[0])
    key = id(model)
    assert key in lease._LEASES
    del model
    gc.collect()
    assert key not in lease._LEASES
