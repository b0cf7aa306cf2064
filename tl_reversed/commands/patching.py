"""``tl-reversed patching``: attention patching (the paper's Table 13) for one task.

For each shot count: take training prompts of one token length (the length with the
most test prompts among those with enough training prompts), average their RA maps
and their forward attention, add ``lr * maps`` to every head's attention while the
model reads test prompts of that length, and measure top-1 accuracy for each lr of the
paper's sweep. With ``--iterative``, also repeat the RA step (recompute RA under the
current patch, add ``lr * RA``) and report accuracy after each step. Writes, under
``--out``::

    {task}_patching.csv     one row per shot count (the table)
    {task}_sweep.csv        one row per (shots, source, lr): accuracy
    {task}_iterative.csv    one row per (shots, step): accuracy, training loss (--iterative)
    {task}_patching.md      the table, with the command that made it
    {task}_sweep.png        accuracy against lr, one panel per shot count

With ``--save PATCH``, also learn a structured (length-independent) RA patch on the
training prompts of every length (:func:`tl_reversed.experiments.structured_patch.structured_maps`,
lr ``--lr-ra``), save it to ``PATCH`` (``PATCH_{shots}shot.safetensors`` for several shot
counts; apply it with ``tl-reversed apply-patch``) and add its accuracy on the test prompts
of every length, and the unpatched accuracy on them, to the table (``structured``,
``all_original``, ``n_test_all``); with ``--iterative`` too, iterative structured patching
on every length, its accuracy and training loss per step in ``{task}_structured_steps.csv``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tl_reversed.commands.common import (
    Checkpoint,
    add_draw_argument,
    add_model_argument,
    command_line,
    draw_note,
    draw_settings,
    int_list,
    load_cli_model,
    markdown_table,
    writable_folder,
)


def float_list(text: str) -> list[float]:
    """``"1,-10,-30"`` -> ``[1.0, -10.0, -30.0]``; ``"paper"`` -> the paper's sweep (argparse type)."""
    from tl_reversed.experiments.attention_patching import PAPER_LRS

    if text.strip().lower() == "paper":
        return [float(lr) for lr in PAPER_LRS]
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 1,-10,-30 or 'paper', got {text!r}") from None


def steps_arg(text: str) -> int | str:
    """``"5"`` -> ``5``; ``"auto"`` -> ``"auto"`` (argparse type)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of steps or 'auto', got {text!r}") from None


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "patching",
        help="attention patching with averaged RA / forward-attention maps (the paper's Table 13)",
        description="Average RA maps (and forward attention) over training prompts of one length, add "
        "lr * maps to every head's attention on test prompts of that length, and report accuracy per lr; "
        "--iterative also repeats the RA step under the current patch. Each finished sweep is saved under "
        "OUT/.partial/, so a killed run resumes where it stopped.",
    )
    parser.add_argument("--task", required=True, help="task name, e.g. capitalize (see tl_reversed.experiments.tasks.list_tasks())")
    parser.add_argument("--shots", type=int_list, default=[0, 1, 5], help="shot counts (default 0,1,5)")
    parser.add_argument("--iterative", action="store_true", help="also run iterative RA patching")
    parser.add_argument("--n-train", type=int, default=25, help="training prompts of one length to average (default 25)")
    parser.add_argument("--n-test", type=int, default=100, help="test prompts of that length, at most (default 100)")
    parser.add_argument("--lrs", type=float_list, default="paper", help="lr sweep, comma-separated, or 'paper' (default)")
    parser.add_argument("--lr-ra", type=float, default=-30.0, help="the RA lr of the table (default -30, the paper's)")
    parser.add_argument("--lr-fa", type=float, default=1.0, help="the forward-attention lr of the table (default +1, the paper's)")
    parser.add_argument("--iter-lr", type=float, default=-10.0, help="lr of each iterative step (default -10)")
    parser.add_argument("--steps", type=steps_arg, default=5,
                        help="iterative steps, or 'auto': stop when the training loss plateaus (below --tol, relative) "
                        "and keep the step of lowest training loss, chosen on the training prompts only (default 5)")
    parser.add_argument("--max-steps", type=int, default=10, help="with --steps auto: at most this many steps (default 10)")
    parser.add_argument("--tol", type=float, default=1e-3, help="with --steps auto: the relative loss improvement that counts (default 0.001)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the demonstrations")
    parser.add_argument("--template", type=int, default=0, help="relation tasks: which prompt template (default 0)")
    add_draw_argument(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default 16)")
    parser.add_argument("--out", default="out/patching", help="output folder (default out/patching)")
    parser.add_argument("--no-resume", action="store_true", help="recompute steps saved by an interrupted run")
    parser.add_argument("--save", default=None, metavar="PATCH",
                        help="also learn a structured RA patch on training prompts of every length, save it to PATCH "
                        "(.safetensors; PATCH_{shots}shot.safetensors for several shot counts) and test it on every length")  # fmt: skip
    add_model_argument(parser)
    return parser


def pick_length(model, train, test, n_train: int, n_test: int):
    """The prompt length with enough training prompts and the most test prompts.

    Lengths are ranked by ``(min(train, n_train), min(test, n_test))``, ties to the shorter.
    Returns the length and the two groups, cut to ``n_train`` and ``n_test``.
    """
    from tl_reversed.experiments.tasks import same_length_groups

    train_groups = {g.length: g for g in same_length_groups(model, train)}
    test_groups = {g.length: g for g in same_length_groups(model, test)}
    common = sorted(set(train_groups) & set(test_groups))
    if not common:
        raise ValueError("no prompt length has both training and test prompts: try other shots or another seed")
    length = max(common, key=lambda n: (min(len(train_groups[n]), n_train), min(len(test_groups[n]), n_test), -n))
    return length, train_groups[length][:n_train], test_groups[length][:n_test]


def run(args: argparse.Namespace) -> int:
    import pandas as pd
    from tqdm.auto import tqdm

    from tl_reversed.experiments.tasks import load_task, make_examples

    task = load_task(args.task).name
    if args.steps != "auto" and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    out = writable_folder(args.out)
    lrs = list(dict.fromkeys([*args.lrs, args.lr_ra, args.lr_fa, 0.0]))
    settings = {k: getattr(args, k) for k in ("model", "n_train", "n_test", "seed", "template", "batch_size")}
    settings.update(draw_settings(args.draw))
    checkpoint = Checkpoint(out, f"{task}_patching", {"task": task, "lrs": lrs, "iter_lr": args.iter_lr, "steps": args.steps, "max_steps": args.max_steps, "tol": args.tol, **settings}, enabled=not args.no_resume)
    model = load_cli_model(args)

    rows, sweeps, iterations, structured_steps, seconds, structured_seconds = [], [], [], [], 0.0, 0.0
    parts = ["ra", "fa"] + (["iterative"] if args.iterative else [])
    bar = tqdm(total=len(args.shots) * len(parts), desc=f"patching {task}", unit="step")
    for shots in args.shots:
        common = dict(shots=shots, seed=args.seed, model=model, template=args.template, draw=args.draw)
        length, train, test = pick_length(
            model, make_examples(task, split="train", **common), make_examples(task, split="test", **common), args.n_train, args.n_test
        )
        units = {}
        for part in parts:
            bar.set_postfix_str(f"{shots}-shot {part}")
            key = f"{shots}-shot_{part}"
            saved = checkpoint.load(key)
            if saved is None:
                start = time.perf_counter()
                saved = {part: _patching_unit(model, part, train, test, lrs, args)}, {"seconds": time.perf_counter() - start}
                checkpoint.save(key, *saved)
            units[part] = saved[0][part]
            seconds += saved[1]["seconds"]
            bar.update()
        ra, fa = units["ra"], units["fa"]
        row = {
            "task": task,
            "shots": shots,
            "length": length,
            "n_train": len(train),
            "n_test": len(test),
            "original": ra.original,
            "fa": fa.at(args.lr_fa),
            "ra": ra.at(args.lr_ra),
            "fa_best_lr": fa.best()[0],
            "fa_best": fa.best()[1],
            "ra_best_lr": ra.best()[0],
            "ra_best": ra.best()[1],
        }
        sweeps += [{"task": task, "shots": shots, "source": part, "lr": lr, "accuracy": acc} for part in ("ra", "fa") for lr, acc in zip(units[part].lrs, units[part].accuracy)]
        if args.iterative:
            it = units["iterative"]
            chosen = it.chosen_step if it.chosen_step is not None else len(it.accuracy) - 1
            row.update(iterative_lr=args.iter_lr, iterative_steps=args.steps, iterative_chosen_step=chosen,
                       iterative=it.accuracy[chosen], iterative_best=max(it.accuracy))  # fmt: skip
            iterations += [
                {"task": task, "shots": shots, "step": step, "lr": args.iter_lr, "accuracy": acc, "train_loss": loss}
                for step, (acc, loss) in enumerate(zip(it.accuracy, it.train_loss))
            ]
        if args.save:
            structured, steps, took = _structured_unit(checkpoint, model, task, shots, common, args)
            structured_seconds += took
            row.update(structured)
            structured_steps += steps
        rows.append(row)
    bar.close()

    table = pd.DataFrame(rows)
    sweep_table = pd.DataFrame(sweeps)
    iterative_table = pd.DataFrame(iterations)
    table.to_csv(out / f"{task}_patching.csv", index=False, float_format="%.4f")
    sweep_table.to_csv(out / f"{task}_sweep.csv", index=False, float_format="%.4f")
    if iterations:
        iterative_table.to_csv(out / f"{task}_iterative.csv", index=False, float_format="%.4f")
    if structured_steps:
        pd.DataFrame(structured_steps).to_csv(out / f"{task}_structured_steps.csv", index=False, float_format="%.4f")
    markdown = patching_markdown(table, args)
    (out / f"{task}_patching.md").write_text(
        f"# Attention patching: {task}\n\n"
        "Top-1 accuracy on test prompts of one length, with the mean map of training prompts of that length "
        "added to every head's attention. *best lr* is the best of the sweep, chosen on the test prompts "
        "(an optimistic upper bound, not a held-out result).\n\n"
        f"{markdown}\n\nModel: {args.model or 'SmolLM2-135M-Instruct (embedded)'}; seed {args.seed}"
        f"{draw_note(args.draw)}; "
        f"{seconds / 60:.1f} min of patching runs"
        f"{f'; {structured_seconds / 60:.1f} min of structured patching' if args.save else ''}.\n\n```bash\n{command_line()}\n```\n"
    )
    plot_sweeps(table, sweep_table, iterative_table, task).savefig(out / f"{task}_sweep.png", dpi=110, bbox_inches="tight")
    checkpoint.clear()
    print(markdown)
    print(f"wrote {out}/{task}_patching.csv, _sweep.csv, _patching.md, _sweep.png ({seconds / 60:.1f} min)")
    return 0


SPARSE_FRACTIONS = (0.01, 0.05, 0.10, 0.25, 1.0)
"""With ``--save``: the structured patch is also tested on only the top k heads by its norm."""


def _structured_unit(checkpoint: Checkpoint, model, task: str, shots: int, common: dict, args: argparse.Namespace) -> tuple[dict, list[dict], float]:
    """:func:`_save_structured` as a checkpoint unit: its table columns, step rows and seconds.

    The unit keeps plain numbers only (in the record's ``info``); it counts as done while
    the patch file it saved is still there.
    """
    import pandas as pd

    key, path = f"{shots}-shot_structured", _patch_path(args, shots)
    saved = checkpoint.load(key)
    if saved is not None and path.exists():
        info = saved[1]
        print(f"the structured {shots}-shot patch is {path} (kept from the interrupted run)")
        return info["row"], info["steps"], info["seconds"]
    start = time.perf_counter()
    row, steps = _save_structured(model, task, shots, common, args)
    seconds = time.perf_counter() - start
    plain = json.loads(pd.DataFrame(steps).to_json(orient="records")) if steps else []
    row = {k: v.item() if hasattr(v, "item") else v for k, v in row.items()}
    checkpoint.save(key, {}, {"row": row, "steps": plain, "seconds": seconds})
    return row, plain, seconds


def _patch_path(args: argparse.Namespace, shots: int) -> Path:
    """Where ``--save`` puts the structured patch of ``shots`` (``PATCH_{shots}shot`` for several shot counts)."""
    path = Path(args.save)
    if len(args.shots) > 1:
        path = path.with_name(f"{path.stem}_{shots}shot{path.suffix or '.safetensors'}")
    return path


def _save_structured(model, task: str, shots: int, common: dict, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """Learn the structured RA patch on training prompts of every length, save it, test it on every length.

    Also tests the patch on only its top 1%, 5%, 10% and 25% of heads (by the patch's norm;
    columns ``structured_top0.01`` ...): how few heads carry the task; and with
    ``--iterative``, iterative structured patching with the same steps rule (columns
    ``structured_iterative``, its chosen step and its best step's accuracy). Returns the
    table's columns and, with ``--iterative``, one row per step (``{task}_structured_steps.csv``).
    """
    from tl_reversed.experiments.iterative_structured import iterative_structured
    from tl_reversed.experiments.structured_patch import sparse_patching, structured_maps
    from tl_reversed.experiments.tasks import load_task, make_examples

    task_info = load_task(task)
    template = None if task_info.kind == "icl" else task_info.templates[args.template]
    train = make_examples(task, split="train", n=args.n_train, **common)
    test = make_examples(task, split="test", n=args.n_test, **common)
    patch = structured_maps(model, train, "ra", lr=args.lr_ra, template=template, batch_size=args.batch_size)
    path = _patch_path(args, shots)
    patch.save(path)
    print(f"saved the structured {shots}-shot patch to {path}")
    sparse = sparse_patching(model, patch, test, SPARSE_FRACTIONS, batch_size=args.batch_size)
    row = {
        "n_test_all": len(test),
        "all_original": sparse.original,
        "structured": sparse.accuracy[-1],
        **{f"structured_top{k:g}": acc for k, acc in zip(SPARSE_FRACTIONS[:-1], sparse.accuracy)},
    }
    if getattr(args, "iterative", False):
        it = iterative_structured(model, train, test, lr=args.iter_lr, steps=args.steps, max_steps=args.max_steps,
                                  tol=args.tol, template=template, batch_size=args.batch_size)  # fmt: skip
        row.update(structured_iterative=it.accuracy[it.chosen_step], structured_iterative_step=it.chosen_step,
                   structured_iterative_best=max(it.accuracy))  # fmt: skip
        steps = it.to_dataframe().assign(task=task, shots=shots, chosen=lambda f: f["step"] == it.chosen_step)
        return row, steps[["task", "shots", "step", "lr", "accuracy", "train_loss", "chosen"]].to_dict("records")
    return row, []


def _patching_unit(model, part: str, train, test, lrs: list[float], args: argparse.Namespace):
    """One checkpoint unit: the RA sweep, the FA sweep (``PatchingSweep``) or the iterative run (``IterativePatching``)."""
    from tl_reversed.experiments.attention_patching import average_maps, evaluate_patching, iterative_patching

    if part == "iterative":
        return iterative_patching(model, train, test, lr=args.iter_lr, steps=args.steps, max_steps=args.max_steps,
                                  tol=args.tol, batch_size=args.batch_size)  # fmt: skip
    maps = average_maps(model, train, part, batch_size=args.batch_size)
    return evaluate_patching(model, train, test, part, lrs, maps=maps, batch_size=args.batch_size)


def patching_markdown(table, args: argparse.Namespace) -> str:
    """Shot counts as rows: original, FA, RA (paper lrs), best lr of each, iterative RA."""
    header = ["shots", "length", "train / test", "original", f"FA (lr {args.lr_fa:+g})", f"RA (lr {args.lr_ra:+g})", "FA best lr", "RA best lr"]
    if "iterative" in table:
        header.append(f"iterative RA (lr {args.iter_lr:+g}, {args.steps} steps; chosen step; best step)")
    if "structured" in table:
        header.append("structured RA, every length (original; n test)")
        header.append("structured, top 1% / 5% / 10% / 25% of heads")
    if "structured_iterative" in table:
        header.append(f"iterative structured RA, every length (lr {args.iter_lr:+g}, {args.steps} steps; chosen step; best step)")
    rows = []
    for _, r in table.iterrows():
        row = [
            int(r["shots"]),
            int(r["length"]),
            f"{int(r['n_train'])} / {int(r['n_test'])}",
            f"{r['original']:.2f}",
            f"{r['fa']:.2f}",
            f"{r['ra']:.2f}",
            f"{r['fa_best']:.2f} ({r['fa_best_lr']:+g})",
            f"{r['ra_best']:.2f} ({r['ra_best_lr']:+g})",
        ]
        if "iterative" in table:
            row.append(f"{r['iterative']:.2f} (step {int(r['iterative_chosen_step'])}; {r['iterative_best']:.2f})")
        if "structured" in table:
            row.append(f"{r['structured']:.2f} ({r['all_original']:.2f}; {int(r['n_test_all'])})")
            row.append(" / ".join(f"{r[f'structured_top{k:g}']:.2f}" for k in SPARSE_FRACTIONS[:-1]))
        if "structured_iterative" in table:
            row.append(f"{r['structured_iterative']:.2f} (step {int(r['structured_iterative_step'])}; "
                       f"{r['structured_iterative_best']:.2f})")  # fmt: skip
        rows.append(row)
    return markdown_table(header, rows)


def plot_sweeps(table, sweeps, iterations, task: str):
    """Accuracy against lr for RA and FA, one panel per shot count (iterative result as a line).

    Each panel is :func:`tl_reversed.views.plotting.plot_lr_sweep` on a symmetric-log lr axis.
    """
    from tl_reversed.views.plotting import figure_row, plot_lr_sweep

    fig, axes = figure_row(len(table), (4.5, 3.6))
    for ax, (_, row) in zip(axes, table.iterrows()):
        shots = row["shots"]
        part = sweeps[sweeps["shots"] == shots]
        baselines = {"no patch": row["original"]}
        if "iterative" in table:
            baselines[f"iterative RA (step {int(row['iterative_chosen_step'])}, lr {row['iterative_lr']:g})"] = row["iterative"]
        title = f"{task}, {shots}-shot (length {int(row['length'])}, {int(row['n_test'])} test)"
        plot_lr_sweep(part.assign(source=part["source"].str.upper() + " patch"), baselines, title, ax=ax, xscale="symlog")
        if ax is not axes[0]:
            ax.set_ylabel("")
    return fig
