"""Incremental occlusion: recompute only the part of each layer that a window's change can reach.

The model is traced with ``torch.fx``; the clean image runs once and every node's output is kept.
Each node is then ``CONST`` (does not depend on the input), ``LOCAL`` (a convolution, pooling or
element-wise op whose output at a pixel depends on a bounded neighbourhood of the input: computed
per window on a patch, batched across windows) or ``FULL`` (from the first op that mixes globally,
flatten, linear, adaptive or global pooling, attention, anything unrecognised: run on whole
activations, the patches pasted into copies of the clean ones). Exact up to float rounding.

Nakandala, Kumar & Papakonstantinou, "Incremental and Approximate Inference for Faster Occlusion-based
Deep CNN Explanations" (Krypton), SIGMOD 2019.
"""

from __future__ import annotations

import copy
import enum
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, fx, nn

from torchvis.methods.local_ops import LocalOp, local_op, mutates_input
from torchvis.methods.receptive import Patch, Placement, Region, gather, paste, place, project, union

log = logging.getLogger("torchvis")

# torch.fx patches nn.Module.__call__ process-wide while it traces; two traces at once would undo
# each other's patches.
_TRACE_LOCK = threading.Lock()

# "auto" uses the incremental path when its estimated multiply-adds are at most this share of the
# naive path's and an occluded image costs at least MIN_MACS multiply-adds: on smaller models the
# per-node gathers and Python work cost more than the convolutions they save (the digits CNN,
# 0.3 of the work, ran 0.55x as fast as the naive floor: benchmarks/RESULTS.md).
GAIN_THRESHOLD = 0.5
MIN_MACS = 20e6


class Kind(enum.Enum):
    CONST = "const"
    LOCAL = "local"
    FULL = "full"


@dataclass
class Engine:
    """A traced model, the clean run's activations, and every node's per-window patch placement."""

    model: nn.Module
    graph: fx.Graph
    x: Tensor
    fill: Tensor
    clean: dict[fx.Node, Any]
    kinds: dict[fx.Node, Kind]
    ops: dict[fx.Node, LocalOp]
    placements: dict[fx.Node, Placement] = field(default_factory=dict)
    window: tuple[int, int] = (1, 1)
    padded: dict[fx.Node, tuple[Tensor, tuple[int, int]]] = field(default_factory=dict)
    occluded: Region = field(default_factory=lambda: Region(*[torch.zeros(0, dtype=torch.long)] * 4))
    work: float = 1.0  # estimated multiply-adds, a share of the naive path's
    macs: float = 0.0  # estimated multiply-adds of one naive occluded image (convolutions, linear)
    per_item: int = 1  # values held per occluded image at the widest node

    @cached_property
    def last_uses(self) -> dict[int, list[fx.Node]]:
        """By node index: the nodes whose values are read for the last time there (then freed)."""
        return _last_uses(self.graph)

    @property
    def logits(self) -> Tensor:
        return self.clean[self._output]

    @property
    def _output(self) -> fx.Node:
        return _output(self.graph)


def twin(module: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter, buffer and hook but has attributes of
    its own: tracing runs the forward's Python code, whose side effects (a call counter, a tensor
    constant the tracer stores) must not reach the user's model."""
    copied = copy.copy(module)
    copied._parameters = dict(module._parameters)
    copied._buffers = dict(module._buffers)
    children = module._modules.items()
    copied._modules = {name: child if child is None else twin(child) for name, child in children}
    return copied


def trace(model: nn.Module) -> tuple[fx.Graph, nn.Module] | str:
    """The model's ``torch.fx`` graph and the :func:`twin` it was traced on (and is to run on), or
    why it cannot be traced."""
    traced = twin(model)
    try:
        with _TRACE_LOCK:
            graph = fx.Tracer(autowrap_modules=(), autowrap_functions=()).trace(traced)  # type: ignore[arg-type]
    except Exception as error:  # any failure to trace means: run the model whole
        return f"torch.fx cannot trace it ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return f"its forward takes {len(placeholders)} arguments, not one"
    if not isinstance(next(n for n in graph.nodes if n.op == "output").args[0], fx.Node):
        return "it returns a container, not one tensor"
    return graph, traced


def _output(graph: fx.Graph) -> fx.Node:
    """The node whose value the model returns (``trace`` checks that there is one)."""
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    assert isinstance(out, fx.Node)
    return out


def _shared_first_input(node: fx.Node) -> bool:
    first = node.args[0] if node.args else None
    return isinstance(first, fx.Node) and len(first.users) > 1


def _attribute(model: nn.Module, target: str) -> Any:
    value: Any = model
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


def call(model: nn.Module, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run one graph node's operation on concrete arguments."""
    if node.op == "call_module":
        return model.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)  # type: ignore[operator]
    if node.op == "call_method":
        self_arg, *rest = args
        return getattr(self_arg, str(node.target))(*rest, **kwargs)
    if node.op == "get_attr":
        return _attribute(model, str(node.target))
    raise AssertionError(f"unexpected node {node.op}")


def _run_clean(
    model: nn.Module, graph: fx.Graph, x: Tensor
) -> tuple[dict[fx.Node, Any], dict[fx.Node, Kind], dict[fx.Node, LocalOp]]:
    """Run the clean image, keep every node's output, and classify every node."""
    clean: dict[fx.Node, Any] = {}
    kinds: dict[fx.Node, Kind] = {}
    ops: dict[fx.Node, LocalOp] = {}
    for node in graph.nodes:
        if node.op == "output":
            continue
        if node.op == "placeholder":
            clean[node], kinds[node] = x.clone(), Kind.LOCAL  # a model may change its input in place
            continue
        args, kwargs = _fetch(node, clean.__getitem__)
        if mutates_input(model, node) and args and isinstance(args[0], Tensor):
            args = (args[0].clone(), *args[1:])  # keep the input's clean value for later gathers
        clean[node] = call(model, node, args, kwargs)
        inputs = [kinds[n] for n in node.all_input_nodes]
        if node.op == "get_attr" or all(k is Kind.CONST for k in inputs):
            kinds[node] = Kind.CONST
        elif Kind.FULL in inputs:
            kinds[node] = Kind.FULL
        else:
            op = local_op(model, node, clean, lambda n: kinds[n] is Kind.LOCAL)
            kinds[node] = Kind.FULL if op is None else Kind.LOCAL
            if op is not None:
                ops[node] = op
    return clean, kinds, ops


def _fetch(node: fx.Node, value: Callable[[fx.Node], Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args = fx.node.map_arg(node.args, value)
    kwargs = fx.node.map_arg(node.kwargs, value)
    return tuple(args), dict(kwargs)


def build(
    model: nn.Module,
    x: Tensor,
    fill: Tensor,
    starts: list[tuple[int, int]],
    window: tuple[int, int],
) -> Engine | str:
    """Trace, run the clean image and plan every window's patches; or say why not."""
    if any(module.training for module in model.modules()):
        return "a module is in training mode (batch statistics, dropout)"
    traced = trace(model)
    if isinstance(traced, str):
        return traced
    graph, model = traced
    shared = [n.name for n in graph.nodes if mutates_input(model, n) and _shared_first_input(n)]
    if shared:
        return f"an op changes a tensor in place that other ops also read ({', '.join(shared)})"
    clean, kinds, ops = _run_clean(model, graph, x)
    engine = Engine(model, graph, x, fill, clean, kinds, ops, window=window)
    _plan(engine, starts)
    return engine


def input_region(starts: list[tuple[int, int]], window: tuple[int, int], size: tuple[int, int]) -> Region:
    """The occluded rectangle of every window (cut off at the border)."""
    top = torch.tensor([i for i, _ in starts], dtype=torch.long)
    left = torch.tensor([j for _, j in starts], dtype=torch.long)
    return Region(top, (top + window[0]).clamp(max=size[0]), left, (left + window[1]).clamp(max=size[1]))


def _plan(engine: Engine, starts: list[tuple[int, int]]) -> None:
    """Place every local node's patches and estimate the work against the naive path's."""
    regions: dict[fx.Node, Region] = {}
    naive = incremental = 0.0
    per_item = 1
    for node in engine.graph.nodes:
        value: Any = engine.clean.get(node)
        kind = engine.kinds.get(node)
        if node.op == "placeholder":
            regions[node] = engine.occluded = input_region(starts, engine.window, value.shape[-2:])
        elif kind is Kind.LOCAL:
            op = engine.ops[node]
            sources = [n for n in node.all_input_nodes if engine.kinds[n] is Kind.LOCAL]
            if op.sliding is not None:
                regions[node] = project(regions[sources[0]], op.sliding, value.shape[-2:])
            else:
                regions[node] = union([regions[n] for n in sources])
        if node in regions:
            placement = place(regions[node], value.shape[-2:])
            engine.placements[node] = placement
            if node in engine.ops and engine.ops[node].sliding is not None:
                engine.padded[node] = _padded_input(engine, node, placement)
            area = placement.size[0] * placement.size[1]
            per_item = max(per_item, value.shape[1] * area)
            macs = _macs(engine.model, node, value)
            naive += macs * value.shape[-2] * value.shape[-1]
            incremental += macs * area
        elif kind is Kind.FULL and isinstance(value, Tensor):
            per_item = max(per_item, value[0].numel())
            for source in node.all_input_nodes:
                if engine.kinds[source] is Kind.LOCAL:  # pasted into a full copy
                    per_item = max(per_item, engine.clean[source][0].numel())
            macs = _macs(engine.model, node, value) * _pixels(value)
            naive += macs
            incremental += macs
    engine.work = incremental / naive if naive else 1.0
    engine.macs = naive  # per example: the clean activations are per example
    engine.per_item = per_item


def _padded_input(engine: Engine, node: fx.Node, placement: Placement) -> tuple[Tensor, tuple[int, int]]:
    """The clean input of a sliding node, padded with its padding value as far as any slab reaches,
    and the top/left padding: slabs are then plain gathers."""
    op = engine.ops[node]
    assert op.sliding is not None
    source = next(n for n in node.all_input_nodes if engine.kinds[n] is Kind.LOCAL)
    clean = engine.clean[source]
    (s0, s1), (p0, p1) = op.sliding.stride, op.sliding.padding
    span = op.sliding.span(placement.size)
    bottom = int(placement.top.max()) * s0 - p0 + span[0] - clean.shape[-2]
    right = int(placement.left.max()) * s1 - p1 + span[1] - clean.shape[-1]
    pad = (p1, max(0, right), p0, max(0, bottom))
    padded = torch.nn.functional.pad(clean, pad, value=op.pad) if any(pad) else clean
    return padded, (p0, p1)


def _pixels(value: Tensor) -> int:
    return value.shape[-2] * value.shape[-1] if value.dim() == 4 else 1


def _macs(model: nn.Module, node: fx.Node, value: Tensor) -> float:
    """Multiply-adds per output pixel of a convolution or linear layer (0 for any other node)."""
    if node.op != "call_module":
        return 0.0
    module = model.get_submodule(str(node.target))
    if isinstance(module, nn.Conv2d):
        return float(module.weight.numel())  # C_out * C_in / groups * kh * kw
    if isinstance(module, nn.Linear):
        return float(module.weight.numel() * (value.numel() // value.shape[0] // value.shape[-1]))
    return 0.0


def describe(engine: Engine) -> str:
    """Where the engine stops working on patches, for the debug log."""
    first = next((n for n in engine.graph.nodes if engine.kinds.get(n) is Kind.FULL), None)
    where = f"full forwards from node {first.name!r} ({first.op} {first.target})" if first else "no global op"
    return (
        f"{where}; estimated work {engine.work:.2f} of the naive path's "
        f"({engine.macs / 1e6:.1f} M multiply-adds an image)"
    )


def gains(engine: Engine) -> bool:
    """Whether the incremental path is expected to beat the naive one (see GAIN_THRESHOLD)."""
    return engine.work <= GAIN_THRESHOLD and engine.macs >= MIN_MACS


def chunks(engine: Engine, total: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """Flat item ranges of a size whose widest node holds as many values as ``batch_size`` clean
    images at their widest node: memory like the naive path's at that batch size."""
    widest = max(v[0].numel() for v in engine.clean.values() if isinstance(v, Tensor) and v.dim() >= 1
                 and v.shape[0] == engine.x.shape[0])
    size = max(1, batch_size * widest // engine.per_item)
    for lo in range(0, total, size):
        yield lo, min(total, lo + size)


def occluded_logits(engine: Engine, lo: int, hi: int) -> Tensor:
    """The logits ``[hi-lo, classes]`` of occluded images ``lo .. hi`` (flat index window * B + example)."""
    batch, device = engine.x.shape[0], engine.x.device
    flat = torch.arange(lo, hi)
    windows, examples = flat // batch, (flat % batch).to(device)
    values: dict[fx.Node, Any] = {}
    for index, node in enumerate(engine.graph.nodes):
        if node.op == "output":
            output = node.args[0]
            assert isinstance(output, fx.Node)
            return _value(engine, output, values, examples)
        kind = engine.kinds[node]
        if node.op == "placeholder":
            values[node] = _input_patch(engine, node, windows, examples)
        elif kind is Kind.LOCAL:
            values[node] = _local(engine, node, values, windows, examples)
        elif kind is Kind.FULL:
            args, kwargs = _fetch(node, lambda n: _value(engine, n, values, examples))
            if mutates_input(engine.model, node) and args and isinstance(args[0], Tensor):
                args = (args[0].clone(), *args[1:])  # a patch or clean value another node still reads
            values[node] = call(engine.model, node, args, kwargs)
        for done in engine.last_uses.get(index, ()):
            values.pop(done, None)
    raise AssertionError("the graph has no output")


def _last_uses(graph: fx.Graph) -> dict[int, list[fx.Node]]:
    order = {node: i for i, node in enumerate(graph.nodes)}
    last: dict[fx.Node, int] = {}
    for node in graph.nodes:
        for source in node.all_input_nodes:
            last[source] = max(last.get(source, -1), order[node])
    by_index: dict[int, list[fx.Node]] = {}
    for node, index in last.items():
        by_index.setdefault(index, []).append(node)
    return by_index


def _value(engine: Engine, node: fx.Node, values: dict[fx.Node, Any], examples: Tensor) -> Any:
    kind = engine.kinds[node]
    if kind is Kind.CONST:
        return engine.clean[node]
    if kind is Kind.FULL:
        return values[node]
    return paste(engine.clean[node], examples, values[node])


def _origins(engine: Engine, node: fx.Node, windows: Tensor) -> tuple[Tensor, Tensor]:
    placement = engine.placements[node]
    device = engine.x.device
    return placement.top[windows].to(device), placement.left[windows].to(device)


def _input_patch(engine: Engine, node: fx.Node, windows: Tensor, examples: Tensor) -> Patch:
    """Each item's input patch: the window set to the baseline, the clean image around it."""
    x, placement, device = engine.clean[node], engine.placements[node], engine.x.device
    top, left = _origins(engine, node, windows)
    clean = gather(x, examples, (top, left), placement.size)
    blank = gather(engine.fill, examples, (top, left), placement.size)
    occluded = engine.occluded
    first_row, last_row = occluded.top[windows].to(device), occluded.bottom[windows].to(device)
    first_col, last_col = occluded.left[windows].to(device), occluded.right[windows].to(device)
    rows = top[:, None] + torch.arange(placement.size[0], device=device)
    cols = left[:, None] + torch.arange(placement.size[1], device=device)
    inside = ((rows >= first_row[:, None]) & (rows < last_row[:, None]))[:, :, None] & (
        (cols >= first_col[:, None]) & (cols < last_col[:, None])
    )[:, None, :]
    return Patch(torch.where(inside[:, None], blank, clean), top, left)


def _local(
    engine: Engine, node: fx.Node, values: dict[fx.Node, Any], windows: Tensor, examples: Tensor
) -> Patch:
    """A local node's patches, computed from its inputs' patches."""
    op, placement = engine.ops[node], engine.placements[node]
    top, left = _origins(engine, node, windows)
    sources = [n for n in node.all_input_nodes if engine.kinds[n] is Kind.LOCAL]
    if op.sliding is not None:
        source = sources[0]
        s, p = op.sliding.stride, op.sliding.padding
        start = (top * s[0] - p[0], left * s[1] - p[1])
        span = op.sliding.span(placement.size)
        padded, offset = engine.padded[node]
        slab = gather(padded, examples, start, span, values[source], offset)
        assert op.run is not None
        return Patch(op.run(slab), top, left)
    same: dict[fx.Node, Any] = {}
    for source in sources:
        patch: Patch = values[source]
        if _same_place(engine.placements[source], placement):
            same[source] = patch.values
        else:
            same[source] = gather(engine.clean[source], examples, (top, left), placement.size, patch)
    args, kwargs = _fetch(node, lambda n: same[n] if n in same else engine.clean[n])
    first = node.args[0] if node.args else None
    if mutates_input(engine.model, node) and isinstance(first, fx.Node) and engine.kinds[first] is Kind.CONST:
        args = (args[0].clone(), *args[1:])  # a clean value that later chunks read again
    return Patch(call(engine.model, node, args, kwargs), top, left)


def _same_place(a: Placement, b: Placement) -> bool:
    return a.size == b.size and torch.equal(a.top, b.top) and torch.equal(a.left, b.left)
