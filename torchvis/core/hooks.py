"""The hook core: the only module in torchvis that registers hooks.

Everything that attaches to a model or a tensor here is a context manager that removes what it
attached in ``finally`` — also when the model raises. Layers are addressed by the dotted names of
``model.named_modules()`` or by the module object itself.

Public pieces:

- :func:`resolve_layer` — a name or module to ``(name, module)``; unknown names list close matches.
- :func:`capture` — record chosen layers' outputs (and the gradients that reach them).
- :func:`forward_hooks` — attach arbitrary forward (pre-)hooks for the duration of a block.
- :func:`guided_relus` — route every ReLU (module or functional) through the guided-backprop rule.
- :func:`batch_statistics_only` — train-mode normalisation layers use the batch's statistics and
  update no running statistics.
- :func:`refuse_forwards` — make forwards of given modules in other threads raise.

Threads: module hooks are shared by every thread that runs the module, so each hook attached here
acts only on forwards run by the thread that attached it; other threads' forwards pass through it
untouched. Tensor hooks and torch function modes are per-thread already.
"""

from __future__ import annotations

import difflib
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

LayerRef = str | nn.Module
ForwardHook = Callable[[nn.Module, tuple[Any, ...], Any], Any]
ForwardPreHook = Callable[[nn.Module, tuple[Any, ...]], Any]


def resolve_layer(model: nn.Module, layer: LayerRef) -> tuple[str, nn.Module]:
    """Return ``(dotted name, module)`` for a layer given by name or by module object.

    Raises ``ValueError`` for a name that ``model.named_modules()`` does not know (listing the
    closest names) or for a module object that is not part of ``model``.
    """
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name, module
        raise ValueError(f"the module {type(layer).__name__} is not a submodule of the model")
    if not isinstance(layer, str):
        raise TypeError(f"a layer is a dotted name or an nn.Module, not {type(layer).__name__}")
    modules = dict(model.named_modules())
    if layer in modules:
        return layer, modules[layer]
    close = difflib.get_close_matches(layer, [n for n in modules if n], n=5, cutoff=0.4)
    hint = f"closest: {', '.join(repr(n) for n in close)}" if close else "see model.named_modules()"
    raise ValueError(f"unknown layer {layer!r}; {hint}")


@contextmanager
def forward_hooks(
    hooks: Iterable[tuple[nn.Module, ForwardHook]],
    pre_hooks: Iterable[tuple[nn.Module, ForwardPreHook]] = (),
) -> Iterator[None]:
    """Attach forward hooks (and pre-hooks) for the duration of the block; always remove them.

    Each hook runs only for forwards in the calling thread; in other threads it does nothing."""
    handles: list[RemovableHandle] = []
    hooks, pre_hooks = list(hooks), list(pre_hooks)
    owner = threading.get_ident()
    for module, _ in [*pre_hooks, *hooks]:
        if isinstance(module, torch.jit.ScriptModule):
            # Scripted modules refuse hooks; traced ones accept them and never call them.
            raise TypeError(
                f"{type(module).__name__} is a TorchScript module, whose layers module hooks cannot "
                "reach (capture, Grad-CAM, summaries); pass the eager nn.Module"
            )
    try:
        for module, pre in pre_hooks:
            handles.append(module.register_forward_pre_hook(_in_thread(owner, pre)))
        for module, hook in hooks:
            handles.append(module.register_forward_hook(_in_thread(owner, hook)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _in_thread(owner: int, hook: Callable[..., Any]) -> Callable[..., Any]:
    def only_in_owner(*args: Any) -> Any:
        return hook(*args) if threading.get_ident() == owner else None

    return only_in_owner


def refuse_forwards(module_ids: frozenset[int], allowed: Callable[[], bool], message: str) -> RemovableHandle:
    """Until the returned handle is removed, a forward of any module whose ``id`` is in ``module_ids``
    raises ``ConcurrentUseError(message)`` unless ``allowed()`` (asked in the running thread).

    A global module pre-hook: one registration however large the model, and it also sees a forward
    that began before it was registered, at its next submodule.
    """
    from torchvis.core.lease import ConcurrentUseError

    def refuse(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        if id(module) in module_ids and not allowed():
            raise ConcurrentUseError(message)

    return torch.nn.modules.module.register_module_forward_pre_hook(refuse)


@dataclass
class Recording:
    """What :func:`capture` saw while its block ran.

    For each captured layer name: ``outputs[name]`` is the output of the layer's last call (``[B,K,h,w]``
    for a conv layer), still connected to the autograd graph — differentiate against it, or
    ``.detach()`` it to keep it. Later in-place operations in the model act on a copy, so the recorded
    tensor keeps the values the layer produced. ``grads[name]`` is the gradient that reached that output
    in the last backward pass run inside the block (absent if none ran). ``calls[name]`` counts the
    layer's calls.
    """

    outputs: dict[str, Tensor] = field(default_factory=dict)
    grads: dict[str, Tensor] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    _versions: dict[str, int] = field(default_factory=dict, repr=False)

    def output(self, name: str) -> Tensor:
        """The recorded output of ``name``, checked to be unmodified since the layer returned it."""
        if name not in self.outputs:
            raise RuntimeError(f"layer {name!r} did not run during the forward pass")
        out = self.outputs[name]
        if out._version != self._versions[name]:
            raise RuntimeError(
                f"the output of layer {name!r} was modified in place after the layer returned it "
                "(it aliases a tensor that a later operation changed); choose another layer"
            )
        return out


@contextmanager
def capture(model: nn.Module, layers: Sequence[LayerRef]) -> Iterator[Recording]:
    """Record the outputs of ``layers`` (and the gradients reaching them) while the block runs.

    Example::

        with capture(model, ["layer4"]) as rec:
            score = model(x)[:, 3].sum()
            grad, = torch.autograd.grad(score, rec.outputs["layer4"])
        rec.grads["layer4"]  # the same gradient, recorded by a tensor hook

    Uses forward hooks and tensor hooks only (``register_full_backward_hook`` fails on in-place ReLU).
    The layer passes a copy of its output downstream, so an in-place op after the layer cannot corrupt
    the recorded tensor.
    """
    resolved = [resolve_layer(model, layer) for layer in layers]
    rec = Recording()
    grad_handles: dict[str, RemovableHandle] = {}

    def make_hook(name: str) -> ForwardHook:
        def store_grad(grad: Tensor) -> None:
            rec.grads[name] = grad

        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Tensor:
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"layer {name!r} returned {type(output).__name__}; capture needs a tensor output"
                )
            rec.calls[name] += 1
            rec.outputs[name] = output
            rec._versions[name] = output._version
            if name in grad_handles:  # a module called again: only its last call is recorded
                grad_handles.pop(name).remove()
            if output.requires_grad:
                grad_handles[name] = output.register_hook(store_grad)
            return output.clone()

        return hook

    try:
        with forward_hooks((module, make_hook(name)) for name, module in resolved):
            yield rec
    finally:
        for handle in grad_handles.values():
            handle.remove()


class ModuleOutput(NamedTuple):
    """One call of a submodule seen by :func:`feature_maps`."""

    name: str
    module: nn.Module
    output: Tensor
    version: int  # output._version when the module returned; a later value means an in-place change


@contextmanager
def feature_maps(model: nn.Module) -> Iterator[list[ModuleOutput]]:
    """Record, in the order the modules finish, every submodule's 4-D tensor output ``[B,K,h,w]``.

    Yields a list that fills as the block's forward pass runs; a module called several times
    appears once per call. Outputs are not copied.
    """
    seen: list[ModuleOutput] = []

    def make_hook(name: str) -> ForwardHook:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if isinstance(output, Tensor) and output.dim() == 4:
                seen.append(ModuleOutput(name, module, output, output._version))

        return hook

    modules = [(module, make_hook(name)) for name, module in model.named_modules() if name]
    with forward_hooks(modules):
        yield seen


# --- guided backprop -------------------------------------------------------------------------------

def _positive_part(grad: Tensor) -> Tensor:
    """The half of the guided rule that a plain ReLU lacks: only a positive gradient flows back.

    Springenberg et al., "Striving for Simplicity: The All Convolutional Net", ICLR-W 2015: at every
    ReLU the gradient passes where both the forward input and the incoming gradient are positive. The
    ReLU's own backward masks by the input; this tensor hook, on the ReLU's output, clamps the gradient.
    """
    return grad.clamp_min(0)


# Rectifier-like activations whose gradient guided backprop would need a rule for; we warn, since
# their gradients pass through unchanged.
UNTREATED_ACTIVATIONS = frozenset({
    "gelu", "silu", "silu_", "elu", "elu_", "selu", "selu_", "celu", "celu_", "leaky_relu",
    "leaky_relu_", "prelu", "rrelu", "rrelu_", "relu6", "hardtanh", "hardtanh_", "hardswish",
    "hardswish_", "mish", "mish_", "softplus",
})


@dataclass
class ActivationReport:
    """What :func:`guided_relus` saw: ReLU calls rewritten and other activations left alone."""

    relu_calls: int = 0
    untreated: Counter[str] = field(default_factory=Counter)


class _GuidedReLUMode(TorchFunctionMode):
    """Sees every relu call — ``nn.ReLU`` (in place or not), ``F.relu``, ``torch.relu``,
    ``Tensor.relu``, ``relu_`` — which module hooks alone cannot (they miss functional calls)."""

    def __init__(self, report: ActivationReport) -> None:
        super().__init__()
        self.report = report

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("relu", "relu_") and args and isinstance(args[0], Tensor):
            self.report.relu_calls += 1
            # The model's own ReLU runs (in place if it asked, so callers may ignore the result); a
            # hook on its output, not a Python autograd.Function, adds the rule: one Python call per
            # ReLU in the backward pass and none in the forward.
            out = func(*args, **kwargs)
            if isinstance(out, Tensor) and out.requires_grad:
                out.register_hook(_positive_part)
            return out
        if name in UNTREATED_ACTIVATIONS:
            self.report.untreated[name] += 1
        return func(*args, **kwargs)


@contextmanager
def guided_relus() -> Iterator[ActivationReport]:
    """Within the block, every ReLU call builds a graph whose backward follows the guided rule.

    Only the forward pass must run inside the block; the backward may run after it. Yields a report
    of the ReLU calls rewritten and the non-ReLU activations seen (whose gradients stay plain).
    TorchScript models run their ops outside Python, where this cannot see them.
    """
    report = ActivationReport()
    with _GuidedReLUMode(report):
        yield report


# --- batch statistics without updates --------------------------------------------------------------

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


class _BatchStatisticsMode(TorchFunctionMode):
    """Normalisation in train mode on the batch's own statistics, with its running statistics
    neither read nor written and ``num_batches_tracked`` left as it is."""

    def __init__(self, running: frozenset[int], counters: frozenset[int]) -> None:
        super().__init__()
        self.running, self.counters = running, counters

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.add_ and args and id(args[0]) in self.counters:
            return args[0]  # BatchNorm's num_batches_tracked.add_(1)
        if func is F.batch_norm or func is F.instance_norm:
            running_mean = args[1] if len(args) > 1 else kwargs.get("running_mean")
            if id(running_mean) in self.running:
                args = args[:1]
                kwargs.update(running_mean=None, running_var=None)
                kwargs["training" if func is F.batch_norm else "use_input_stats"] = True
        return func(*args, **kwargs)


@contextmanager
def batch_statistics_only(model: nn.Module) -> Iterator[None]:
    """Within the block, every train-mode BatchNorm or InstanceNorm of ``model`` that tracks running
    statistics normalises with the batch's statistics and leaves its buffers untouched (in this
    thread only). Nothing happens for a model without such a layer."""
    norms = [m for m in model.modules() if isinstance(m, _NORMS) and m.training and m.track_running_stats]
    running = frozenset(id(t) for m in norms for t in (m.running_mean, m.running_var) if t is not None)
    counters = frozenset(id(m.num_batches_tracked) for m in norms if m.num_batches_tracked is not None)
    if not running and not counters:
        yield
        return
    with _BatchStatisticsMode(running, counters):
        yield
