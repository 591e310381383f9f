"""CNN beside a small vision transformer on the real digits: saliency, Grad-CAM, LayerCAM, occlusion.

    python examples/vit_digits.py [--vit vit.pt] [--cnn cnn.pt] [--out docs/vit_digits.png]

Trains ``DigitsCNN`` (5 epochs of ``train_digits``'s defaults) and ``DigitsViT`` (``train_vit`` defaults)
on the 5,000 bundled MNIST digits — or loads them from ``--cnn`` / ``--vit`` if those files exist (a
freshly trained model is saved there) — then draws one figure: for 8 held-out digits a CNN row and
a ViT row; columns input, saliency, Grad-CAM, LayerCAM and occlusion. Each column title gives the
method's mean deletion AUC (Petsiuk et al. 2018; lower is better) for each model over the first
``--scored`` held-out digits: pixels are blackened in the map's order and the softmax probability
of the predicted class is integrated.

The CNN's CAMs are taken at ``relu2`` (24x24). The ViT's are taken at the last block's ``ln_1``:
its 17 tokens are ``[B,17,64]``; ``reshape="auto"`` drops the class token and lays the 16 patch
tokens back on their 4x4 grid before Grad-CAM's formula is applied.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from torchvis import deletion
from torchvis.apps.digits import (
    CLASS_NAMES,
    DigitsCNN,
    DigitsData,
    denormalize,
    evaluate,
    load_digits,
    load_digits_model,
    save_checkpoint,
    train_digits,
)
from torchvis.apps.vit_digits import BLACK, DigitsViT, load_vit_model, save_vit_checkpoint, train_vit
from torchvis.methods.combine import explain_batch
from torchvis.rendering.figure import explanation_figure, figure_rgb

METHODS = {"saliency": "Saliency", "grad_cam": "Grad-CAM", "layer_cam": "LayerCAM", "occlusion": "Occlusion"}
CNN_LAYER = "relu2"
OCCLUSION_WINDOW = 6  # pixels of a 28x28 digit: about a stroke's width (as the demo)


def maps_of(model: nn.Module, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """The four maps of the predicted class, ``[B,1,28,28]`` each, and the softmax ``[B, 10]``:
    saliency, Grad-CAM and LayerCAM from one forward and backward (``explain_batch``), occlusion apart."""
    if isinstance(model, DigitsViT):
        where = {"layer": f"encoder.layers.encoder_layer_{len(model.encoder.layers) - 1}.ln_1",
                 "reshape": "auto"}
    else:
        where = {"layer": CNN_LAYER}
    explained = explain_batch(model, x, methods=tuple(METHODS), window=OCCLUSION_WINDOW, baseline=BLACK,
                              **where)
    return explained.maps, explained.logits.softmax(dim=1)


def trained(kind: str, path: Path | None, data: DigitsData, seed: int) -> nn.Module:
    """The CNN or the ViT: loaded from ``path`` if it exists, else trained (and saved there)."""
    if path is not None and path.exists():
        return load_vit_model(path) if kind == "vit" else load_digits_model(path)
    start = time.perf_counter()
    if kind == "vit":
        model: nn.Module = train_vit(data, seed=seed, progress=True).model
    else:
        model = DigitsCNN(generator=torch.Generator().manual_seed(seed))
        train_digits(model, data, epochs=5, seed=seed, progress=True)
    accuracy = evaluate(model, data.test_x, data.test_y)
    print(f"{kind}: held-out accuracy {accuracy:.1%} after {time.perf_counter() - start:.0f} s of training")
    if path is not None and isinstance(model, DigitsViT):
        save_vit_checkpoint(model, path)
    elif path is not None and isinstance(model, DigitsCNN):
        save_checkpoint(model, path)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vit", type=Path, help="load the ViT from this file if it exists, else save it")
    parser.add_argument("--cnn", type=Path, help="load the CNN from this file if it exists, else save it")
    parser.add_argument("--out", type=Path, default=Path("docs/vit_digits.png"))
    parser.add_argument("--shown", type=int, default=8, help="held-out digits drawn")
    parser.add_argument("--scored", type=int, default=100, help="held-out digits the deletion AUC averages")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = load_digits(seed=args.seed)
    models = {"CNN": trained("cnn", args.cnn, data, args.seed),
              "ViT": trained("vit", args.vit, data, args.seed)}
    x = data.test_x[: max(args.shown, args.scored)]
    explained = {name: maps_of(model, x) for name, model in models.items()}
    maps = {name: m for name, (m, _) in explained.items()}
    scored = x[: args.scored]
    scores = {name: {m: float(deletion(model, scored, maps[name][m][: args.scored], baseline=BLACK).mean())
                     for m in METHODS}
              for name, model in models.items()}
    for name in models:
        print(f"{name} deletion AUC: " + ", ".join(f"{METHODS[m]} {s:.3f}" for m, s in scores[name].items()))

    # Rows: digit 0 under the CNN, digit 0 under the ViT, digit 1 under the CNN, ...
    shown = x[: args.shown]
    rows, labels = [], []
    for i in range(args.shown):
        for name in models:
            p = explained[name][1][i]
            rows.append((name, i))
            labels.append(f"{name}, true {CLASS_NAMES[int(data.test_y[i])]}\n"
                          f"pred {CLASS_NAMES[int(p.argmax())]} ({float(p.max()):.2f})")
    pick = {m: torch.stack([maps[name][m][i] for name, i in rows]) for m in METHODS}
    titles = {m: f"{title}\nCNN {scores['CNN'][m]:.2f} · ViT {scores['ViT'][m]:.2f}"
              for m, title in METHODS.items()}
    images = denormalize(torch.stack([shown[i] for _, i in rows]))
    title = (f"CNN vs ViT; under each method its deletion AUC, mean of {args.scored} held-out digits "
             "(lower is better)")
    figure = explanation_figure(images, pick, row_labels=labels, labels=titles, panel=1.7, title=title)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(figure_rgb(figure)).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
