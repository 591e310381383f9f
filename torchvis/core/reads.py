"""Host reads: the checks that need a value from the device, done in one host synchronisation a call.

A method's checks — are the logits and gradients finite, is the target in range, is a CAM exactly
zero for some example — each need a few numbers on the host. Read one by one, each is a host
synchronisation on a GPU (the host waits for every queued kernel). Within :func:`one_host_read`, a
check hands its numbers and what to do with them to :func:`on_host`, which queues them; leaving the
block reads every queued tensor in one transfer per device (on the CPU, where a read waits for
nothing, one by one), then runs the checks in the order they were queued (so a non-finite gradient
is reported before the empty map it caused). Outside such a block :func:`on_host` reads at once. A
block nested in another (``explain`` calling a method) joins the outer one. Each thread has its own
queue.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

__all__ = ["on_host", "one_host_read"]

Check = Callable[[list[float]], None]

_QUEUE: ContextVar[list[tuple[Tensor, Check]] | None] = ContextVar("torchvis_host_reads", default=None)


def on_host(values: Tensor, check: Check) -> bool:
    """``check(values.tolist())`` for a 1-D ``values``: now, or at the end of the enclosing
    :func:`one_host_read` block, in one read with every other queued check. ``check`` raises or
    warns; its result is not kept. Returns whether the check ran now."""
    queue = _QUEUE.get()
    if queue is None:
        check(values.tolist())
        return True
    queue.append((values, check))
    return False


@contextmanager
def one_host_read() -> Iterator[None]:
    """Queue the :func:`on_host` checks made inside the block and run them when it ends without an
    error, after one read of all their values (one per device). Usable as a decorator."""
    if _QUEUE.get() is not None:  # nested: the outer block reads
        yield
        return
    queue: list[tuple[Tensor, Check]] = []
    token = _QUEUE.set(queue)
    try:
        yield
    finally:
        _QUEUE.reset(token)
    for (_, check), values in zip(queue, _read(queue), strict=True):
        check(values)


# Device types whose reads are no synchronisation (the values are on the host already): each tensor
# is read where it is, which costs less than concatenating them.
UNSYNCED = frozenset({"cpu"})


def _read(queue: list[tuple[Tensor, Check]]) -> list[list[float]]:
    """The values of each queued tensor: on a device that synchronises, all of them with one
    ``tolist`` (as float64, float32 on MPS, which has no float64: class indices and sums in one
    tensor); elsewhere one by one."""
    read: list[list[float]] = [[] for _ in queue]
    devices = {values.device for values, _ in queue}
    for device in devices:
        mine = [i for i, (values, _) in enumerate(queue) if values.device == device]
        if len(mine) == 1 or device.type in UNSYNCED:
            for i in mine:
                read[i] = queue[i][0].tolist()
            continue
        wide = torch.float32 if device.type == "mps" else torch.float64
        flat = torch.cat([queue[i][0].to(wide) for i in mine]).tolist()
        start = 0
        for i in mine:
            end = start + queue[i][0].numel()
            read[i] = flat[start:end]
            start = end
    return read
