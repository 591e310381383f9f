"""Running a model for attribution without changing it: the guard, checked logits, and targets.

Every method goes through :func:`guarded`, which puts the model in eval mode (by default), forks the
global RNG, and restores every submodule's ``training`` flag in ``finally``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn

Target = int | Sequence[int] | Tensor | None


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
def guarded(model: nn.Module, x: Tensor, *, eval_mode: bool = True, grad: bool = True) -> Iterator[None]:
    """Run the block with ``model`` in eval mode (unless ``eval_mode=False``) and gradients enabled
    (when ``grad``); afterwards every submodule's mode and the global RNG are as they were."""
    if grad and torch.is_inference_mode_enabled():
        raise RuntimeError(
            "gradient attributions cannot run inside torch.inference_mode(); call them outside it "
            "(torch.no_grad() is fine), or use occlusion, which needs no gradient"
        )
    cuda = [x.device] if x.device.type == "cuda" else []
    # A model run in train mode may draw dropout masks; the user's RNG stream must not move.
    with restored_modes(model) as modes, torch.random.fork_rng(devices=cuda):
        # Skipped when every module is already in eval mode: setting a module attribute costs
        # microseconds, which add up per call on large models and small inputs.
        if eval_mode and any(training for _, training in modes):
            model.eval()
        with torch.enable_grad() if grad else nullcontext():
            yield


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


def check_finite(logits: Tensor) -> None:
    """Raise if the model output holds NaN (one host sync; call it after queuing the backward)."""
    if torch.isnan(logits).any():
        raise ValueError("the model output contains NaN; no attribution can be computed from it")


def resolve_target(target: Target, logits: Tensor) -> Tensor:
    """The class index per example, ``[B]`` int64 on the logits' device.

    ``None``: each example's predicted class; an ``int``: that class for every example; a sequence or
    1-D integer tensor of length ``B``: one class per example.
    """
    batch, classes = logits.shape
    if target is None:
        return logits.detach().argmax(dim=1)
    if isinstance(target, bool):
        raise TypeError("target must be an int, a sequence of ints or an integer tensor, not bool")
    if isinstance(target, int):
        if not 0 <= target < classes:
            raise ValueError(f"target {target} is out of range for {classes} classes")
        return torch.full((batch,), target, dtype=torch.long, device=logits.device)
    if isinstance(target, (float, str)) or not isinstance(target, (Tensor, Iterable)):
        raise TypeError(
            f"target must be an int, a sequence of ints or an integer tensor, not {type(target).__name__}"
        )
    t = target if isinstance(target, Tensor) else torch.as_tensor(list(target))
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, not {t.dtype}")
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"target must have one class per example ({batch}); got shape {list(t.shape)}")
    low, high = int(t.min()), int(t.max())
    if low < 0 or high >= classes:
        bad = low if low < 0 else high
        raise ValueError(f"target {bad} is out of range for {classes} classes")
    return t.to(device=logits.device, dtype=torch.long)


def class_score(logits: Tensor, target: Tensor) -> Tensor:
    """Sum over the batch of each example's target logit; examples do not interact in eval mode, so
    its gradient holds every example's own gradient."""
    return logits.gather(1, target[:, None]).sum()
