"""``tl-reversed tasks``: the packaged tasks, their kind and number of distinct pairs."""

from __future__ import annotations

import argparse

from tl_reversed.commands.common import add_format_argument, print_table


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "tasks",
        help="list the packaged tasks (name, kind, number of pairs)",
        description="List the tasks --task accepts: Todd et al.'s in-context-learning pairs (kind icl) "
        "and Hernandez et al.'s relations (kind relation), each with its number of distinct "
        "(input, output) pairs and of prompt templates (relations only).",
    )
    add_format_argument(parser)
    return parser


def task_table():
    """One row per packaged task: ``name, kind, pairs, templates``."""
    import pandas as pd

    from tl_reversed.experiments.tasks import list_tasks, load_task

    tasks = [load_task(name) for name in list_tasks()]
    return pd.DataFrame(
        [{"name": t.name, "kind": t.kind, "pairs": len(t.pairs), "templates": len(t.templates)} for t in tasks]
    )


def run(args: argparse.Namespace) -> int:
    table = task_table()
    if args.format:
        print_table(table, args.format)
    else:
        print(table.to_string(index=False))
    return 0
