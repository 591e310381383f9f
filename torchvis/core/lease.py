"""Who runs torchvis on a model right now: one lease per model, so that threads never see each
other's mode changes.

A module's ``training`` flag is one attribute that every thread reads. Eval-mode calls on one model
share a *window*: the first call records every submodule's flag and switches the model to eval mode,
later calls (from any thread) join it and run in parallel, the last one restores the flags. While a
window that changed a flag is open, a forward of the model in a thread that holds no lease (a
training step, a plain prediction) raises :class:`ConcurrentUseError` at its first module — it would
otherwise run silently in eval mode. Calls with ``eval_mode=False`` open a window of the other kind,
which waits for an eval window to close and vice versa; on a model with train-mode modules they run
one at a time (they draw dropout masks from the shared global RNG). Every call checks on leaving that
no flag was changed behind its back (``model.train()`` in another thread) and raises if one was,
leaving that change in place.

Cost per call: one uncontended lock twice, one pass over the submodules' flags; a window that
switches modes also adds one global forward pre-hook, one cheap Python call per module forward in
the process, while it is open.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn
from torch.utils.hooks import RemovableHandle

from torchvis.core import hooks


class ConcurrentUseError(RuntimeError):
    """A model was run, or its modes changed, in one thread while torchvis explained it in another."""


REFUSED = (
    "torchvis is explaining this model in another thread with its modules switched to eval mode; "
    "this forward would run silently in eval mode. Training (or running) and explaining the same "
    "model concurrently is not supported: explain a copy of the model, or use "
    "Monitor(..., background=True), which explains a snapshot off the training thread"
)


@dataclass(eq=False)
class _Lease:
    cond: threading.Condition = field(default_factory=lambda: threading.Condition(threading.Lock()))
    eval_mode: bool | None = None  # the kind of the open window; None: no window
    exclusive: bool = False
    holders: Counter[int] = field(default_factory=Counter)  # thread id -> calls it has open
    modes: list[tuple[nn.Module, bool, bool]] = field(default_factory=list)  # module, before, inside
    training_inside: bool = False  # some module runs in train mode inside the window
    watch: RemovableHandle | None = None


# The one piece of global state besides the method registry: leases must be shared between threads.
# Keyed by id, with no reference to the model: an entry goes when its model does.
_LEASES: dict[int, _Lease] = {}
_REGISTRY = threading.Lock()


def _lease_of(model: nn.Module) -> _Lease:
    lease = _LEASES.get(id(model))
    if lease is None:
        with _REGISTRY:
            lease = _LEASES.get(id(model))
            if lease is None:
                lease = _LEASES[id(model)] = _Lease()
                weakref.finalize(model, _LEASES.pop, id(model), None)
    return lease


@contextmanager
def held(model: nn.Module, *, eval_mode: bool) -> Iterator[bool]:
    """Hold ``model`` for one call: in eval mode if ``eval_mode``, else in the user's own modes.

    Yields whether any submodule runs in train mode inside (then the call may draw from the RNG).
    Raises :class:`ConcurrentUseError` on leaving if another thread changed a module's flag meanwhile.
    """
    lease, me = _lease_of(model), threading.get_ident()
    with lease.cond:
        _enter(lease, model, eval_mode, me)
        training_inside = lease.training_inside
    try:
        yield training_inside
    finally:
        with lease.cond:
            changed = _leave(lease, me)
        if changed:
            raise ConcurrentUseError(
                f"the training flag of {changed} changed in another thread while torchvis explained the "
                "model (model.train() or .eval() during the call); the map would mix modes. "
                "Explain a copy, or use Monitor(..., background=True)"
            )


def _enter(lease: _Lease, model: nn.Module, eval_mode: bool, me: int) -> None:
    while True:
        if lease.holders[me]:  # a nested call in a thread that already holds the model
            if lease.eval_mode != eval_mode:
                raise RuntimeError("a torchvis call nested in another on the same model, in the same "
                                   "thread, must use the same eval_mode")
            break
        if lease.eval_mode is None:
            _open(lease, model, eval_mode)
            break
        if lease.eval_mode == eval_mode and not lease.exclusive:
            break
        lease.cond.wait()
    lease.holders[me] += 1


def _open(lease: _Lease, model: nn.Module, eval_mode: bool) -> None:
    before = [(module, module.training) for module in model.modules()]
    training = any(flag for _, flag in before)
    lease.eval_mode = eval_mode
    lease.exclusive = not eval_mode and training
    lease.training_inside = training
    # Skipped when every module is already in eval mode: setting a module attribute costs
    # microseconds, which add up per call on large models and small inputs.
    if not (eval_mode and training):
        lease.modes = [(module, flag, flag) for module, flag in before]
        if lease.exclusive:
            _watch(lease, before)
        return
    model.eval()
    lease.modes = [(module, flag, module.training) for module, flag in before]
    lease.training_inside = any(inside for _, _, inside in lease.modes)  # a custom train() may keep some
    _watch(lease, before)


def _watch(lease: _Lease, before: list[tuple[nn.Module, bool]]) -> None:
    """Refuse forwards of the model's modules by threads that hold no call of the window."""
    ids = frozenset(id(module) for module, _ in before)
    holders = lease.holders
    lease.watch = hooks.refuse_forwards(ids, lambda: threading.get_ident() in holders, REFUSED)


def _leave(lease: _Lease, me: int) -> str:
    """Release one call; the last one restores the flags. Returns the modules whose flag someone
    else changed (as a phrase), or ``""``."""
    lease.holders[me] -= 1
    if not lease.holders[me]:
        del lease.holders[me]
    changed = [module for module, _, inside in lease.modes if module.training != inside]
    if not lease.holders:
        for module, before, inside in lease.modes:
            if before != inside and module.training == inside:  # a flag someone else set stays
                module.training = before
        if lease.watch is not None:
            lease.watch.remove()
        lease.eval_mode, lease.exclusive, lease.modes, lease.watch = None, False, [], None
        lease.training_inside = False
        lease.cond.notify_all()
    if not changed:
        return ""
    names = ", ".join(type(module).__name__ for module in changed[:3])
    return f"{len(changed)} module(s) ({names}{', ...' if len(changed) > 3 else ''})"
