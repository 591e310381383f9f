"""Sanity checks for maps: does a map change when the model it explains is randomised?

Adebayo, Gilmer, Muelly, Goodfellow, Hardt & Kim, "Sanity Checks for Saliency Maps", NeurIPS 2018,
cascading model-parameter randomisation: the layers are re-initialised from the output down, one
more per stage, on a copy of the model; a map that stays alike while the model it explains is
destroyed does not explain the model.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from torchvis.core.forward import check_finite, guarded
from torchvis.core.hooks import LayerRef, address, is_element, resolve_layer
from torchvis.core.inputs import InputLike, as_inputs
from torchvis.core.targets import Resolved, Target, is_function, resolve_target, score_of
from torchvis.methods.cam import EmptyMapWarning
from torchvis.methods.combine import explain
from torchvis.metrics.similarity import constant_rows, minmax, spearman, ssim

__all__ = ["SanityResult", "SanityRow", "randomize_", "sanity_check"]


@dataclass(frozen=True)
class SanityRow:
    """One method at one stage: mean similarity to the original maps over the examples whose maps are
    not constant (``None`` when every map was constant), and how many were constant. ``input``: which
    input of a tuple ``x`` the maps belong to (``None`` for a single tensor); ``ssim`` is ``None``
    for maps that are not images."""

    method: str
    stage: str
    spearman_abs: float | None
    spearman: float | None
    ssim: float | None
    constant: int
    examples: int
    input: int | None = None


@dataclass(frozen=True)
class SanityResult:
    """The outcome of :func:`sanity_check`: ``rows`` per method and stage, and the maps themselves.

    ``stages[i]`` names the layer re-initialised at stage ``i + 1`` (every earlier one stays
    re-initialised); ``maps[method][0]`` is the original map ``[B,C|1,H,W]`` and ``maps[method][i]``
    the map after stage ``i`` (for a tuple ``x``, what the method returns: a tuple of maps, one per
    input, or one map over the first input); ``images`` and ``target`` are the explained inputs (a
    tuple for a tuple ``x``) and classes (CPU; a callable target is kept as it is).
    """

    methods: tuple[str, ...]
    stages: tuple[str, ...]
    rows: tuple[SanityRow, ...]
    maps: dict[str, tuple[Any, ...]] = field(repr=False)
    images: Tensor | tuple[Tensor, ...] = field(repr=False)
    target: Resolved = field(repr=False)

    def row(self, method: str, stage: str, input: int | None = None) -> SanityRow:
        """The row of ``method`` after re-initialising down to ``stage`` (for ``input`` of a tuple ``x``;
        ``None``: its first row; a row without an input serves every input)."""
        for row in self.rows:
            if row.method == method and row.stage == stage and (input is None or row.input in (None, input)):
                return row
        raise KeyError(f"no row for method {method!r} at stage {stage!r}" + (
            "" if input is None else f" for input {input}"))

    def to_dict(self) -> dict[str, Any]:
        """Plain data: ``{"methods", "stages", "rows": [{field: value}]}`` (JSON-ready); ``input`` only
        when ``x`` was a tuple."""
        many = any(row.input is not None for row in self.rows)
        return {
            "methods": list(self.methods),
            "stages": list(self.stages),
            "rows": [{k: v for k, v in vars(row).items() if many or k != "input"} for row in self.rows],
        }

    def __str__(self) -> str:
        header: tuple[str, ...] = ("method", "randomised down to", "spearman |map|", "spearman", "SSIM",
                                   "constant")
        lines = [header] + [
            (row.method, row.stage, _number(row.spearman_abs), _number(row.spearman), _number(row.ssim),
             f"{row.constant}/{row.examples}")
            for row in self.rows
        ]
        if any(row.input is not None for row in self.rows):
            header = ("method", "input", *header[1:])
            lines = [header] + [(line[0], str(row.input), *line[1:])
                                for line, row in zip(lines[1:], self.rows, strict=True)]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                for line in lines]
        text.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(text)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def sanity_check(
    model: nn.Module,
    x: InputLike,
    methods: Sequence[str | Callable[..., Any]] | str,
    target: Target = None,
    *,
    layers: Sequence[LayerRef] | None = None,
    seed: int = 0,
    forward_args: Any = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> SanityResult:
    """Cascading model-parameter randomisation of each method's maps of ``x`` [B,C,H,W].

    Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018, section 3.1. On a deep copy of
    ``model`` (the model itself is never touched), the parameters of ``layers`` (default: every
    module that has parameters of its own, last first) are re-initialised one more per stage, from
    a generator seeded by ``seed`` (see :func:`randomize_`); each method's maps are recomputed for
    the same targets (``target=None``: the classes the original model predicts) with
    :func:`torchvis.explain` (``options``, e.g. ``layer=`` for Grad-CAM, go to it). Per method and
    stage: the Spearman correlation of ``|map|`` (summed over channels) with the original, the signed
    Spearman correlation (channels summed), and the SSIM of the [0,1]-normalised ``|map|``, averaged
    over the examples whose original and randomised ``|map|`` are not constant; constant ones are
    counted instead. Returns a :class:`SanityResult` (``str()`` is the table).

    Other inputs: ``x`` may be any tensor ``[B, ...]`` or a tuple of them; ``forward_args`` /
    ``forward_kwargs`` go to the model with every call and ``target`` may be a callable
    (:mod:`torchvis.core.targets`). Maps are compared **per input** — one row per method, stage and
    input of a tuple, so a small input is not drowned by a large one — with channels summed for
    inputs that have them (``[B,C,*spatial]``) and elements compared as they are for ``[B,N]``; SSIM
    only for image maps ``[B,C|1,H,W]`` (``None`` otherwise).
    """
    inputs = as_inputs(x, forward_args, forward_kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"sanity_check re-initialises the model's layers (on a copy), so it needs an nn.Module; got a "
            f"plain {type(model).__name__}"
        )
    method_list = [methods] if isinstance(methods, str) else list(methods)
    if not method_list:
        raise ValueError("methods is empty; name at least one method")
    names = _layer_names(model, layers)
    options = _layer_option_by_name(model, options)
    with guarded(model, inputs.first, grad=False), torch.no_grad():
        output = inputs.call(model, [t.detach().clone() for t in inputs.tensors])
        t = resolve_target(target, output, inputs.batch)
        check_finite(output if isinstance(output, Tensor) else score_of(output, t, inputs.batch))
    extra = {"forward_args": forward_args, "forward_kwargs": forward_kwargs}
    options = {**options, **{key: value for key, value in extra.items() if value is not None}}
    twin = copy.deepcopy(model)
    modules = dict(twin.named_modules())
    generators: dict[torch.device, torch.Generator] = {}
    maps = {key: [_detached(m)] for key, m in explain(twin, x, t, methods=method_list, **options).items()}
    for name in names:
        randomize_(modules[name], lambda device: _generator(generators, device, seed))
        with warnings.catch_warnings():
            # A randomised model's empty CAMs are expected; they are counted as constant maps.
            warnings.simplefilter("ignore", EmptyMapWarning)
            stage = explain(twin, x, t, methods=method_list, **options)
        for key, m in stage.items():
            maps[key].append(_detached(m))
    rows = tuple(
        row
        for key in maps for i, stage in enumerate(names)
        for row in _compare_maps(key, stage, maps[key][0], maps[key][i + 1], inputs.was_tuple)
    )
    return SanityResult(
        methods=tuple(maps), stages=tuple(names), rows=rows,
        maps={key: tuple(_cpu(m) for m in ms) for key, ms in maps.items()},
        images=inputs.pack([t.detach().cpu().clone() for t in inputs.tensors]),
        target=t if is_function(t) else t.cpu(),  # type: ignore[union-attr]
    )


def _detached(maps: Any) -> Any:
    return tuple(m.detach() for m in maps) if isinstance(maps, tuple) else maps.detach()


def _cpu(maps: Any) -> Any:
    return tuple(m.cpu() for m in maps) if isinstance(maps, tuple) else maps.cpu()


def _layer_names(model: nn.Module, layers: Sequence[LayerRef] | None) -> list[str]:
    """The dotted names to re-initialise, in order; by default every module with parameters of its
    own, last first."""
    if layers is None:
        names = [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
        if not names:
            raise ValueError("the model has no parameters to randomise")
        return names[::-1]
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    names = [resolve_layer(model, layer)[0] for layer in layers]
    if not names:
        raise ValueError("layers is empty; name at least one layer, or pass None for every layer")
    for name in names:
        if not any(True for _ in model.get_submodule(name).parameters()):
            raise ValueError(f"layer {name!r} has no parameters to randomise")
    if len(set(names)) != len(names):
        raise ValueError(f"layers names a layer twice: {names}")
    return names


def _layer_option_by_name(model: nn.Module, options: dict[str, Any]) -> dict[str, Any]:
    """Layers given as modules (or ``(module, index)``) are turned into their keys (``"name"``,
    ``"name[index]"``), which also address them in the copy; a list of layers stays a list."""
    layer = options.get("layer")
    if layer is None or isinstance(layer, str):
        return options

    def key(one: Any) -> Any:
        return one if one is None or isinstance(one, str) else address(model, one).key

    many = isinstance(layer, list) or (isinstance(layer, tuple) and not is_element(layer))
    return {**options, "layer": [key(one) for one in layer] if many else key(layer)}


def _generator(
    generators: dict[torch.device, torch.Generator], device: torch.device, seed: int
) -> torch.Generator:
    if device not in generators:
        generators[device] = torch.Generator(device=device).manual_seed(seed)
    return generators[device]


def randomize_(layer: nn.Module, generator: Callable[[torch.device], torch.Generator]) -> None:
    """Re-initialise every parameter under ``layer`` in place, drawing from ``generator(device)``.

    PyTorch's default for convolutions and linear layers, whatever the module: a weight of two or
    more dimensions from ``kaiming_uniform_(a=sqrt(5))``, i.e. U(+-1/sqrt(fan_in)), and every other
    parameter of the module (bias, norm scale and shift) from U(+-1/sqrt(fan_in)) of the module's
    weight, U(-1, 1) when it has none. Buffers (running statistics) are kept.
    """
    with torch.no_grad():
        for module in layer.modules():
            params = list(module.parameters(recurse=False))
            matrix = next((p for p in params if p.dim() >= 2), None)
            bound = 1 / math.sqrt(matrix[0].numel()) if matrix is not None else 1.0
            for p in params:
                if p.dim() >= 2:
                    nn.init.kaiming_uniform_(p, a=math.sqrt(5), generator=generator(p.device))
                else:
                    nn.init.uniform_(p, -bound, bound, generator=generator(p.device))


def _compare_maps(method: str, stage: str, original: Any, randomised: Any, many: bool) -> list[SanityRow]:
    """The rows of one method and stage: one per input for a tuple of maps; for a tuple ``x``, a
    single map (a CAM over the first input) is input 0."""
    if isinstance(original, tuple):
        pairs = enumerate(zip(original, randomised, strict=True))
        return [_compare(method, stage, a, b, i) for i, (a, b) in pairs]
    return [_compare(method, stage, original, randomised, 0 if many else None)]


def _compare(
    method: str, stage: str, original: Tensor, randomised: Tensor, input: int | None = None
) -> SanityRow:
    """One :class:`SanityRow` from the original and the randomised maps ``[B,C|1,*spatial]`` or ``[B,N]``."""
    if original.dim() == 2:  # features: no channels
        original, randomised = original[:, None], randomised[:, None]
    a0, a1 = original.abs().sum(dim=1, keepdim=True), randomised.abs().sum(dim=1, keepdim=True)
    constant = constant_rows(a0.flatten(1)) | constant_rows(a1.flatten(1))
    image = original.dim() == 4
    keep = ~constant
    kept = int(keep.sum())

    def mean(values: Tensor) -> float | None:
        return float(values[keep].nanmean()) if kept else None  # NaN: a signed sum can be constant

    return SanityRow(
        method=method,
        stage=stage,
        spearman_abs=mean(spearman(a0.flatten(1), a1.flatten(1))),
        spearman=mean(spearman(original.sum(dim=1).flatten(1), randomised.sum(dim=1).flatten(1))),
        ssim=float(ssim(minmax(a0[keep]), minmax(a1[keep])).mean()) if kept and image else None,
        constant=int(constant.sum()),
        examples=original.shape[0],
        input=input,
    )
