"""The ``torchvis`` command: ``torchvis demo``, ``torchvis explain`` and ``torchvis sanity``.

Each command lives in its own module, which provides ``configure(parser)`` to declare its options and
``run(args) -> int`` to do the work; this module only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "demo": ("torchvis.apps.demo", "train the digits CNN with torchvis attached; stream maps to TensorBoard"),
    "explain": ("torchvis.apps.explain_cli", "explain image files with every method, one figure per image"),
    "audit": ("torchvis.apps.audit_cli", "explain a labelled image folder; report where each class looks"),
    "sanity": ("torchvis.apps.sanity_cli", "check each method's maps against a randomised model"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torchvis`` console script and of ``python -m torchvis``."""
    from torchvis import __version__

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="torchvis", description="See what a CNN looks at.")
    parser.add_argument("--version", action="version", version=f"torchvis {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only the command that runs is imported
            module = importlib.import_module(module_name)
            module.configure(sub)
            sub.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
