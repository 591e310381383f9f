"""The hook core: the only module in torchvis that registers hooks.

Everything that attaches to a model or a tensor here is a context manager that removes what it
attached in ``finally`` — also when the model raises. Layers are addressed by the dotted names of
``model.named_modules()`` or by the module object itself.

Public pieces:

- :func:`resolve_layer` — a name or module to ``(name, module)``; unknown names list close matches.
- :func:`address` — a layer method's layer (a name, module, ``(layer, index)`` or ``"name[index]"``)
  to a :class:`Address`.
- :func:`unwrap` — the module inside ``torch.compile``, ``nn.DataParallel`` and DDP wrappers, whose
  submodules run (and fire hooks) when it is called.
- :func:`capture` — record chosen layers' outputs or inputs (and the gradients that reach them).
- :func:`has_in_place_modules` — whether a model has modules that work in place (``inplace=True``).
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
import re
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
# A layer for the layer methods: also one element of a tuple output (or input), by index.
LayerAddress = LayerRef | tuple[LayerRef, int]
ForwardHook = Callable[[nn.Module, tuple[Any, ...], Any], Any]
ForwardPreHook = Callable[[nn.Module, tuple[Any, ...]], Any]


_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` (``OptimizedModule._orig_mod``), ``nn.DataParallel`` or
    ``DistributedDataParallel`` (``.module``) wrapper runs, unwrapping nested wrappers; ``model``
    itself otherwise.

    Hooks go on the original module's submodules and the original module is called: a compiled
    graph does not call module hooks added after compiling (PyTorch issue 117758), so hooking through
    the wrapper could silently record nothing.
    """
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif "_orig_mod" in model._modules:  # a dict lookup: no __getattr__ miss (TorchScript has one too)
            model = model._modules["_orig_mod"]  # type: ignore[assignment]
        else:
            return model


def resolve_layer(model: nn.Module, layer: LayerRef) -> tuple[str, nn.Module]:
    """Return ``(dotted name, module)`` for a layer given by name or by module object.

    A wrapped model (see :func:`unwrap`) is addressed by its original module's names; a name with the
    wrapper's ``_orig_mod.`` or ``module.`` prefix is accepted too. Raises ``ValueError`` for a name
    that ``model.named_modules()`` does not know (listing the closest names) or for a module object
    that is not part of ``model``.
    """
    inner = unwrap(model)
    if inner is not model:
        if isinstance(layer, str):
            while layer.startswith(_WRAPPER_PREFIXES):
                layer = layer.split(".", 1)[1]
        model = inner
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name, module
        raise ValueError(f"the module {type(layer).__name__} is not a submodule of the model")
    if not isinstance(layer, str):
        raise TypeError(f"a layer is a dotted name or an nn.Module, not {type(layer).__name__}")
    try:  # the dotted path alone: no walk over every module (this runs on every call of a layer method)
        return layer, model.get_submodule(layer)
    except (AttributeError, RuntimeError):  # not a path of submodules; TorchScript modules refuse it
        pass
    modules = dict(model.named_modules())
    if layer in modules:
        return layer, modules[layer]
    close = difflib.get_close_matches(layer, [n for n in modules if n], n=5, cutoff=0.4)
    hint = f"closest: {', '.join(repr(n) for n in close)}" if close else "see model.named_modules()"
    raise ValueError(f"unknown layer {layer!r}; {hint}")


class Address(NamedTuple):
    """A layer method's layer: the module's dotted ``name`` and, for a module whose output (or input)
    is a tuple, the index of the ``element`` wanted (``None``: the output is a tensor)."""

    name: str
    element: int | None = None

    @property
    def key(self) -> str:
        """``"name"``, or ``"name[element]"``: the name recordings and maps go by."""
        return self.name if self.element is None else f"{self.name}[{self.element}]"


_INDEXED = re.compile(r"^(.*)\[(-?\d+)\]$")


def located(model: nn.Module, layer: LayerAddress) -> tuple[Address, nn.Module]:
    """The :class:`Address` of ``layer`` and its module: a name or module (see :func:`resolve_layer`),
    or one element of its tuple output as ``(name_or_module, index)`` or ``"name[index]"`` (no module
    name contains brackets, so the string form is unambiguous)."""
    if isinstance(layer, tuple):
        if len(layer) != 2 or isinstance(layer[1], bool) or not isinstance(layer[1], int):
            raise TypeError(
                f"a tuple layer is (name or module, index), e.g. ('encoder.lstm', 0); got {layer!r}"
            )
        name, module = resolve_layer(model, layer[0])
        return Address(name, layer[1]), module
    if isinstance(layer, str) and (match := _INDEXED.match(layer)):
        name, module = resolve_layer(model, match[1])
        return Address(name, int(match[2])), module
    name, module = resolve_layer(model, layer)
    return Address(name), module


def is_element(layer: object) -> bool:
    """Whether ``layer`` is ``(layer, index)`` — one element of a layer's tuple output — rather than a
    tuple of several layers."""
    return (isinstance(layer, tuple) and len(layer) == 2 and isinstance(layer[1], int)
            and not isinstance(layer[1], bool))


def address(model: nn.Module, layer: LayerAddress) -> Address:
    """The :class:`Address` of ``layer`` (see :func:`located`)."""
    return located(model, layer)[0]


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
    ``.detach()`` it to keep it. With :func:`capture`'s ``copy`` (the default), later in-place
    operations in the model act on a copy, so the recorded tensor keeps the values the layer produced;
    without it, :meth:`modified` says which recordings a later in-place operation overwrote.
    ``grads[name]`` is the gradient that reached that output in the last backward pass run inside the
    block (absent if none ran). ``calls[name]`` counts the layer's calls.
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
        if self._overwritten(name):
            raise RuntimeError(
                f"the output of layer {name!r} was modified in place after the layer returned it "
                "(it aliases a tensor that a later operation changed); choose another layer"
            )
        return out

    def modified(self) -> list[str]:
        """The names whose recorded tensor was changed in place after the layer returned it (its
        version counter moved: an in-place op on it or on a view of it)."""
        return [name for name in self.outputs if self._overwritten(name)]

    def _overwritten(self, name: str) -> bool:
        return self.outputs[name]._version != self._versions[name]


def submodules(model: nn.Module) -> list[nn.Module]:
    """Every distinct module of ``model``, itself first, in the order of ``model.modules()``.

    A plain walk over the children dicts: ``model.modules()`` builds a dotted name per module, five
    times slower, and the lease and the in-place check walk the model on every call."""
    seen: set[int] = set()
    found: list[nn.Module] = []
    stack: list[nn.Module | None] = [model]
    while stack:
        module = stack.pop()
        if module is None or id(module) in seen:  # a child may be None (a registered empty slot)
            continue
        seen.add(id(module))
        found.append(module)
        stack.extend(reversed(module._modules.values()))
    return found


def has_in_place_modules(model: nn.Module) -> bool:
    """Whether a submodule of ``model`` is set to change its input in place (an ``inplace=True``
    attribute: ``nn.ReLU(inplace=True)``, ``nn.Dropout(inplace=True)``, ...). Functional in-place ops
    (``F.relu(x, inplace=True)``, ``x += y``) are invisible here; :meth:`Recording.modified` sees
    their effect after the forward."""
    # The instance dict: nn.Module.__getattr__ raises, slowly, for the many modules without the flag.
    return any(module.__dict__.get("inplace") is True for module in submodules(model))


@contextmanager
def capture(
    model: nn.Module,
    layers: Sequence[LayerAddress],
    *,
    inputs: bool = False,
    grads: bool = True,
    copy: bool = True,
) -> Iterator[Recording]:
    """Record the outputs of ``layers`` while the block runs (and, with ``grads``, the gradients that
    reach them during a backward inside the block).

    Example::

        with capture(model, ["layer4"]) as rec:
            score = model(x)[:, 3].sum()
            grad, = torch.autograd.grad(score, rec.outputs["layer4"])
        rec.grads["layer4"]  # the same gradient, recorded by a tensor hook

    Recordings go by :attr:`Address.key` (``"name"``, or ``"name[index]"`` for one element of a tuple
    output, see :func:`address`). With ``inputs``, each layer's positional input (the first, or the
    one at ``index``) is recorded instead of its output (Captum's ``attribute_to_layer_input``). A
    tuple output without an index, an index out of range or an element that is not a tensor is a
    ``ValueError`` raised at the layer's call, before any gradient is computed.

    Uses forward hooks and tensor hooks only (``register_full_backward_hook`` fails on in-place ReLU).
    With ``copy`` (the default) the layer passes a copy of its output (or gets a copy of its input), so
    an in-place op cannot corrupt the recorded tensor. ``copy=False`` saves that copy (a full pass over
    the layer's output) for callers that check :meth:`Recording.modified` after the forward and run it
    again with ``copy`` when a recording was overwritten (:func:`torchvis.core.passes.gradient_pass`).
    """
    resolved = [located(model, one) for one in layers]
    rec = Recording()
    grad_handles: dict[str, RemovableHandle] = {}

    def record(key: str, value: Tensor) -> Tensor:
        def store_grad(grad: Tensor) -> None:
            rec.grads[key] = grad

        rec.calls[key] += 1
        rec.outputs[key] = value
        rec._versions[key] = value._version
        if key in grad_handles:  # a module called again: only its last call is recorded
            grad_handles.pop(key).remove()
        if grads and value.requires_grad:
            grad_handles[key] = value.register_hook(store_grad)
        return value.clone() if copy else value

    def make_hook(addr: Address) -> ForwardHook:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            return _replace(output, addr, record, "returned")

        return hook

    def make_pre_hook(addr: Address) -> ForwardPreHook:
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> Any:
            if not args:
                raise ValueError(f"layer {addr.name!r} was called without a positional input to record")
            first = Address(addr.name, addr.element or 0)  # recorded under addr.key all the same
            return _replace(args, first, lambda _, value: record(addr.key, value), "was called with")

        return pre_hook

    try:
        if inputs:
            with forward_hooks((), ((module, make_pre_hook(addr)) for addr, module in resolved)):
                yield rec
        else:
            with forward_hooks((module, make_hook(addr)) for addr, module in resolved):
                yield rec
    finally:
        for handle in grad_handles.values():
            handle.remove()


def _replace(value: Any, addr: Address, record: Callable[[str, Tensor], Tensor], verb: str) -> Any:
    """``value`` with the tensor ``addr`` points at (``value`` itself, or its element ``addr.element``)
    replaced by ``record(addr.key, tensor)``."""
    if addr.element is None:
        if isinstance(value, Tensor):
            return record(addr.key, value)
        if isinstance(value, (tuple, list)):
            raise ValueError(
                f"layer {addr.name!r} {verb} a {type(value).__name__} of {len(value)} "
                f"({_describe(value)}); choose one element: layer=({addr.name!r}, 0) or "
                f"layer='{addr.name}[0]'"
            )
        raise TypeError(f"layer {addr.name!r} {verb} {type(value).__name__}; capture needs a tensor output")
    if not isinstance(value, (tuple, list)):
        raise ValueError(
            f"layer {addr.key!r}: an index needs a tuple, but layer {addr.name!r} {verb} "
            f"{_describe_one(value)}; drop the index"
        )
    if not -len(value) <= addr.element < len(value):
        raise ValueError(
            f"layer {addr.key!r}: index {addr.element} is out of range for the {len(value)} elements "
            f"({_describe(value)}) that layer {addr.name!r} {verb}"
        )
    element = value[addr.element]
    if not isinstance(element, Tensor):
        raise ValueError(
            f"layer {addr.key!r} is {_describe_one(element)}, not a tensor; choose another index"
        )
    items = list(value)
    items[addr.element] = record(addr.key, element)
    if isinstance(value, list):
        return items
    return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)


def _describe(values: Sequence[Any]) -> str:
    return ", ".join(f"[{i}] {_describe_one(v)}" for i, v in enumerate(values))


def _describe_one(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"Tensor{list(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}({_describe(value)})"
    return type(value).__name__


class ModuleOutput(NamedTuple):
    """One call of a submodule seen by :func:`feature_maps`."""

    name: str
    module: nn.Module
    output: Tensor
    version: int  # output._version when the module returned; a later value means an in-place change


@contextmanager
def feature_maps(model: nn.Module, rank: int = 4) -> Iterator[list[ModuleOutput]]:
    """Record, in the order the modules finish, every submodule's tensor output with ``rank``
    dimensions (``[B,K,h,w]`` by default; 3 for ``[B,K,L]``, 5 for ``[B,K,D,H,W]``).

    Yields a list that fills as the block's forward pass runs; a module called several times
    appears once per call. Outputs are not copied.
    """
    seen: list[ModuleOutput] = []

    def make_hook(name: str) -> ForwardHook:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if isinstance(output, Tensor) and output.dim() == rank:
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
