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
    lock: threading.Lock = field(default_factory=threading.Lock)
    cond: threading.Condition = field(init=False)  # on ``lock``: a call waiting for the other kind of window
    waiting: int = 0  # calls in cond.wait(): leaving notifies only when there are some
    eval_mode: bool | None = None  # the kind of the open window; None: no window
    exclusive: bool = False
    holders: dict[int, int] = field(default_factory=dict)  # thread id -> calls it has open
    modules: list[nn.Module] = field(default_factory=list)  # every submodule, as the window found them
    before: list[bool] = field(default_factory=list)  # their training flags before the window
    inside: list[bool] = field(default_factory=list)  # and inside it
    training_inside: bool = False  # some module runs in train mode inside the window
    watch: RemovableHandle | None = None

    def __post_init__(self) -> None:
        self.cond = threading.Condition(self.lock)


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


class held:  # noqa: N801  (used as a function: ``with held(model, eval_mode=True) as training_inside``)
    """Hold ``model`` for one call: in eval mode if ``eval_mode``, else in the user's own modes.

    Entering gives whether any submodule runs in train mode inside (then the call may draw from the
    RNG). Raises :class:`ConcurrentUseError` on leaving if another thread changed a module's flag
    meanwhile. A class rather than a generator: it runs on every call, and a generator-based context
    manager costs a few microseconds more.
    """

    __slots__ = ("_lease", "_me", "_model", "_eval_mode")

    def __init__(self, model: nn.Module, *, eval_mode: bool) -> None:
        self._model, self._eval_mode = model, eval_mode
        self._lease, self._me = _lease_of(model), threading.get_ident()

    def __enter__(self) -> bool:
        lease = self._lease
        with lease.lock:  # the lock itself: Condition.__enter__ is one more Python call
            _enter(lease, self._model, self._eval_mode, self._me)
            return lease.training_inside

    def __exit__(self, *exc: object) -> None:
        with self._lease.lock:
            changed = _leave(self._lease, self._me)
        if changed:
            raise ConcurrentUseError(
                f"the training flag of {changed} changed in another thread while torchvis explained the "
                "model (model.train() or .eval() during the call); the map would mix modes. "
                "Explain a copy, or use Monitor(..., background=True)"
            )


def _enter(lease: _Lease, model: nn.Module, eval_mode: bool, me: int) -> None:
    while True:
        if me in lease.holders:  # a nested call in a thread that already holds the model
            if lease.eval_mode != eval_mode:
                raise RuntimeError("a torchvis call nested in another on the same model, in the same "
                                   "thread, must use the same eval_mode")
            break
        if lease.eval_mode is None:
            _open(lease, model, eval_mode)
            break
        if lease.eval_mode == eval_mode and not lease.exclusive:
            break
        lease.waiting += 1
        try:
            lease.cond.wait()
        finally:
            lease.waiting -= 1
    lease.holders[me] = lease.holders.get(me, 0) + 1


def _open(lease: _Lease, model: nn.Module, eval_mode: bool) -> None:
    modules = hooks.submodules(model)
    before = [module.training for module in modules]
    training = True in before
    lease.eval_mode = eval_mode
    lease.exclusive = not eval_mode and training
    lease.training_inside = training
    lease.modules, lease.before = modules, before
    # Skipped when every module is already in eval mode: setting a module attribute costs
    # microseconds, which add up per call on large models and small inputs.
    if not (eval_mode and training):
        lease.inside = before
        if lease.exclusive:
            _watch(lease)
        return
    model.eval()
    lease.inside = [module.training for module in modules]
    lease.training_inside = True in lease.inside  # a custom train() may keep some in train mode
    _watch(lease)


def _watch(lease: _Lease) -> None:
    """Refuse forwards of the model's modules by threads that hold no call of the window."""
    ids = frozenset(id(module) for module in lease.modules)
    holders = lease.holders
    lease.watch = hooks.refuse_forwards(ids, lambda: threading.get_ident() in holders, REFUSED)


def _leave(lease: _Lease, me: int) -> str:
    """Release one call; the last one restores the flags. Returns the modules whose flag someone
    else changed (as a phrase), or ``""``."""
    if lease.holders[me] == 1:
        del lease.holders[me]
    else:
        lease.holders[me] -= 1
    now = [module.training for module in lease.modules]
    switched = lease.inside is not lease.before  # the window changed some flags, to be restored
    # Per module: before the window, inside it, now. Built only when something is to compare or restore.
    flags = list(zip(lease.modules, lease.before, lease.inside, now, strict=True)) \
        if switched or now != lease.inside else []
    changed = [module for module, _, inside, flag in flags if flag != inside]
    if not lease.holders:
        for module, before, inside, flag in flags:
            if before != inside and flag == inside:  # a flag someone else set stays
                module.training = before
        if lease.watch is not None:
            lease.watch.remove()
        lease.eval_mode, lease.exclusive, lease.watch = None, False, None
        lease.modules, lease.before, lease.inside = [], [], []
        lease.training_inside = False
        if lease.waiting:
            lease.cond.notify_all()
    if not changed:
        return ""
    names = ", ".join(type(module).__name__ for module in changed[:3])
    return f"{len(changed)} module(s) ({names}{', ...' if len(changed) > 3 else ''})"
