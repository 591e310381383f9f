"""Host reads: the checks that need a value from the device, done in one host synchronisation a call.

A method's checks — are the logits and gradients finite, is the target in range, is a CAM exactly
zero for some example — each need a few numbers on the host. Read one by one, each is a host
synchronisation on a GPU (the host waits for every queued kernel). Within :class:`one_host_read`, a
check hands its numbers and what to do with them to :func:`on_host`, which queues them; leaving the
block reads every queued tensor in one transfer per device, then runs the checks in the order they
were queued (so a non-finite gradient is reported before the empty map it caused). Outside such a
block, and for values on the CPU (whose reads wait for nothing), :func:`on_host` reads at once. A
block nested in another (``explain`` calling a method) joins the outer one. Each thread has its own
queue.

The price of one read: on a GPU a queued check raises when the call ends, after the passes it might
have preceded — a device tensor target out of range is reported after the forward and backward (its
index clamped meanwhile, so that the gather cannot fail first); on the CPU every check runs where it
is made, as before.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token

import torch
from torch import Tensor

__all__ = ["on_host", "one_host_read"]

Check = Callable[[list[float]], None]
Queue = list[tuple[Tensor, Check]]

_QUEUE: ContextVar[Queue | None] = ContextVar("torchvis_host_reads", default=None)

# Device types whose reads are no synchronisation (the values are on the host already): their checks
# run at once, which costs less than queueing them.
UNSYNCED = frozenset({"cpu"})


def on_host(values: Tensor, check: Check) -> bool:
    """``check(values.tolist())`` for a 1-D ``values``: now, or at the end of the enclosing
    :class:`one_host_read` block, in one read with every other queued check. ``check`` raises or
    warns; its result is not kept. Returns whether the check ran now."""
    queue = _QUEUE.get()
    if queue is None or values.device.type in UNSYNCED:
        check(values.tolist())
        return True
    queue.append((values, check))
    return False


class one_host_read:  # noqa: N801  (used as a function: ``with one_host_read():``)
    """Queue the :func:`on_host` checks made inside the block and run them when it ends without an
    error, after one read of all their values per device. A class, not a generator-based context
    manager: it opens once per call, and a generator costs microseconds more."""

    __slots__ = ("_queue", "_token")

    def __enter__(self) -> None:
        self._token: Token[Queue | None] | None = None
        if _QUEUE.get() is None:  # nested blocks leave the reading to the outer one
            self._queue: Queue = []
            self._token = _QUEUE.set(self._queue)

    def __exit__(self, kind: object, *exc: object) -> None:
        if self._token is None:
            return
        _QUEUE.reset(self._token)
        if kind is None and self._queue:
            for (_, check), values in zip(self._queue, _read(self._queue), strict=True):
                check(values)


def _read(queue: Queue) -> list[list[float]]:
    """The values of each queued tensor, those of one device with one ``tolist`` (as float64, float32
    on MPS, which has no float64: class indices and sums in one tensor)."""
    if len(queue) == 1:
        return [queue[0][0].tolist()]
    read: list[list[float]] = [[] for _ in queue]
    for device in {values.device for values, _ in queue}:
        mine = [i for i, (values, _) in enumerate(queue) if values.device == device]
        wide = torch.float32 if device.type == "mps" else torch.float64
        flat = torch.cat([queue[i][0].to(wide) for i in mine]).tolist()
        start = 0
        for i in mine:
            end = start + queue[i][0].numel()
            read[i] = flat[start:end]
            start = end
    return read
