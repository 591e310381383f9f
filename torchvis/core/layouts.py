"""Layer outputs laid out as CAMs need them: ``[B,K,*spatial]``, channels first.

Vision transformers output tokens ``[B,N,D]`` (a class token, then one token per patch) and Swin
stages channels-last maps ``[B,H,W,C]``. A layer method's ``reshape=`` says how to read its layer:

- ``None``: the layer already outputs ``[B,K,*spatial]`` (a convolution);
- ``"auto"``: :func:`auto_layout` — tokens of a square-patch ViT, channels-last or channels-first maps;
- a callable ``f(output) -> [B,K,*spatial]``, applied to the activation and to the gradient alike.

The reshape runs on the recorded activation and gradient after the pass: it adds no pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from torchvis.core.hooks import unwrap


@dataclass(frozen=True)
class AutoLayout:
    """``reshape="auto"`` bound to a model's ViT patch size (``None``: inferred from the input size)."""

    patch: int | None = None


Reshape = Callable[[Tensor], Tensor] | str | AutoLayout | None


def patch_size(model: nn.Module) -> int | None:
    """A ViT's square patch size: ``model.patch_size``, else the stride of ``model.conv_proj``."""
    model = unwrap(model)
    size = getattr(model, "patch_size", None)
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    proj = getattr(model, "conv_proj", None)
    if isinstance(proj, nn.Conv2d) and proj.stride[0] == proj.stride[1]:
        return int(proj.stride[0])
    return None


def vit_layer(model: nn.Module) -> str | None:
    """The layer ``layer=None`` takes for a torchvision-style ViT (``encoder.layers`` of blocks with an
    ``ln_1``): the last block's ``ln_1``, whose output is that block's normalised input. The final
    ``encoder.ln`` is no use: only the class token reaches the head, so every patch token's gradient
    there is zero. ``None`` for other models."""
    model = unwrap(model)
    blocks = getattr(getattr(model, "encoder", None), "layers", None)
    if not isinstance(blocks, nn.Module):
        return None
    named = [(name, block) for name, block in blocks.named_children()]
    if not named or not isinstance(getattr(named[-1][1], "ln_1", None), nn.Module):
        return None
    return f"encoder.layers.{named[-1][0]}.ln_1"


def check_reshape(reshape: object) -> None:
    """``reshape`` must be ``None``, ``"auto"`` (or its bound form) or a callable."""
    if isinstance(reshape, str):
        if reshape != "auto":
            raise ValueError(f"reshape must be None, 'auto' or a callable; got {reshape!r}")
    elif reshape is not None and not callable(reshape) and not isinstance(reshape, AutoLayout):
        raise TypeError(f"reshape must be None, 'auto' or a callable; got {type(reshape).__name__}")


def bind(reshape: Reshape, model: nn.Module) -> Reshape:
    """``reshape`` with ``"auto"`` bound to ``model``'s patch size (see :class:`AutoLayout`); refuses
    anything else that is not a reshape (:func:`check_reshape`), before any pass runs."""
    check_reshape(reshape)
    return AutoLayout(patch_size(model)) if isinstance(reshape, str) else reshape


def to_feature_map(
    output: Tensor, reshape: Reshape, spatial: tuple[int, ...], layer: str
) -> Tensor:
    """``output`` of ``layer`` as ``[B,K,*spatial']`` following ``reshape`` (see the module doc);
    ``spatial`` is the input's spatial shape. A reshape (callable or ``"auto"``) must give a tensor
    with the batch of ``output`` and the input's number of spatial dimensions, else ``ValueError``."""
    check_reshape(reshape)
    if reshape is None:
        return output
    if isinstance(reshape, AutoLayout):
        out = auto_layout(output, spatial, layer, patch=reshape.patch)
    elif isinstance(reshape, str):
        out = auto_layout(output, spatial, layer)
    else:
        out = reshape(output)
    if not isinstance(out, Tensor) or out.dim() != len(spatial) + 2 or out.shape[0] != output.shape[0]:
        got = f"shape {list(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"reshape of layer {layer!r} (output {list(output.shape)}) gave {got}; it must give "
            f"[B,K,*spatial] with B={output.shape[0]} and {len(spatial)} spatial dimension(s), like the input"
        )
    return out


def auto_layout(output: Tensor, spatial: tuple[int, ...], layer: str, *, patch: int | None = None) -> Tensor:
    """``reshape="auto"``: ``output`` of ``layer`` as ``[B,K,*grid]`` for an input of spatial shape
    ``spatial``.

    - Tokens ``[B,N,D]`` for a 2-D input ``H x W``: a grid of ``(H/p) x (W/p)`` patches, after a class
      token when ``N`` is one more than that. The patch size ``p`` is the model's (``patch``), else the
      one for which ``N`` or ``N-1`` tokens tile the input.
    - ``[B,K,*grid]`` or ``[B,*grid,K]`` (Swin stages): the reading whose grid fits the input (each
      size at most the input's, strides within 2x of each other) is taken; where both fit, the one
      with the more equal strides, channels first on a tie. The result is channels first.
    Anything else is a ``ValueError`` naming the layer and the shape.
    """
    shape = list(output.shape)
    rank = len(spatial)
    if output.dim() == 3 and rank == 2:
        grid, extra = _token_grid(output.shape[1], spatial, patch)
        if grid is None:
            known = f"patch size {patch}" if patch is not None else "no patch size found on the model"
            raise ValueError(
                f"reshape='auto' cannot infer the token grid of layer {layer!r}: output {shape} "
                f"({shape[1]} tokens) for an input of {spatial[0]}x{spatial[1]} ({known}); neither all "
                "tokens nor all but a leading class token tile the input in square patches. Pass "
                "reshape=callable returning [B,D,h,w]"
            )
        tokens = output[:, extra:]
        return tokens.reshape(output.shape[0], *grid, output.shape[2]).permute(0, 3, 1, 2)
    if output.dim() == rank + 2:
        first, last = _spread(shape[2:], spatial), _spread(shape[1:-1], spatial)
        if first is not None and (last is None or first <= last):
            return output
        if last is not None:
            return output.permute(0, output.dim() - 1, *range(1, output.dim() - 1))
    raise ValueError(
        f"reshape='auto' cannot read layer {layer!r}: output {shape} is neither tokens [B,N,D] of a 2-D "
        f"input nor a channels-first or channels-last map matching the input's spatial shape "
        f"{list(spatial)}; pass reshape=callable returning [B,K,*spatial]"
    )


def _token_grid(
    tokens: int, spatial: tuple[int, ...], patch: int | None
) -> tuple[tuple[int, int] | None, int]:
    height, width = spatial
    for extra in (1, 0):  # a class token first (torchvision's ViT), then none
        n = tokens - extra
        if n < 1:
            continue
        p = patch
        if p is None:
            root = math.isqrt(height * width // n) if height * width % n == 0 else 0
            p = root if root > 0 and root * root * n == height * width else None
        if p and height % p == 0 and width % p == 0 and (height // p) * (width // p) == n:
            return (height // p, width // p), extra
    return None, 0


def _spread(grid: list[int], spatial: tuple[int, ...]) -> float | None:
    """How unequal the strides from ``spatial`` to ``grid`` are (1.0: equal); ``None`` where ``grid``
    cannot be a map of the input (a size above the input's, or strides more than 2x apart)."""
    if any(g < 1 or g > s for g, s in zip(grid, spatial, strict=True)):
        return None
    strides = [s / g for g, s in zip(grid, spatial, strict=True)]
    spread = max(strides) / min(strides)
    return spread if spread <= 2 else None
