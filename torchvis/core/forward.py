"""Running a model for attribution without changing it: the guard and checked logits and gradients.

Every method goes through :func:`guarded`, which puts the model in eval mode (by default), keeps
the global RNG where it was, and restores every submodule's ``training`` flag in ``finally``.

Threads. A module's ``training`` flag is shared by every thread, so the guard holds a *lease* per
model (see :mod:`torchvis.core.lease`): concurrent eval-mode calls on one model share one window in
which the model is in eval mode — the first call switches it, the last one restores it — and run in
parallel; while that window is open, a forward of the model in any other thread (a training step,
say) raises :class:`~torchvis.core.lease.ConcurrentUseError` instead of silently running in eval
mode. Calls with ``eval_mode=False`` wait for an open eval window to close (and vice versa).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import Tensor, nn

from torchvis.core import hooks
from torchvis.core.lease import held
from torchvis.core.reads import on_host

__all__ = [
    "check_finite",
    "check_input",
    "checked_logits",
    "grad_leaf",
    "guarded",
    "kept_rng",
    "restored_modes",
]


def check_input(x: object) -> Tensor:
    """``x`` must be a floating ``[B,C,H,W]`` tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [B,C,H,W], not {type(x).__name__}")
    if x.dim() != 4:
        hint = " (add a batch dimension: x.unsqueeze(0))" if x.dim() == 3 else ""
        raise ValueError(f"x must have shape [B,C,H,W]; got {list(x.shape)}{hint}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor; got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch")
    return x


@contextmanager
def restored_modes(model: nn.Module) -> Iterator[list[tuple[nn.Module, bool]]]:
    """Within the block the model's modes may change; afterwards every submodule's ``training`` flag
    is as before — per submodule, since a user may keep, say, a BatchNorm in eval mode on purpose.
    Yields the ``(module, training)`` pairs recorded on entry."""
    modes = [(module, module.training) for module in hooks.submodules(model)]
    try:
        yield modes
    finally:
        for module, training in modes:
            if module.training != training:
                module.training = training


def guarded(model: object, x: Tensor, *, eval_mode: bool = True, grad: bool = True) -> _Guard:
    """Run the block with ``model`` in eval mode (unless ``eval_mode=False``) and gradients enabled
    (when ``grad``); afterwards every submodule's mode and the global RNG are as they were.

    With ``eval_mode=False``, train-mode BatchNorm/InstanceNorm layers normalise with the batch's own
    statistics and update no running statistics. The global RNG is forked (saved and restored) when a
    module runs in train mode inside, or when this is the only thread; in a multi-threaded program an
    eval-mode call leaves it alone, since restoring it would rewind other threads' draws (eval-mode
    layers draw nothing).

    A ``model`` that is a plain callable (not an ``nn.Module``) runs in whatever modes its modules are
    in — torchvis cannot see them — and the global RNG is forked around it.

    Entering gives the function that puts the global RNG back where it was on entry (to rerun the model
    from the same state), or ``None`` where the guard leaves the RNG alone: then nothing inside draws
    from it.
    """
    return _Guard(model, x, eval_mode, grad)


class _Guard:
    """The context manager of :func:`guarded`: one object, not four nested generator-based ones, since
    it runs on every call and each of those costs microseconds on a small model. On leaving it undoes
    what entering did, innermost first, whatever raised: the grad mode, the batch-statistics mode, the
    RNG, then the lease (which raises if another thread changed a module's flag meanwhile)."""

    __slots__ = ("_model", "_cuda", "_eval_mode", "_grad", "_hold", "_rng", "_statistics", "_grad_mode")

    def __init__(self, model: object, x: Tensor, eval_mode: bool, grad: bool) -> None:
        self._model, self._eval_mode, self._grad = model, eval_mode, grad
        self._cuda = [x.device] if x.device.type == "cuda" else []
        self._hold: held | None = None
        self._rng: _SavedRng | None = None
        self._statistics: AbstractContextManager[None] | None = None
        self._grad_mode: AbstractContextManager[None] | None = None

    def __enter__(self) -> Callable[[], None] | None:
        if self._grad and torch.is_inference_mode_enabled():
            raise RuntimeError(
                "gradient attributions cannot run inside torch.inference_mode(); call them outside it "
                "(torch.no_grad() is fine), or use occlusion, which needs no gradient"
            )
        model = self._model
        if isinstance(model, nn.Module):
            self._hold = held(model, eval_mode=self._eval_mode)
            training_inside = self._hold.__enter__()
            # A model run in train mode may draw dropout masks; the user's RNG stream must not move.
            fork = training_inside or threading.active_count() == 1
        else:
            training_inside, fork = False, True
        try:
            if fork:
                self._rng = _SavedRng(self._cuda)
            if training_inside:
                statistics = hooks.batch_statistics_only(model)  # type: ignore[arg-type]
                statistics.__enter__()
                self._statistics = statistics  # kept once entered: leaving undoes only what was done
            if self._grad:
                self._grad_mode = torch.enable_grad()
                self._grad_mode.__enter__()
        except BaseException as err:
            self.__exit__(type(err), err, err.__traceback__)
            raise
        return None if self._rng is None else self._rng.restore

    def __exit__(self, *exc: object) -> None:
        try:
            if self._grad_mode is not None:
                self._grad_mode.__exit__(None, None, None)
            if self._statistics is not None:
                self._statistics.__exit__(None, None, None)
        finally:
            try:
                if self._rng is not None:
                    self._rng.restore()
            finally:
                if self._hold is not None:
                    self._hold.__exit__()


class _SavedRng:
    """The global CPU generator's state, and that of each CUDA device in ``cuda``, as on construction;
    :meth:`restore` puts them back (any number of times)."""

    __slots__ = ("_cpu", "_cuda")

    def __init__(self, cuda: list[torch.device]) -> None:
        self._cpu = torch.get_rng_state()
        self._cuda = [(device, torch.cuda.get_rng_state(device)) for device in cuda]

    def restore(self) -> None:
        torch.set_rng_state(self._cpu)
        for device, state in self._cuda:
            torch.cuda.set_rng_state(state, device)


@contextmanager
def kept_rng(cuda: list[torch.device]) -> Iterator[None]:
    """The global CPU generator's state (and that of each ``cuda`` device) saved on entry and put back
    on exit, whatever happens inside: ``torch.random.fork_rng(devices=cuda)`` without its per-call
    checks and warnings, which cost 20 µs of every small call."""
    saved = _SavedRng(cuda)
    try:
        yield
    finally:
        saved.restore()


def grad_leaf(x: Tensor) -> Tensor:
    """A fresh leaf sharing ``x``'s values that requires grad; ``x`` itself is left untouched."""
    leaf = x.clone() if x.is_inference() else x.detach()
    return leaf.requires_grad_(True)


def checked_logits(out: object, batch: int) -> Tensor:
    """The model output, which must be a ``[B, classes]`` tensor."""
    if isinstance(out, Tensor) and out.dim() == 2 and out.shape[0] == batch:
        return out
    got = f"a tensor of shape {list(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
    raise ValueError(
        f"torchvis needs a model that returns logits of shape [B, classes] (B={batch}); it returned "
        f"{got}. Wrap it in a module whose forward returns that tensor, e.g. one returning "
        "`self.model(x)['logits']`, or `nn.Sequential(model, nn.Flatten())` for [B, classes, 1, 1]."
    )


def check_finite(logits: Tensor, *more: Tensor, what: str = "the gradients of the target score") -> None:
    """Raise if the model output, or any of ``more`` (``what`` they are), holds NaN or inf — one
    host read (:func:`torchvis.core.reads.on_host`: at the end of the call inside
    :func:`~torchvis.core.reads.one_host_read`); call it after queuing the backward. An inf logit (a
    float32 overflow, say) would give NaN maps."""
    tensors = [t.detach() if t.requires_grad else t for t in (logits, *more) if t.numel()]
    if not tensors:
        return
    # A sum is finite only if every value is (inf + x = inf, inf - inf = NaN, NaN + x = NaN): one
    # reduction per tensor, half the time of aminmax on a large gradient and a third of it on a small
    # one. A finite tensor whose sum overflows is told apart by the exact check below.
    output_first = bool(logits.numel())

    def check(sums: list[float]) -> None:
        if all(math.isfinite(total) for total in sums):
            return
        # The tensors whose sum is not finite, read exactly: the smallest and largest value (NaN if it
        # holds one, +-inf if it holds one). A finite tensor whose sum overflowed passes.
        suspects = [i for i, total in enumerate(sums) if not math.isfinite(total)]
        extremes = [torch.stack(torch.aminmax(tensors[i])).double().tolist() for i in suspects]  # any device
        bad = {i for i, (low, high) in zip(suspects, extremes, strict=True)
               if not (math.isfinite(low) and math.isfinite(high))}
        if not bad:
            return
        if output_first and 0 in bad:
            raise ValueError(
                "the model output contains NaN or inf (an overflow in the logits?); no attribution can be "
                "computed from it"
            )
        raise ValueError(
            f"{what} hold NaN or inf (an overflow?); the maps would be NaN — try float64 inputs and model"
        )

    # One tensor of sums, on the device they are read from (the first not on the CPU: logits a model
    # moved to the CPU are summed there and copied over).
    device = next((t.device for t in tensors if t.device.type != "cpu"), tensors[0].device)
    on_host(torch.stack([t.sum().to(device) for t in tensors]), check)
