"""Kept so ``from torchvis.lightning import AttributionCallback`` works; the callback lives in
:mod:`torchvis.tracking.lightning`."""

from torchvis.tracking.lightning import AttributionCallback

__all__ = ["AttributionCallback"]
