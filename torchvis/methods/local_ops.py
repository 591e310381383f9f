"""Which graph nodes act locally in space, for incremental occlusion.

A local node's output at a pixel depends only on a bounded neighbourhood of its inputs at that pixel:
element-wise ops (activations, batch norm in eval mode, additions, channel concatenation) and
sliding-window layers (convolution with zero padding, max pooling, average pooling). Anything else
is global, and incremental occlusion runs it on whole activations.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from torchvis.methods.receptive import Sliding

POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout2d,  # identities in eval mode (incremental occlusion requires it)
)

POINTWISE_FUNCTIONS: frozenset[Any] = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.relu, torch.relu_, torch.sigmoid,
    torch.tanh, F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.sigmoid, F.tanh, F.softplus,
})

POINTWISE_METHODS = frozenset({
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "add", "add_", "sub", "sub_", "mul",
    "mul_", "div", "div_", "neg", "contiguous", "clone",
})

INPLACE_FUNCTIONS: frozenset[Any] = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, torch.relu_,
})


@dataclass(frozen=True)
class LocalOp:
    """A local node: element-wise (``sliding`` is None), or a sliding-window layer computed on a
    slab of its input by ``run`` (no padding: the slab carries it, filled with ``pad``)."""

    sliding: Sliding | None = None
    pad: float = 0.0
    run: Callable[[Tensor], Tensor] | None = None


def mutates_input(model: nn.Module, node: fx.Node) -> bool:
    """Whether the node writes into its first argument (``inplace=True``, ``+=``, ``x.relu_()``)."""
    if node.op == "call_module":
        return bool(getattr(model.get_submodule(str(node.target)), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_function":
        return node.target in INPLACE_FUNCTIONS or node.kwargs.get("inplace") is True
    return False


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _conv(module: nn.Conv2d) -> LocalOp | None:
    if module.padding_mode != "zeros":
        return None
    kernel, dilation = _pair(module.kernel_size), _pair(module.dilation)
    if module.padding == "valid":
        padding = (0, 0)
    elif module.padding == "same":  # the left/top side gets the smaller half, as in torch
        padding = (dilation[0] * (kernel[0] - 1) // 2, dilation[1] * (kernel[1] - 1) // 2)
    else:
        padding = _pair(module.padding)
    stride = _pair(module.stride)

    def run(slab: Tensor) -> Tensor:
        return F.conv2d(slab, module.weight, module.bias, stride, 0, dilation, module.groups)

    return LocalOp(Sliding(kernel, stride, padding, dilation), 0.0, run)


def _max_pool(module: nn.MaxPool2d) -> LocalOp | None:
    if module.return_indices:
        return None
    kernel = _pair(module.kernel_size)
    stride = _pair(module.stride if module.stride is not None else module.kernel_size)
    dilation = _pair(module.dilation)

    def run(slab: Tensor) -> Tensor:
        return F.max_pool2d(slab, kernel, stride, 0, dilation)

    # Positions past the border (padding, or ceil_mode's partial windows) never win a maximum.
    return LocalOp(Sliding(kernel, stride, _pair(module.padding), dilation), float("-inf"), run)


def _avg_pool(module: nn.AvgPool2d) -> LocalOp | None:
    padding = _pair(module.padding)
    if module.ceil_mode or (padding != (0, 0) and not module.count_include_pad):
        return None  # the divisor would change at the border
    kernel = _pair(module.kernel_size)
    stride = _pair(module.stride if module.stride is not None else module.kernel_size)
    divisor = module.divisor_override

    def run(slab: Tensor) -> Tensor:
        return F.avg_pool2d(slab, kernel, stride, 0, False, True, divisor)

    return LocalOp(Sliding(kernel, stride, padding, (1, 1)), 0.0, run)


def _sliding(module: nn.Module) -> LocalOp | None:
    if type(module) is nn.Conv2d:
        return _conv(module)
    if type(module) is nn.MaxPool2d:
        return _max_pool(module)
    if type(module) is nn.AvgPool2d:
        return _avg_pool(module)
    return None


def _pointwise(model: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = model.get_submodule(str(node.target))
        if isinstance(module, nn.BatchNorm2d):
            return not module.training and module.running_mean is not None
        return type(module) in POINTWISE_MODULES
    if node.op == "call_method":
        return str(node.target) in POINTWISE_METHODS
    if node.op == "call_function":
        if node.target is torch.cat:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            return dim in (1, -3)
        return node.target in POINTWISE_FUNCTIONS
    return False


def _spatially_constant(value: Any) -> bool:
    """A value that broadcasts the same over every pixel (a number, a ``[C,1,1]`` tensor)."""
    if not isinstance(value, Tensor):
        return True
    return value.numel() == 1 or (value.dim() >= 2 and value.shape[-2:] == (1, 1))


def local_op(
    model: nn.Module, node: fx.Node, clean: dict[fx.Node, Any], is_local: Callable[[fx.Node], bool]
) -> LocalOp | None:
    """How to compute ``node`` on patches, or None when it is global. ``clean`` holds the clean
    run's values (of this node and its inputs); ``is_local`` tells which inputs are patches."""
    out = clean[node]
    sources = [n for n in node.all_input_nodes if is_local(n)]
    if not isinstance(out, Tensor) or out.dim() != 4 or not sources:
        return None
    if any(not isinstance(clean[n], Tensor) or clean[n].dim() != 4 for n in sources):
        return None
    if node.op == "call_module" and len(node.all_input_nodes) == 1 and not node.kwargs:
        sliding = _sliding(model.get_submodule(str(node.target)))
        if sliding is not None:
            return sliding
    if not _pointwise(model, node):
        return None
    batch, size = out.shape[0], out.shape[-2:]
    if any(clean[n].shape[0] != batch or clean[n].shape[-2:] != size for n in sources):
        return None
    others = [clean[n] for n in node.all_input_nodes if not is_local(n)]
    return LocalOp() if all(_spatially_constant(v) for v in others) else None
