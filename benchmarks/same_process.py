"""Per-call time of this checkout against an older one, in one process, on the digits CNN at batch 1.

    git worktree add /tmp/before 18bdcb0
    python -m benchmarks.same_process --before /tmp/before [--rounds 200]

Two processes scatter too much for calls of 1.5–2 ms (see ``benchmarks.inputs``), so the older
``torchvis`` is copied into a temporary folder as the package ``torchvis_before`` (its imports
renamed) and imported beside this one. Each round times 20 calls of each version, alternating which
goes first; the ratio reported is the median over rounds of after / before with its quartiles.
The maps of both versions are checked equal first. One intra-op thread, wall clock.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def renamed_copy(checkout: Path, into: Path) -> None:
    """``checkout/torchvis`` copied to ``into/torchvis_before`` with every ``torchvis`` import renamed."""
    target = into / "torchvis_before"
    shutil.copytree(checkout / "torchvis", target)
    for path in target.rglob("*.py"):
        path.write_text(re.sub(r"\btorchvis\b", "torchvis_before", path.read_text()))


def calls(tv: Any, model: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable[[], Any]]:
    return {
        "saliency": lambda: tv.saliency(model, x),
        "guided_backprop": lambda: tv.guided_backprop(model, x),
        "grad_cam": lambda: tv.grad_cam(model, x, layer="relu2"),
        "explain": lambda: tv.explain(model, x, methods=["saliency", "grad_cam"], layer="relu2")["grad_cam"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--before", type=Path, default=Path("/tmp/before"))
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        renamed_copy(args.before, Path(folder))
        sys.path.insert(0, folder)
        before = importlib.import_module("torchvis_before")
        import torchvis
        from torchvis.apps.digits import DigitsCNN

        model = DigitsCNN(generator=torch.Generator().manual_seed(0)).eval()
        x = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        old, new = calls(before, model, x), calls(torchvis, model, x)
        print(f"digits CNN, batch 1, one thread; before {args.before}")
        for name in old:
            assert torch.equal(old[name](), new[name]()), name
            for _ in range(30):
                old[name](), new[name]()
            ratios = []
            for r in range(args.rounds):
                seconds = {}
                for side, run in (("old", old[name]), ("new", new[name]))[:: 1 if r % 2 == 0 else -1]:
                    start = time.perf_counter()
                    for _ in range(20):
                        run()
                    seconds[side] = (time.perf_counter() - start) / 20
                ratios.append(seconds["new"] / seconds["old"])
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            print(f"{name:16s} after/before {statistics.median(ratios):.3f}  [q1 {q1:.3f}, q3 {q3:.3f}]  "
                  f"n={len(ratios)}")


if __name__ == "__main__":
    main()
