"""The digits CNN trained by a Lightning Trainer, with its attribution maps in TensorBoard.

    pip install -e ".[lightning,demo]"
    python examples/lightning_digits.py --logdir runs/lightning
    tensorboard --logdir runs/lightning

Trains ``DigitsCNN`` on the 5,000 bundled MNIST digits (no download). ``AttributionCallback`` logs
saliency, Grad-CAM and guided backprop of 16 held-out digits before training, every ``--every``
optimizer steps, and at the end of each validation, through the trainer's TensorBoardLogger.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from torchvis.apps.digits import CLASS_NAMES, MNIST_MEAN, MNIST_STD, DigitsCNN, load_digits
from torchvis.tracking.lightning import AttributionCallback


class LitDigits(pl.LightningModule):
    """``DigitsCNN`` as ``self.model``: its layers are ``model.conv1``, ``model.conv2``, ..."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.model, self.lr = DigitsCNN(), lr

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_accuracy", (self(x).argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--logdir", type=Path, default=Path("runs/lightning"))
    parser.add_argument("--max-steps", type=int, default=300, help="optimizer steps (63 per epoch)")
    parser.add_argument("--every", type=int, default=50, help="log the maps every this many steps")
    args = parser.parse_args()

    pl.seed_everything(0)
    data = load_digits()
    train = DataLoader(TensorDataset(data.train_x, data.train_y), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(data.test_x, data.test_y), batch_size=500)
    probe_x, probe_y = data.test_x[:16], data.test_y[:16]  # held out: never trained on
    callback = AttributionCallback(
        probe_x, probe_y, methods=("saliency", "grad_cam", "guided_backprop"), layer="model.relu2",
        every_n_steps=args.every, on_validation=True, mean=MNIST_MEAN, std=MNIST_STD, class_names=CLASS_NAMES,
    )
    logger = TensorBoardLogger(str(args.logdir), name="digits")
    trainer = pl.Trainer(max_steps=args.max_steps, devices=1, callbacks=[callback], logger=logger,
                         enable_checkpointing=False)
    trainer.fit(LitDigits(), train, val)
    print(f"maps logged at steps {callback.logged_steps} to {logger.log_dir}")


if __name__ == "__main__":
    main()
