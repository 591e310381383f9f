"""Activation maximization: optimise an input so that one unit of the network responds maximally.

A unit is a small value: ``Channel(layer, index)`` (the spatial mean of one channel of a layer's
output, or one neuron of a ``[B,K]`` output) or ``Logit(index)``. :func:`maximize` optimises one image
per unit, all in one batch; row ``u`` is pushed towards unit ``u`` only (the objective is the sum of
each row's own unit, and rows do not interact in eval mode).

Regularisers, so that the result is a pattern rather than adversarial noise:

- ``l2``: the mean squared input value (Simonyan et al. 2014; Erhan et al. 2009 bound the norm).
- ``tv``: the mean squared difference of neighbouring pixels, total variation with beta = 2
  (Mahendran & Vedaldi, "Understanding Deep Image Representations by Inverting Them", CVPR 2015).
- ``jitter``: a random circular shift of up to ``jitter`` pixels before every forward pass.
- ``blur_every``: a Gaussian blur of the pixels every few steps (Yosinski et al., "Understanding
  Neural Networks Through Deep Visualization", ICML-W 2015); ``param="pixel"`` only.
- ``param="fourier"``: pixels as an inverse FFT of a spectrum scaled by 1/frequency, which makes
  Adam's steps spatially decorrelated (Olah, Mordvintsev & Schubert, "Feature Visualization",
  Distill 2017).
- ``mean``/``std`` given: the picture lives in [0, 1] (a sigmoid) and the model sees
  ``(picture - mean) / std``, so no pixel leaves the range real inputs have.

The result is the raw input the model saw, ``[U,C,H,W]``; :func:`to_images` turns it into pictures in
[0, 1]. To stream them to TensorBoard: ``writer.add_images("maximize", to_images(x, mean, std), step)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from torchvis.core import hooks
from torchvis.core.forward import check_input, checked_logits, guarded
from torchvis.core.hooks import LayerRef
from torchvis.rendering import image

__all__ = ["Channel", "Logit", "Unit", "maximize", "parse_unit", "to_images", "unit_activations"]

Param = Literal["pixel", "fourier"]


def _check_index(index: object) -> None:
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"a unit index is an int, not {type(index).__name__}")
    if index < 0:
        raise ValueError(f"a unit index must be >= 0, got {index}")


@dataclass(frozen=True)
class Channel:
    """Channel ``index`` of ``layer``'s output ``[B,K,h,w]``, averaged over space (or neuron
    ``index`` of a ``[B,K]`` output)."""

    layer: LayerRef
    index: int

    def __post_init__(self) -> None:
        _check_index(self.index)


@dataclass(frozen=True)
class Logit:
    """Output ``index`` of a model returning ``[B, classes]`` logits (pre-softmax, as Simonyan et al.
    advise: a softmax output can rise by lowering the other classes)."""

    index: int

    def __post_init__(self) -> None:
        _check_index(self.index)


Unit = Channel | Logit


def parse_unit(text: str) -> Unit:
    """``"logit:3"`` -> ``Logit(3)``; ``"layer4.1.conv2:12"`` -> ``Channel("layer4.1.conv2", 12)``.

    For the command line; ``logit`` always means the model's output, never a layer of that name.
    """
    layer, sep, index = text.rpartition(":")
    if not sep or not layer or not index.strip().isdigit():
        raise ValueError(f"a unit is written 'logit:N' or 'LAYER:N' with N >= 0, not {text!r}")
    return Logit(int(index)) if layer == "logit" else Channel(layer, int(index))


def _unit_matrix(model: nn.Module, units: Sequence[Unit], names: Sequence[str | None], x: Tensor) -> Tensor:
    """Every unit's value on every image: ``[B,U]``, connected to the graph."""
    batch = x.shape[0]
    wanted = sorted({name for name in names if name is not None})
    with hooks.capture(model, wanted, grads=False) as rec:  # the units' values; autograd gives the rest
        out = model(x)
    columns = []
    for unit, name in zip(units, names, strict=True):
        if isinstance(unit, Logit):
            logits = checked_logits(out, batch)
            if unit.index >= logits.shape[1]:
                raise ValueError(f"{unit} is out of range: the model has {logits.shape[1]} outputs")
            columns.append(logits[:, unit.index])
            continue
        assert name is not None
        if rec.calls[name] > 1:
            raise ValueError(f"layer {name!r} runs {rec.calls[name]} times per forward pass; "
                             "choose a module that runs once")
        act = rec.output(name)
        if act.dim() < 2:
            raise ValueError(f"layer {name!r} returns shape {list(act.shape)}; a channel needs [B,K,...]")
        if unit.index >= act.shape[1]:
            raise ValueError(f"Channel({name!r}, {unit.index}) is out of range: layer {name!r} has "
                             f"{act.shape[1]} channels (output shape {list(act.shape)})")
        columns.append(act[:, unit.index].reshape(batch, -1).mean(dim=1))
    return torch.stack(columns, dim=1)


def _resolve_units(model: nn.Module, units: Unit | Sequence[Unit]) -> tuple[list[Unit], list[str | None]]:
    listed = [units] if isinstance(units, Channel | Logit) else list(units)
    if not listed:
        raise ValueError("no units given")
    for unit in listed:
        if not isinstance(unit, Channel | Logit):
            hint = " (parse_unit turns 'layer:N' strings into units)" if isinstance(unit, str) else ""
            raise TypeError(f"a unit is a Channel or a Logit, not {type(unit).__name__}{hint}")
    names = [hooks.resolve_layer(model, u.layer)[0] if isinstance(u, Channel) else None for u in listed]
    return listed, names


def unit_activations(model: nn.Module, units: Unit | Sequence[Unit], x: Tensor) -> Tensor:
    """The value of every unit on every image of ``x [B,C,H,W]``. Returns ``[B,U]``, detached."""
    check_input(x)
    listed, names = _resolve_units(model, units)
    with guarded(model, x, grad=False), torch.no_grad():
        return _unit_matrix(model, listed, names, x).detach()


def _normalisation(
    mean: float | Sequence[float] | None, std: float | Sequence[float] | None, channels: int
) -> tuple[Tensor, Tensor] | None:
    """``mean``, ``std`` as ``[1,C,1,1]`` float64 tensors (one value repeats), or None for neither."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise ValueError("give both mean and std (the model's input normalisation) or neither")
    pair = [
        torch.tensor(image.per_channel(value, channels, name), dtype=torch.float64).view(1, channels, 1, 1)
        for name, value in (("mean", mean), ("std", std))
    ]
    if not bool((pair[1] > 0).all()):
        raise ValueError(f"std entries must be positive, got {std!r}")
    return pair[0], pair[1]


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Blur each channel of ``[B,C,H,W]`` with a Gaussian of ``sigma`` pixels, cut at 2 sigma
    (reflected borders). Returns ``[B,C,H,W]``."""
    # Imported here: torchvision is not needed by `import torchvis`, and importing it takes longer
    # than importing torch (it loads torch._dynamo).
    from torchvision.transforms.functional import gaussian_blur

    side = 2 * max(1, math.ceil(2 * sigma)) + 1
    return gaussian_blur(x, [side, side], [sigma, sigma])


def _total_variation(x: Tensor) -> Tensor:
    """Mean squared neighbour difference per image: ``[B]``."""
    dy = (x[:, :, 1:] - x[:, :, :-1]).pow(2).flatten(1).mean(dim=1)
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).flatten(1).mean(dim=1)
    return dy + dx


def _fourier_scale(h: int, w: int) -> Tensor:
    """1/frequency per rfft2 coefficient ``[H, W//2+1]`` (frequency floored at 1/max(H, W)), as
    Lucid's ``fft_image`` with an orthonormal inverse FFT."""
    fy = torch.fft.fftfreq(h).view(-1, 1)
    fx = torch.fft.rfftfreq(w).view(1, -1)
    freq = (fy**2 + fx**2).sqrt().clamp_min(1.0 / max(h, w))
    return 1.0 / freq


def maximize(
    model: nn.Module,
    units: Unit | Sequence[Unit],
    *,
    shape: tuple[int, int, int],
    steps: int = 128,
    lr: float = 0.1,
    l2: float = 0.1,
    tv: float = 0.1,
    jitter: int = 1,
    blur_every: int = 0,
    blur_sigma: float = 0.5,
    param: Param = "pixel",
    seed: int = 0,
    device: torch.device | str | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    progress: bool = False,
) -> Tensor:
    """One input per unit that maximises it. Returns the raw inputs ``[U,C,H,W]`` the model saw.

    Row ``u`` ascends ``value_u(x_u) - l2 * mean(x_u**2) - tv * TV(x_u)`` with Adam (rate ``lr``,
    ``steps`` steps from small noise; ``steps=0`` returns the start image). For a linear unit
    ``w . x`` without ``tv``/jitter the optimum is ``x = N * w / (2 * l2)``, ``N = C*H*W``.
    The penalties weigh against the unit's own scale: the defaults (tuned on the digits CNN, whose
    logits reach ~15) suit logits; for channel means (~0.5) use ~20x smaller ``l2``/``tv``.
    ``shape`` is one input's ``(C, H, W)``. ``mean``/``std`` (the model's input normalisation) bound
    the picture to [0, 1]; without them the input is unbounded and only ``l2``/``tv`` tame it.
    Randomness (start, jitter) comes from a private generator seeded with ``seed``; the model's
    weights, ``.grad``, modes and hooks and the global RNG are left as they were. Runs on ``device``
    (default: the model's) in the model's floating dtype.

    Erhan, Bengio, Courville & Vincent, "Visualizing Higher-Layer Features of a Deep Network", 2009;
    Olah, Mordvintsev & Schubert, "Feature Visualization", Distill 2017.
    """
    listed, names = _resolve_units(model, units)
    if len(shape) != 3 or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ValueError(f"shape is one input's (C, H, W) with positive ints, got {shape!r}")
    if param not in ("pixel", "fourier"):
        raise ValueError(f"param must be 'pixel' or 'fourier', not {param!r}")
    if steps < 0 or lr <= 0 or l2 < 0 or tv < 0 or jitter < 0 or blur_every < 0 or blur_sigma <= 0:
        raise ValueError("need steps, l2, tv, jitter, blur_every >= 0 and lr, blur_sigma > 0")
    if blur_every and param != "pixel":
        raise ValueError("blur_every blurs pixels; use it with param='pixel' (fourier is smooth already)")
    c, h, w = shape
    box = _normalisation(mean, std, c)
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    if device is not None:
        dev = torch.device(device)
    else:
        dev = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.get_default_dtype()
    generator = torch.Generator().manual_seed(seed)
    # Drawn on the CPU in float64, then moved: a seed gives the same start on every device.
    size = (len(listed), c, h, w) if param == "pixel" else (len(listed), c, h, w // 2 + 1, 2)
    leaf = (0.01 * torch.randn(size, generator=generator, dtype=torch.float64)).to(dev, dtype)
    leaf.requires_grad_(True)
    scale = _fourier_scale(h, w).to(dev, dtype)
    bounds = None if box is None else (box[0].to(dev, dtype), box[1].to(dev, dtype))

    def render() -> Tensor:
        z = leaf
        if param == "fourier":
            # Lucid's "magic" divisor 4 keeps the start image's contrast near the pixel one's.
            z = torch.fft.irfft2(torch.view_as_complex(leaf) * scale, s=(h, w), norm="ortho") / 4
        if bounds is None:
            return z
        return (torch.sigmoid(z) - bounds[0]) / bounds[1]

    # The first Adam of a process imports torch._dynamo (seconds; benchmarks/first_use.py), which
    # torchvision and any training loop with a torch.optim optimizer have already done.
    adam = torch.optim.Adam([leaf], lr=lr, maximize=True)
    rows = torch.arange(len(listed), device=dev)
    with guarded(model, leaf):
        if steps == 0:  # still check the units against the model
            with torch.no_grad():
                _unit_matrix(model, listed, names, render())
        for step in tqdm(range(steps), disable=not progress, desc="maximize", unit="step"):
            x = render()
            seen = x
            if jitter:
                dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist()
                seen = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            values = _unit_matrix(model, listed, names, seen)[rows, rows]
            objective = values - l2 * x.pow(2).flatten(1).mean(dim=1)
            if tv:
                objective = objective - tv * _total_variation(x)
            # autograd.grad on the image parameter alone: no weight gradient, no .grad of the model.
            (leaf.grad,) = torch.autograd.grad(objective.sum(), [leaf])
            adam.step()
            if blur_every and (step + 1) % blur_every == 0:
                with torch.no_grad():
                    leaf.copy_(_gaussian_blur(leaf, blur_sigma))
        with torch.no_grad():
            return render().detach()


def to_images(
    x: Tensor, mean: float | Sequence[float] | None = None, std: float | Sequence[float] | None = None
) -> Tensor:
    """Raw inputs ``[B,C,H,W]`` (from :func:`maximize`) as pictures in [0, 1]. Returns ``[B,C,H,W]``.

    With ``mean``/``std``: ``x * std + mean``, clamped. Without: each image stretched from its minimum
    (0) to its maximum (1); a flat image gives 0.5.
    """
    check_input(x)
    if _normalisation(mean, std, x.shape[1]) is not None:  # validates the pair
        assert mean is not None and std is not None
        c = x.shape[1]
        return image.denormalize(x, image.per_channel(mean, c, "mean"), image.per_channel(std, c, "std"))
    flat = x.flatten(1)
    low = flat.amin(dim=1).view(-1, 1, 1, 1)
    span = flat.amax(dim=1).view(-1, 1, 1, 1) - low
    flat_image = span <= torch.finfo(x.dtype).eps * low.abs().clamp_min(1)
    return torch.where(flat_image, torch.full_like(x, 0.5), (x - low) / torch.where(flat_image, 1, span))
