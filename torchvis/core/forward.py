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
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn

from torchvis.core import hooks
from torchvis.core.lease import held

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
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield modes
    finally:
        for module, training in modes:
            if module.training != training:
                module.training = training


@contextmanager
def guarded(
    model: object, x: Tensor, *, eval_mode: bool = True, grad: bool = True
) -> Iterator[Callable[[], None] | None]:
    """Run the block with ``model`` in eval mode (unless ``eval_mode=False``) and gradients enabled
    (when ``grad``); afterwards every submodule's mode and the global RNG are as they were.

    With ``eval_mode=False``, train-mode BatchNorm/InstanceNorm layers normalise with the batch's own
    statistics and update no running statistics. The global RNG is forked (saved and restored) when a
    module runs in train mode inside, or when this is the only thread; in a multi-threaded program an
    eval-mode call leaves it alone, since restoring it would rewind other threads' draws (eval-mode
    layers draw nothing).

    A ``model`` that is a plain callable (not an ``nn.Module``) runs in whatever modes its modules are
    in — torchvis cannot see them — and the global RNG is forked around it.

    Yields the function that puts the global RNG back where it was on entry (to rerun the model from the
    same state), or ``None`` where the guard leaves the RNG alone: then nothing inside draws from it.
    """
    if grad and torch.is_inference_mode_enabled():
        raise RuntimeError(
            "gradient attributions cannot run inside torch.inference_mode(); call them outside it "
            "(torch.no_grad() is fine), or use occlusion, which needs no gradient"
        )
    cuda = [x.device] if x.device.type == "cuda" else []
    if not isinstance(model, nn.Module):
        with kept_rng(cuda) as rewind, torch.enable_grad() if grad else nullcontext():
            yield rewind
        return
    with held(model, eval_mode=eval_mode) as training_inside:
        # A model run in train mode may draw dropout masks; the user's RNG stream must not move.
        fork = training_inside or threading.active_count() == 1
        with (
            kept_rng(cuda) if fork else nullcontext() as rewind,
            hooks.batch_statistics_only(model) if training_inside else nullcontext(),
            torch.enable_grad() if grad else nullcontext(),
        ):
            yield rewind


@contextmanager
def kept_rng(cuda: list[torch.device]) -> Iterator[Callable[[], None]]:
    """The global CPU generator's state (and that of each ``cuda`` device) saved on entry and put back
    on exit, whatever happens inside: ``torch.random.fork_rng(devices=cuda)`` without its per-call
    checks and warnings, which cost 20 µs of every small call. Yields the function that puts it back,
    for a block that reruns something from the same state."""
    cpu = torch.get_rng_state()
    states = [(device, torch.cuda.get_rng_state(device)) for device in cuda]

    def rewind() -> None:
        torch.set_rng_state(cpu)
        for device, state in states:
            torch.cuda.set_rng_state(state, device)

    try:
        yield rewind
    finally:
        rewind()


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
    host sync; call it after queuing the backward. An inf logit (a float32 overflow, say) would give
    NaN maps."""
    tensors = [t.detach() for t in (logits, *more) if t.numel()]
    # A sum is finite only if every value is (inf + x = inf, inf - inf = NaN, NaN + x = NaN): one
    # reduction per tensor, half the time of aminmax on a large gradient and a third of it on a small
    # one. A finite tensor whose sum overflows is told apart by the exact check below.
    if tensors and tensors[0].device.type == "cpu":  # no sync to save: the cheapest reads
        sums = [t.sum().item() for t in tensors]
    else:
        sums = torch.stack([t.sum() for t in tensors]).tolist() if tensors else []
    if all(math.isfinite(total) for total in sums):
        return
    # The tensors whose sum is not finite, read exactly: the smallest and largest value (NaN if it holds
    # one, +-inf if it holds one). A finite tensor whose sum overflowed passes.
    suspects = [i for i, total in enumerate(sums) if not math.isfinite(total)]
    extremes = torch.stack([torch.stack(torch.aminmax(tensors[i])).double() for i in suspects]).tolist()
    bad = {i for i, (low, high) in zip(suspects, extremes, strict=True)
           if not (math.isfinite(low) and math.isfinite(high))}
    if not bad:
        return
    if logits.numel() and 0 in bad:
        raise ValueError(
            "the model output contains NaN or inf (an overflow in the logits?); no attribution can be "
            "computed from it"
        )
    raise ValueError(
        f"{what} hold NaN or inf (an overflow?); the maps would be NaN — try float64 inputs and model"
    )
