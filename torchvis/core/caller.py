"""Warnings that point at the user's line.

A warning raised deep inside torchvis would name a torchvis line if given a fixed ``stacklevel``, and
which line depends on the route (a method called directly, through ``explain``, SmoothGrad, the
monitor, or when a call's queued checks are read). :func:`warn_user` names the first frame outside
torchvis instead, whatever the route.
"""

from __future__ import annotations

import sys
import warnings

__all__ = ["warn_user"]


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the first caller outside torchvis."""
    frame, level = sys._getframe(1), 2  # warn_user's caller is stacklevel 2 of warnings.warn here
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("torchvis."):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
