"""A small vision transformer for the 5,000 real digits, laid out like torchvision's ``vit_b_16``.

``DigitsViT`` is torchvision's ``VisionTransformer`` with a one-channel patch embedding, so every
module has the name that tools written for ``vit_b_16`` expect (``conv_proj``, ``class_token``,
``encoder.pos_embedding``, ``encoder.layers.encoder_layer_{i}.ln_1`` / ``self_attention`` /
``ln_2`` / ``mlp``, ``encoder.ln``, ``heads``). ``train_vit`` is a seeded training loop (AdamW,
linear warmup then cosine decay, label smoothing, random affine augmentation) that takes it to
97.7 % on the 1,000 held-out digits in 40 epochs, one to three minutes on two CPU cores.
``save_vit_checkpoint`` / ``load_vit_model`` round-trip it as a weights-only file.

References:
    A. Dosovitskiy et al. "An image is worth 16x16 words: Transformers for image recognition at
    scale." ICLR 2021. (the model)
    L. Beyer, X. Zhai, A. Kolesnikov. "Better plain ViT baselines for ImageNet-1k." arXiv
    2205.01580, 2022. (global average pooling head, AdamW, warmup + cosine)
    I. Loshchilov, F. Hutter. "Decoupled weight decay regularization." ICLR 2019. (AdamW)
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.vision_transformer import VisionTransformer
from tqdm.auto import tqdm

from torchvis.apps.digits import (
    CLASS_NAMES,
    MNIST_MEAN,
    MNIST_STD,
    DigitsData,
    evaluate,
    read_checkpoint,
    seeded_rng,
    write_checkpoint,
)
from torchvis.core.forward import restored_modes

__all__ = [
    "BLACK",
    "VIT_CHECKPOINT_FORMAT",
    "DigitsViT",
    "ViTResult",
    "augment",
    "load_vit_model",
    "save_vit_checkpoint",
    "train_vit",
]

#: A black pixel (the digits' background) after the MNIST normalisation.
BLACK = -MNIST_MEAN / MNIST_STD

#: Tag stored in every ViT checkpoint; bump the version when the layout changes.
VIT_CHECKPOINT_FORMAT = "torchvis.digits-vit/1"


class DigitsViT(VisionTransformer):
    """A vision transformer for ``[B,1,28,28]`` normalised digits; returns ``[B,10]`` logits.

    torchvision's ``VisionTransformer`` (pre-norm blocks, learnable position embedding, class token
    at position 0) with ``conv_proj`` taking one channel: with ``patch_size=7`` a digit becomes a
    4x4 grid of non-overlapping patches, 16 tokens after the class token, each ``hidden_dim`` wide.
    One change to the forward pass: ``heads`` reads the mean of the 16 patch tokens after
    ``encoder.ln`` (global average pooling, Beyer et al. 2022), not the class token: 98.2 % against
    96.8 % held out (seed 0) in an earlier version of ``train_vit`` (other augmentation draws,
    weight decay on the class token). The class token stays, as token 0 that every block attends
    to, so the 17-token layout is ``vit_b_16``'s and code that drops token 0 (the reshaping for a
    token Grad-CAM) still works; it just does not feed the head directly.

    Args:
        generator: if given, the initial weights are drawn from it (one seed is drawn, and the
            torchvision initialisation runs under it in a forked RNG) and the global RNG is not
            touched. If None, the layers initialise from the global RNG as every module does.
    """

    def __init__(
        self,
        *,
        patch_size: int = 7,
        num_layers: int = 4,
        num_heads: int = 4,
        hidden_dim: int = 64,
        mlp_dim: int = 128,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        if 28 % patch_size:
            raise ValueError(f"patch_size must divide 28 (non-overlapping patches), got {patch_size}")
        config = {"patch_size": patch_size, "num_layers": num_layers, "num_heads": num_heads,
                  "hidden_dim": hidden_dim, "mlp_dim": mlp_dim, "dropout": dropout}
        if generator is None:
            self._build(config)
        else:
            seed = int(torch.randint(2**62, (1,), generator=generator))
            with seeded_rng(seed):
                self._build(config)
        #: The constructor's arguments (without ``generator``), as the checkpoint stores them.
        self.config: dict[str, Any] = config

    def _build(self, config: dict[str, Any]) -> None:
        super().__init__(image_size=28, num_classes=len(CLASS_NAMES), **config)
        patch, width = config["patch_size"], config["hidden_dim"]
        proj = nn.Conv2d(1, width, kernel_size=patch, stride=patch)
        # torchvision's initialisation of the patch embedding, for one input channel.
        nn.init.trunc_normal_(proj.weight, std=math.sqrt(1 / patch**2))
        nn.init.zeros_(proj.bias)  # type: ignore[arg-type]  # a Conv2d built with bias=True
        self.conv_proj = proj

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[B,1,28,28]`` normalised digits to ``[B,10]`` logits (no softmax)."""
        tokens = self._process_input(x)
        tokens = torch.cat([self.class_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.heads(self.encoder(tokens)[:, 1:].mean(dim=1))


class ViTResult(NamedTuple):
    """What ``train_vit`` returns: the trained ``model`` (eval mode), its held-out ``accuracy`` in
    ``[0, 1]`` and the ``losses`` of every optimizer step."""

    model: DigitsViT
    accuracy: float
    losses: list[float]


def augment(
    x: Tensor,
    generator: torch.Generator,
    *,
    degrees: float = 10.0,
    translate: float = 2.0,
    scale: float = 0.1,
) -> Tensor:
    """A random affine transform of each normalised digit ``[B,1,28,28]``, returning the same shape.

    Per image, drawn from ``generator``: a rotation in ``±degrees``, a scaling in ``1 ± scale`` and
    a shift of ``±translate`` pixels on each axis; bilinear sampling, black where the transformed
    image leaves the frame.
    """
    n = x.shape[0]

    def uniform(half_width: float) -> Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * half_width

    angle = uniform(degrees) * math.pi / 180
    zoom = 1 + uniform(scale)
    shift = torch.stack([uniform(translate), uniform(translate)], dim=1) * 2 / x.shape[-1]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # affine_grid maps output to input coordinates: the inverse rotation/scaling, then the shift.
    theta = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    theta = torch.cat([theta, shift[:, :, None]], dim=2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Sample the offset from black so that the zero padding is black, not the mean grey.
    return F.grid_sample(x - BLACK, grid, align_corners=False) + BLACK


def train_vit(
    data: DigitsData,
    *,
    epochs: int = 40,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    warmup: int = 3,
    label_smoothing: float = 0.1,
    model: DigitsViT | None = None,
    progress: bool = False,
) -> ViTResult:
    """Train a ``DigitsViT`` on ``data.train_x`` / ``data.train_y``; returns it with its held-out
    accuracy on ``data.test_x`` / ``data.test_y``.

    AdamW (weight decay on the weight matrices only, not on biases, norms, the class token or the
    position embedding), the learning rate rising linearly over ``warmup`` epochs to ``lr`` and then
    falling to 0 on a cosine, cross-entropy with ``label_smoothing``, every batch through
    :func:`augment`. ``model`` defaults to ``DigitsViT(generator=Generator().manual_seed(seed))``;
    it is trained in place and its submodules' modes are restored on return (the result is put in
    eval mode only when ``train_vit`` built it). Everything random — the initial weights, the
    epoch orders, the augmentation, dropout if the model has any — follows from ``seed``; the
    global RNG is not touched (dropout runs in a forked RNG seeded with ``seed``).

    The defaults reach 97.7 % on the default split (seed 0) in 40 epochs of 32 steps.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    built = model is None
    vit = DigitsViT(generator=generator) if model is None else model
    n = data.train_y.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total, warm = epochs * steps_per_epoch, warmup * steps_per_epoch
    optimizer = torch.optim.AdamW(_parameter_groups(vit, weight_decay), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _warmup_cosine(step, warm, total))
    losses: list[float] = []
    with (
        seeded_rng(seed),
        restored_modes(vit),
        tqdm(total=total, disable=not progress, desc="train ViT", unit="step") as bar,
    ):
        vit.train()
        for _ in range(epochs):
            for batch in torch.randperm(n, generator=generator).split(batch_size):
                x = augment(data.train_x[batch], generator)
                loss = F.cross_entropy(vit(x), data.train_y[batch], label_smoothing=label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    if built:
        vit.eval()
    return ViTResult(vit, evaluate(vit, data.test_x, data.test_y), losses)


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decayed = [p for name, p in model.named_parameters() if p.ndim >= 2 and name != "encoder.pos_embedding"
               and name != "class_token"]
    ids = {id(p) for p in decayed}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _warmup_cosine(step: int, warm: int, total: int) -> float:
    """The learning-rate factor after ``step`` optimizer steps: linear to 1 over ``warm`` steps, then a
    half cosine to 0 at ``total``."""
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def save_vit_checkpoint(model: DigitsViT, path: str | os.PathLike[str]) -> None:
    """Write ``model``'s weights, constructor arguments and a metadata record to ``path``
    (:func:`torchvis.apps.digits.write_checkpoint`)."""
    write_checkpoint(model, path, VIT_CHECKPOINT_FORMAT, config=dict(model.config))


def load_vit_model(path: str | os.PathLike[str], *, map_location: torch.device | str = "cpu") -> DigitsViT:
    """Load a ``DigitsViT`` written by ``save_vit_checkpoint``, in eval mode, on ``map_location``.

    Raises:
        ValueError: the file is not a torchvis digits ViT checkpoint, or its class names,
            normalisation, configuration or weights do not fit ``DigitsViT``.
        OSError: the file cannot be opened.
    """
    checkpoint = read_checkpoint(path, VIT_CHECKPOINT_FORMAT, "digits ViT", map_location=map_location)
    try:
        # A private generator: the random initial weights are overwritten just below anyway.
        model = DigitsViT(generator=torch.Generator(), **checkpoint["config"])
        model.load_state_dict(checkpoint["state_dict"])
    except (KeyError, TypeError, RuntimeError) as err:
        raise ValueError(f"{os.fspath(path)!r} does not hold DigitsViT weights: {err!r}") from err
    return model.to(map_location).eval()
