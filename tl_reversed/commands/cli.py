"""The ``tl-reversed`` command line: one module per subcommand under ``tl_reversed.commands``.

Building the parser (and ``--help``) imports neither torch nor the library: the
subcommand modules import them inside ``run``, and option values come from the
torch-free :mod:`tl_reversed.core.options`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tl_reversed import __version__
from tl_reversed.commands.common import CommandError

COMMANDS = ("heads", "demo", "lens", "graph", "perturbation", "patching", "apply-patch", "tasks", "accuracy",
            "sparsity", "segments")
"""Subcommands; each module (the name with ``_`` for ``-``) has ``add_parser(subparsers)`` and ``run(args) -> int``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tl-reversed",
        description="Reversed Attention for TransformerLens: which heads gradient descent wants to re-aim.",
    )
    parser.add_argument("--version", action="version", version=f"tl-reversed {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"tl_reversed.commands.{name.replace('-', '_')}")
        sub = module.add_parser(subparsers)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (CommandError, ValueError, TypeError, ImportError, FileNotFoundError) as error:
        print(f"tl-reversed {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
