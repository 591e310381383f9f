"""A Keras-style model summary: one row per layer call, output shapes, parameter counts and totals.

Rows are the modules that compute something themselves: leaves (no children) and containers that
own parameters directly. A module called several times (a ResNet block's ``relu``) gets one row per
call; its parameters are counted on the first. Totals come from ``model.parameters()`` (each shared
tensor once), so they count modules that did not run too — the summary then says how many.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from torchvis.core.forward import guarded
from torchvis.core.hooks import forward_hooks

__all__ = ["Row", "Summary", "TextWriter", "example_input", "log_summary", "summary"]

Shape = tuple[int, ...]


class TextWriter(Protocol):
    """Anything with TensorBoard's ``add_text`` (``torch.utils.tensorboard.SummaryWriter``)."""

    def add_text(self, tag: str, text_string: str, global_step: int | None = None) -> None: ...


@dataclass(frozen=True)
class Row:
    """One call of one module.

    ``output_shapes`` holds the shape of every tensor in the output (one for most layers; none for
    an output without tensors). ``params`` counts the module's own parameters (not its children's);
    ``call`` is 1 for the module's first call, 2 for its second, and so on.
    """

    name: str
    type: str
    output_shapes: tuple[Shape, ...]
    params: int
    trainable_params: int
    call: int

    @property
    def label(self) -> str:
        name = self.name or "(model)"
        return f"{name} #{self.call}" if self.call > 1 else name

    @property
    def params_text(self) -> str:
        if self.call > 1 and self.params:
            return "(shared)"
        return f"{self.params:,}"

    @property
    def trainable_text(self) -> str:
        if self.params == 0 or self.call > 1:
            return "-"
        if self.trainable_params == self.params:
            return "yes"
        return "no" if self.trainable_params == 0 else "partly"

    @property
    def shape_text(self) -> str:
        return _shape_text(self.output_shapes)


def _shape_text(shapes: tuple[Shape, ...]) -> str:
    return ", ".join(f"[{', '.join(map(str, s))}]" for s in shapes) or "-"


@dataclass(frozen=True)
class Summary:
    """What :func:`summary` found. ``str(s)`` is the table; ``s.to_markdown()`` the TensorBoard text.

    ``size_bytes`` counts parameters and buffers (each tensor once); ``unused_params`` the parameters
    of modules whose hooks never fired (not called, or called through ``.forward()``).
    """

    model_type: str
    input_shape: Shape
    rows: tuple[Row, ...]
    total_params: int
    trainable_params: int
    unused_params: int
    size_bytes: int

    @property
    def non_trainable_params(self) -> int:
        return self.total_params - self.trainable_params

    @property
    def size_mib(self) -> float:
        return self.size_bytes / 2**20

    def _totals(self) -> list[str]:
        lines = [
            f"Total params: {self.total_params:,}",
            f"Trainable params: {self.trainable_params:,}",
            f"Non-trainable params: {self.non_trainable_params:,}",
            f"Model size: {self.size_mib:.2f} MiB (parameters and buffers)",
        ]
        if self.unused_params:
            lines.append(f"Params in modules that did not run: {self.unused_params:,}")
        return lines

    def __str__(self) -> str:
        header = ("Layer (type)", "Output shape", "Param #", "Trainable")
        cells = [(f"{r.label} ({r.type})", r.shape_text, r.params_text, r.trainable_text) for r in self.rows]
        widths = [max(len(c[i]) for c in [header, *cells]) for i in range(4)]

        def line(c: tuple[str, str, str, str]) -> str:
            return "  ".join(
                (c[0].ljust(widths[0]), c[1].ljust(widths[1]), c[2].rjust(widths[2]), c[3])
            ).rstrip()

        rule = "=" * (sum(widths) + 6)
        title = f"Model: {self.model_type}, input {list(self.input_shape)}"
        return "\n".join([title, line(header), rule, *map(line, cells), rule, *self._totals()]) + "\n"

    def to_markdown(self) -> str:
        """The summary as a markdown table (TensorBoard's text tab renders markdown)."""
        head = [
            f"**{self.model_type}**, input `{list(self.input_shape)}`",
            "",
            "| Layer | Type | Output shape | Param # | Trainable |",
            "|:--|:--|:--|--:|:--|",
        ]
        body = [
            f"| `{r.label}` | {r.type} | {r.shape_text} | {r.params_text} | {r.trainable_text} |"
            for r in self.rows
        ]
        return "\n".join([*head, *body, "", *(f"- {t}" for t in self._totals())]) + "\n"


def example_input(model: nn.Module, input: Tensor | Sequence[int]) -> Tensor:
    """``input`` itself if it is a tensor, else a tensor of that shape on the model's device and dtype.

    A 3-element shape is ``[C,H,W]`` and gets a batch of 1; any other length is the full shape. The
    values are standard normal from a private generator seeded with 0 (the global RNG is untouched).
    """
    if isinstance(input, Tensor):
        return input
    shape = tuple(int(s) for s in input)
    if not shape or min(shape) < 1:
        raise ValueError(f"input_size must be a non-empty shape of positive sizes, got {shape}")
    if len(shape) == 3:
        shape = (1, *shape)
    tensors = chain(model.parameters(), model.buffers())
    like = next((t for t in tensors if t.is_floating_point()), None)
    device = like.device if like is not None else torch.device("cpu")
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    values = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return values.to(device=device, dtype=dtype)


def _shapes(output: Any) -> tuple[Shape, ...]:
    if isinstance(output, Tensor):
        return (tuple(output.shape),)
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return tuple(chain.from_iterable(_shapes(o) for o in output))
    return ()


@dataclass(eq=False)  # calls are told apart by identity
class _Call:
    name: str
    module: nn.Module
    call: int
    shapes: tuple[Shape, ...] | None = None  # None until the module returns


def _own_params(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters(recurse=False))


def _failure(calls: list[_Call], running: list[_Call], err: BaseException) -> RuntimeError:
    # Like torchinfo: say where the forward stopped, with the shapes that led there.
    done = [c for c in calls if c.shapes is not None]
    where = [f"in layer {running[-1].name!r} ({type(running[-1].module).__name__})"] if running else []
    if done:
        last = ", ".join(f"{c.name} {_shape_text(c.shapes or ())}" for c in done[-5:])
        where.append(f"after {len(done)} layer calls (last: {last})")
    else:
        where.append("before any layer returned")
    return RuntimeError(f"summary: the forward pass failed {' '.join(where)}: {err}")


def summary(model: nn.Module, input: Tensor | Sequence[int]) -> Summary:
    """Run ``model`` once on ``input`` and tabulate every layer call.

    ``input`` is an example tensor or a shape (see :func:`example_input`: ``(1, 28, 28)`` and
    ``(1, 1, 28, 28)`` both give one digit). The forward runs in eval mode under ``torch.no_grad``;
    every submodule's mode, the global RNG and the model's hooks are as before afterwards. An error
    in the forward is re-raised as ``RuntimeError`` naming the layer that failed and those before it.
    """
    x = example_input(model, input)
    counts: Counter[nn.Module] = Counter()
    calls: list[_Call] = []
    running: list[_Call] = []

    def pre_hook(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            counts[module] += 1
            calls.append(_Call(name, module, counts[module]))
            running.append(calls[-1])

        return hook

    def post_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        call = next(c for c in reversed(running) if c.module is module)
        running.remove(call)
        call.shapes = _shapes(output)

    rowed = [(n, m) for n, m in model.named_modules() if not any(m.children()) or _own_params(m)]
    try:
        with guarded(model, x, grad=False), torch.no_grad(), forward_hooks(
            ((m, post_hook) for _, m in rowed), pre_hooks=((m, pre_hook(n)) for n, m in rowed)
        ):
            model(x)
    except Exception as err:
        raise _failure(calls, running, err) from err

    rows: list[Row] = []
    for c in calls:
        own = _own_params(c.module)
        trainable = sum(p.numel() for p in own if p.requires_grad)
        rows.append(Row(c.name, type(c.module).__name__, c.shapes or (), sum(p.numel() for p in own),
                        trainable, c.call))
    params = list(model.parameters())
    ran = {id(p) for c in calls for p in _own_params(c.module)}
    return Summary(
        model_type=type(model).__name__,
        input_shape=tuple(x.shape),
        rows=tuple(rows),
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        unused_params=sum(p.numel() for p in params if id(p) not in ran),
        size_bytes=sum(t.numel() * t.element_size() for t in chain(params, model.buffers())),
    )


def log_summary(writer: TextWriter, result: Summary, *, tag: str = "summary", step: int = 0) -> None:
    """Write the summary to TensorBoard's text tab as a markdown table."""
    writer.add_text(tag, result.to_markdown(), global_step=step)
