"""Attribution maps from a DistributedDataParallel training loop: rank 0 logs, the other ranks never wait.

Two CPU processes, gloo, a minute at most:

    torchrun --nproc_per_node=2 examples/ddp_monitor.py --out runs/ddp
    tensorboard --logdir runs/ddp/tensorboard

Each rank trains on its own shard of synthetic "which quadrant holds the bright square" images; DDP
averages the gradients. Only rank 0 owns a SummaryWriter and a Monitor, built on ``ddp.module``, the
unwrapped model: the wrapper's forward would broadcast the BatchNorm buffers and expect a backward on
every rank, so rank 0 calling it alone would hang the others. The monitor's forward and
``torch.autograd.grad`` on the plain module run no collective and touch no ``.grad``, so the ranks
stay in lockstep. At the end each rank saves its state dict to ``<out>/rank<r>.pt``: the parameters are
equal (the BatchNorm running statistics are each rank's own since the last forward, as always in DDP).
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from torchvis.tracking.monitor import Monitor

MEAN, STD = 0.5, 0.25  # the normalisation of the inputs, undone for display
SIZE, SQUARE = 16, 5


class QuadrantCNN(nn.Module):
    """[B,1,16,16] -> [B,4] logits: which quadrant holds the bright square."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)  # buffers: DDP broadcasts them from rank 0 at every wrapped forward
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(4)
        self.dropout = nn.Dropout(0.25)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu2(self.conv2(self.relu1(self.bn(self.conv1(x)))))
        return self.fc(self.dropout(self.pool(x)).flatten(1))


def quadrant_images(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` normalised images [n,1,16,16] of noise with a bright square in quadrant ``y`` [n]."""
    g = torch.Generator().manual_seed(seed)
    x = 0.4 * torch.rand(n, 1, SIZE, SIZE, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    corner = torch.randint(0, SIZE // 2 - SQUARE + 1, (n, 2), generator=g)
    for i in range(n):
        top = corner[i, 0] + SIZE // 2 * (y[i] // 2)
        left = corner[i, 1] + SIZE // 2 * (y[i] % 2)
        x[i, 0, top : top + SQUARE, left : left + SQUARE] = 1.0
    return (x - MEAN) / STD, y


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the event file and rank<r>.pt")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=10, help="log the maps every this many steps")
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds a rank waits in a collective before failing instead of hanging")
    args = parser.parse_args(argv)

    # RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT come from torchrun.
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(args.seed)
        ddp = DistributedDataParallel(QuadrantCNN())
        torch.manual_seed(args.seed + 1 + rank)  # each rank its own dropout masks
        x, y = quadrant_images(args.steps * args.batch_size * world, seed=args.seed)
        x, y = x[rank::world], y[rank::world]  # this rank's shard
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)

        writer = SummaryWriter(str(args.out / "tensorboard")) if rank == 0 else None
        monitor = None
        if writer is not None:
            probe_x, probe_y = quadrant_images(8, seed=args.seed + 1000)
            monitor = Monitor(ddp.module, writer, probe_x, probe_y, layer="relu2", every=args.every,
                              mean=MEAN, std=STD, class_names=["top left", "top right", "bottom left",
                                                               "bottom right"])
            monitor.step(0)  # the untrained model
        for step in range(1, args.steps + 1):
            batch = slice((step - 1) * args.batch_size, step * args.batch_size)
            loss = F.cross_entropy(ddp(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # all-reduces the gradients
            optimizer.step()
            if monitor is not None:
                monitor.step(step)  # weights after `step` updates; rank 1 runs ahead meanwhile
        if monitor is not None and writer is not None:
            monitor.close()
            writer.close()
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(ddp.module.state_dict(), args.out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
