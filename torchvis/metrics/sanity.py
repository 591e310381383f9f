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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from torchvis.core.forward import Target, check_finite, check_input, checked_logits, guarded, resolve_target
from torchvis.core.hooks import LayerRef, resolve_layer
from torchvis.methods.cam import EmptyMapWarning
from torchvis.methods.combine import explain
from torchvis.metrics.similarity import constant_rows, minmax, spearman, ssim

__all__ = ["SanityResult", "SanityRow", "randomize_", "sanity_check"]


@dataclass(frozen=True)
class SanityRow:
    """One method at one stage: mean similarity to the original maps over the examples whose maps are
    not constant (``None`` when every map was constant), and how many were constant."""

    method: str
    stage: str
    spearman_abs: float | None
    spearman: float | None
    ssim: float | None
    constant: int
    examples: int


@dataclass(frozen=True)
class SanityResult:
    """The outcome of :func:`sanity_check`: ``rows`` per method and stage, and the maps themselves.

    ``stages[i]`` names the layer re-initialised at stage ``i + 1`` (every earlier one stays
    re-initialised); ``maps[method][0]`` is the original map ``[B,C|1,H,W]`` and ``maps[method][i]``
    the map after stage ``i``; ``images`` and ``target`` are the explained inputs and classes (CPU).
    """

    methods: tuple[str, ...]
    stages: tuple[str, ...]
    rows: tuple[SanityRow, ...]
    maps: dict[str, tuple[Tensor, ...]] = field(repr=False)
    images: Tensor = field(repr=False)
    target: Tensor = field(repr=False)

    def row(self, method: str, stage: str) -> SanityRow:
        """The row of ``method`` after re-initialising down to ``stage``."""
        for row in self.rows:
            if row.method == method and row.stage == stage:
                return row
        raise KeyError(f"no row for method {method!r} at stage {stage!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data: ``{"methods", "stages", "rows": [{field: value}]}`` (JSON-ready)."""
        return {
            "methods": list(self.methods),
            "stages": list(self.stages),
            "rows": [vars(row).copy() for row in self.rows],
        }

    def __str__(self) -> str:
        header = ("method", "randomised down to", "spearman |map|", "spearman", "SSIM", "constant")
        lines = [header] + [
            (row.method, row.stage, _number(row.spearman_abs), _number(row.spearman), _number(row.ssim),
             f"{row.constant}/{row.examples}")
            for row in self.rows
        ]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                for line in lines]
        text.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(text)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def sanity_check(
    model: nn.Module,
    x: Tensor,
    methods: Sequence[str | Callable[..., Tensor]] | str,
    target: Target = None,
    *,
    layers: Sequence[LayerRef] | None = None,
    seed: int = 0,
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
    """
    check_input(x)
    method_list = [methods] if isinstance(methods, str) else list(methods)
    if not method_list:
        raise ValueError("methods is empty; name at least one method")
    names = _layer_names(model, layers)
    options = _layer_option_by_name(model, options)
    with guarded(model, x, grad=False), torch.no_grad():
        logits = checked_logits(model(x.detach().clone()), x.shape[0])
        check_finite(logits)
    t = resolve_target(target, logits)
    twin = copy.deepcopy(model)
    modules = dict(twin.named_modules())
    generators: dict[torch.device, torch.Generator] = {}
    maps = {key: [m.detach()] for key, m in explain(twin, x, t, methods=method_list, **options).items()}
    for name in names:
        randomize_(modules[name], lambda device: _generator(generators, device, seed))
        with warnings.catch_warnings():
            # A randomised model's empty CAMs are expected; they are counted as constant maps.
            warnings.simplefilter("ignore", EmptyMapWarning)
            stage = explain(twin, x, t, methods=method_list, **options)
        for key, m in stage.items():
            maps[key].append(m.detach())
    rows = tuple(
        _compare(key, stage, maps[key][0], maps[key][i + 1])
        for key in maps for i, stage in enumerate(names)
    )
    return SanityResult(
        methods=tuple(maps), stages=tuple(names), rows=rows,
        maps={key: tuple(m.cpu() for m in ms) for key, ms in maps.items()},
        images=x.detach().cpu().clone(), target=t.cpu(),
    )


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
    """Modules given as ``layer=`` are turned into names, which also address them in the copy."""
    layer = options.get("layer")
    if isinstance(layer, nn.Module):
        return {**options, "layer": resolve_layer(model, layer)[0]}
    if isinstance(layer, (list, tuple)):
        named = [resolve_layer(model, one)[0] if isinstance(one, nn.Module) else one for one in layer]
        return {**options, "layer": named}
    return options


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


def _compare(method: str, stage: str, original: Tensor, randomised: Tensor) -> SanityRow:
    """One :class:`SanityRow` from the original and the randomised maps ``[B,C|1,H,W]``."""
    a0, a1 = original.abs().sum(dim=1, keepdim=True), randomised.abs().sum(dim=1, keepdim=True)
    constant = constant_rows(a0.flatten(1)) | constant_rows(a1.flatten(1))
    keep = ~constant
    kept = int(keep.sum())

    def mean(values: Tensor) -> float | None:
        return float(values[keep].nanmean()) if kept else None  # NaN: a signed sum can be constant

    return SanityRow(
        method=method,
        stage=stage,
        spearman_abs=mean(spearman(a0.flatten(1), a1.flatten(1))),
        spearman=mean(spearman(original.sum(dim=1).flatten(1), randomised.sum(dim=1).flatten(1))),
        ssim=float(ssim(minmax(a0[keep]), minmax(a1[keep])).mean()) if kept else None,
        constant=int(constant.sum()),
        examples=original.shape[0],
    )
