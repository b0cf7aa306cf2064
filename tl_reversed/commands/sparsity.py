"""``tl-reversed sparsity``: is RA sparser than forward attention? (the paper's first claim), per task.

For each task and shot count: RA maps of the seeded test prompts (one backward pass,
``keep="maps"``), then the share of each map's absolute mass in its top 5% of causal
entries and its Hoyer index, for RA and for the forward attention of the same heads
(:mod:`tl_reversed.experiments.sparsity`). The table counts in how many (prompt, head)
pairs and in how many heads (measures averaged over prompts) RA is the sparser map.
"""

from __future__ import annotations

import argparse

from tl_reversed.commands.common import (
    add_model_argument,
    command_line,
    int_list,
    load_cli_model,
    markdown_table,
    positive_int,
    writable_folder,
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sparsity",
        help="is RA sparser than forward attention? (top-5%% mass and Hoyer index per head and prompt)",
        description="RA maps of each task's test prompts; per (prompt, head), the share of absolute mass in "
        "the top 5%% of causal entries and the Hoyer index, for RA and forward attention; how often RA is sparser.",
    )
    parser.add_argument("--task", action="append", required=True, help="a task name (repeat for several)")
    parser.add_argument("--shots", type=int_list, default=[1], help="shot counts (default 1)")
    parser.add_argument("--n", type=positive_int, default=25, help="test prompts per task, at most (default 25)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the demonstrations")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="prompts per pass (default 8)")
    parser.add_argument("--out", required=True, help="folder for sparsity.csv and sparsity.md")
    add_model_argument(parser)
    return parser


def sparsity_table(model, tasks: list[str], shots: list[int], *, n: int, seed: int, batch_size: int):
    """One row per task, shot count and measure (:meth:`Sparsity.summary` plus ``task, shots, n``)."""
    import pandas as pd
    from tqdm.auto import tqdm

    from tl_reversed import reversed_attention
    from tl_reversed.experiments.sparsity import sparsity
    from tl_reversed.experiments.tasks import make_examples

    frames, dropped = [], 0
    for task in tqdm(tasks, desc="sparsity", unit="task"):
        for k in shots:
            examples = make_examples(task, shots=k, n=n, seed=seed, split="test", model=model)
            dropped += examples.dropped
            if not len(examples):
                continue
            ra = reversed_attention(model, examples.prompts, examples.targets, keep="maps", batch_size=batch_size, progress=False)
            frames.append(sparsity(ra).summary().assign(task=task, shots=k, n=len(examples)))
    if not frames:
        raise ValueError(
            f"no test prompts for tasks {tasks} at shots {shots}: {dropped} were dropped because their target is "
            "not one token of this model; choose other tasks or another model"
        )
    table = pd.concat(frames, ignore_index=True)
    return table[["task", "shots", "n", *[c for c in table.columns if c not in ("task", "shots", "n")]]]


def run(args: argparse.Namespace) -> int:
    from tl_reversed.experiments.tasks import load_task

    tasks = list(dict.fromkeys(load_task(name).name for name in args.task))  # a repeated task counts once
    out = writable_folder(args.out)
    model = load_cli_model(args)
    table = sparsity_table(model, tasks, args.shots, n=args.n, seed=args.seed, batch_size=args.batch_size)
    table.to_csv(out / "sparsity.csv", index=False, float_format="%.4f")
    rows = [[r.task, r.shots, r.n, r.measure, f"{r.ra_sparser_pairs} / {r.pairs}", f"{r.ra_sparser_heads} / {r.heads}",
             f"{r.ra_mean:.3f}", f"{r.fa_mean:.3f}"] for r in table.itertuples()]  # fmt: skip
    text = markdown_table(["task", "shots", "prompts", "measure", "RA sparser: (prompt, head) pairs", "RA sparser: heads",
                           "RA mean", "FA mean"], rows)  # fmt: skip
    (out / "sparsity.md").write_text(
        "Sparsity of RA and forward attention (top-5% mass share and Hoyer index, higher = sparser), "
        f"over each map's causal entries.\n\n{text}\n\nModel: {args.model or 'SmolLM2-135M-Instruct (embedded)'}.\n\n"
        f"```bash\n{command_line()}\n```\n"
    )
    print(text)
    return 0
