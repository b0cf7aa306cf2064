"""Subcommands of ``tl-reversed``: each module has ``add_parser(subparsers)`` and ``run(args)``."""
