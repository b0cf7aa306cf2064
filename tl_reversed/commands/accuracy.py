"""``tl-reversed accuracy``: a model's in-context accuracy on the packaged tasks, per shot count.

The first table any experiment needs: which tasks does this model solve, and with how
many demonstrations? The perturbation test is informative only where the model is often
right, and attention patching aims at the model's own few-shot accuracy. Every cell is
top-1 accuracy of the first target token at the last prompt token, on the seeded test
split (the same prompts ``tl-reversed perturbation`` and ``patching`` test on).
"""

from __future__ import annotations

import argparse
import time

from tl_reversed.commands.common import (
    add_format_argument,
    add_model_argument,
    command_line,
    int_list,
    load_cli_model,
    markdown_table,
    positive_int,
    print_table,
    writable_folder,
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "accuracy",
        help="in-context accuracy of a model on the packaged tasks, per shot count",
        description="Top-1 accuracy of the first target token on each task's seeded test split, "
        "for each shot count: which tasks the model solves, and with how many demonstrations.",
    )
    parser.add_argument("--task", action="append", default=None,
                        help="a task name (repeat for several; default: every packaged task)")  # fmt: skip
    parser.add_argument("--shots", type=int_list, default=[0, 1, 5], help="shot counts (default 0,1,5)")
    parser.add_argument("--n", type=positive_int, default=100, help="test prompts per task, at most (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the demonstrations")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="prompts per forward pass (default 16)")
    parser.add_argument("--out", default=None, help="also write accuracy.csv and accuracy.md to this folder")
    add_model_argument(parser)
    add_format_argument(parser)
    return parser


def accuracy_table(model, tasks: list[str], shots: list[int], *, n: int, seed: int, batch_size: int):
    """One row per task and shot count: ``task, shots, n, dropped, accuracy, seconds``."""
    import pandas as pd
    from tqdm.auto import tqdm

    from tl_reversed.experiments.evaluation import accuracy, prompt_batch
    from tl_reversed.experiments.tasks import make_examples

    rows = []
    for task in tqdm(tasks, desc="accuracy", unit="task"):
        for k in shots:
            start = time.perf_counter()
            examples = make_examples(task, shots=k, n=n, seed=seed, split="test", model=model)
            acc = accuracy(model, prompt_batch(model, examples), batch_size=batch_size) if len(examples) else float("nan")
            rows.append({"task": task, "shots": k, "n": len(examples), "dropped": examples.dropped,
                         "accuracy": acc, "seconds": time.perf_counter() - start})  # fmt: skip
    return pd.DataFrame(rows)


def run(args: argparse.Namespace) -> int:
    from tl_reversed.experiments.tasks import list_tasks, load_task

    tasks = list(dict.fromkeys(load_task(name).name for name in args.task)) if args.task else list_tasks()
    out = writable_folder(args.out) if args.out else None
    model = load_cli_model(args)
    table = accuracy_table(model, tasks, args.shots, n=args.n, seed=args.seed, batch_size=args.batch_size)
    if args.format:
        print_table(table, args.format)
    else:
        wide = table.pivot(index="task", columns="shots", values="accuracy").loc[tasks]
        print(wide.to_string(float_format=lambda v: f"{v:.2f}"))
    if out is not None:
        table.to_csv(out / "accuracy.csv", index=False, float_format="%.4f")
        wide = table.pivot(index="task", columns="shots", values="accuracy").loc[tasks]
        n_test = table.pivot(index="task", columns="shots", values="n").loc[tasks]
        rows = [[task, *(f"{wide.loc[task, k]:.2f} ({n_test.loc[task, k]})" for k in args.shots)] for task in tasks]
        text = markdown_table(["task", *(f"{k}-shot" for k in args.shots)], rows)
        (out / "accuracy.md").write_text(
            f"Top-1 accuracy of the first target token (test prompts in brackets).\n\n{text}\n\n"
            f"Command: `{command_line()}`\n"
        )
    return 0
