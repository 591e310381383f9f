"""Writing what the commands produce: output folders checked before any work, files written atomically."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from torchvis.apps.loading import InputError


def check_output_folder(folder: Path, flag: str) -> None:
    """Raise :class:`InputError` unless ``folder`` is, or can be created as, a folder we can write
    into: the folder (or its nearest existing ancestor) must take a temporary file, written and
    removed at once. Creates nothing that stays."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "exists and is not a folder" if existing == folder else f"is inside {str(existing)!r}, a file"
        raise InputError(f"{flag} {str(folder)!r} {what}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        where = "" if existing == folder else f" (its nearest existing folder {str(existing)!r})"
        raise InputError(
            f"{flag} {str(folder)!r}{where} is not writable: {err.strerror or err}"
        ) from err


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write through a hidden temporary file in the same folder and rename it into place, so a crash
    never leaves a partial file under ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as fh:
            write(fh)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
