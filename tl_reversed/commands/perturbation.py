"""``tl-reversed perturbation``: the paper's perturbation test (its Tables 5-12) for one task.

For each shot count: score every head by each method on training prompts, then keep
the top 0 %, 10 %, ..., 100 % of heads (the rest zeroed at ``hook_z``) on test prompts
and measure top-1 accuracy; report the area under that curve in the ranking's own
order and reversed. Writes, under ``--out``::

    {task}_auc.csv        one row per (shots, method): AUC, reversed AUC, seconds
    {task}_curves.csv     one row per (shots, method, direction, fraction): accuracy
    {task}_scores.csv     one row per (shots, method, layer, head): score and rank
    {task}_agreement.csv  when cm1 is among the methods: one row per (shots, method),
                          Spearman and Recall@10, Recall@10% of CM1's top heads
    {task}_perturbation.md   the table, with the command that made it
    {task}_curves.png     the curves, one panel per shot count
"""

from __future__ import annotations

import argparse
import sys
import time

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
from tl_reversed.core import options

DEFAULT_METHODS = "ra,fa,cm1,cm2,atp,random,index"
"""The paper's seven rankings; ``--methods`` accepts every method in the registry (``ranking.METHODS``)."""
METHOD_NAMES = {"ra": "RA", "fa": "FA", "cm1": "CM1", "cm2": "CM2", "atp": "AtP", "atp0": "AtP0", "random": "Random", "index": "Index"}


def known_methods() -> tuple[str, ...]:
    """The registered ranking methods, without importing torch for ``--help``.

    Methods are registered in :mod:`tl_reversed.experiments.ranking`; until that module is
    imported (a plugin registering a method imports it), the registry holds the built-in
    methods, :data:`tl_reversed.core.options.METHODS`.
    """
    ranking = sys.modules.get("tl_reversed.experiments.ranking")
    return tuple(ranking.METHODS) if ranking is not None else options.METHODS


def method_list(text: str) -> list[str]:
    """``"ra,cm1"`` -> ``["ra", "cm1"]``, checked against the registered methods (argparse type)."""
    METHODS = known_methods()
    values = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [v for v in values if v not in METHODS]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or text!r}; choose from {','.join(METHODS)}")
    return values


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "perturbation",
        help="perturbation test of head rankings (the paper's Tables 5-12)",
        description="Rank heads by RA, forward attention, causal mediation (CM1, CM2), attribution "
        "patching, random and layer order; keep the top 0-100% of heads and measure accuracy; "
        "report each ranking's AUC in its own order (higher is better) and reversed (lower is better). "
        "Each finished ranking is saved under OUT/.partial/, so a killed run resumes where it stopped.",
    )
    parser.add_argument("--task", required=True, help="task name, e.g. capitalize (see tl_reversed.experiments.tasks.list_tasks())")
    parser.add_argument("--shots", type=int_list, default=[0, 1, 5, 10], help="shot counts (default 0,1,5,10)")
    parser.add_argument(
        "--methods",
        type=method_list,
        default=method_list(DEFAULT_METHODS),
        help=f"rankings, comma-separated, from {','.join(known_methods())} (default {DEFAULT_METHODS})",
    )
    parser.add_argument("--n", type=int, default=50, help="test prompts for the perturbation curves (default 50)")
    parser.add_argument("--n-score", type=int, default=25, help="training prompts the heads are scored on (default 25, as the paper)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, demonstrations, label shuffle and random order")
    parser.add_argument("--template", type=int, default=0, help="relation tasks: which prompt template (default 0)")
    add_draw_argument(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default 16)")
    parser.add_argument("--out", default="out/perturbation", help="output folder (default out/perturbation)")
    parser.add_argument("--no-resume", action="store_true", help="recompute rankings saved by an interrupted run")
    add_model_argument(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    import pandas as pd
    from tqdm.auto import tqdm

    from tl_reversed.experiments.perturbation import perturbation_test
    from tl_reversed.experiments.ranking import head_scores
    from tl_reversed.experiments.tasks import load_task, make_examples

    task = load_task(args.task).name
    out = writable_folder(args.out)
    settings = {k: getattr(args, k) for k in ("model", "n", "n_score", "seed", "template", "batch_size")}
    settings.update(draw_settings(args.draw))
    checkpoint = Checkpoint(out, f"{task}_perturbation", {"task": task, **settings}, enabled=not args.no_resume)
    model = load_cli_model(args)

    units, notes = [], []
    bar = tqdm(total=len(args.shots) * len(args.methods), desc=f"perturbation {task}", unit="ranking")
    for shots in args.shots:
        common = dict(shots=shots, seed=args.seed, model=model, template=args.template, draw=args.draw)
        train = make_examples(task, n=args.n_score, split="train", **common)
        corrupted = make_examples(task, n=args.n_score, split="train", shuffle_labels=True, **common)
        test = make_examples(task, n=args.n, split="test", **common)
        if not len(train) or not len(test):
            raise ValueError(f"{task} has no {shots}-shot examples with one-token targets for this model")
        notes.append(f"{shots}-shot: {len(train)} scoring prompts, {len(test)} test prompts")
        cache: dict = {}
        for method in args.methods:
            bar.set_postfix_str(f"{shots}-shot {method}")
            key = f"{shots}-shot_{method}"
            saved = checkpoint.load(key)
            if saved is None:
                start = time.perf_counter()
                results = _ranking_unit(model, method, train=train, corrupted=corrupted, test=test, args=args, cache=cache,
                                         head_scores=head_scores, perturbation_test=perturbation_test)
                saved = results, {"seconds": time.perf_counter() - start}
                checkpoint.save(key, *saved)
            units.append(_unit_rows(task, shots, len(train), len(test), *saved))
            bar.update()
    bar.close()

    aucs = pd.DataFrame([u["auc"] for u in units])
    curves = pd.concat([u["curves"] for u in units], ignore_index=True)
    scores_table = pd.concat([u["scores"] for u in units], ignore_index=True)
    seconds = sum(u["seconds"] for u in units)
    aucs.to_csv(out / f"{task}_auc.csv", index=False, float_format="%.4f")
    curves.to_csv(out / f"{task}_curves.csv", index=False, float_format="%.4f")
    scores_table.to_csv(out / f"{task}_scores.csv", index=False, float_format="%.6g")
    agreements = agreement_table(scores_table)
    if agreements is not None:
        agreements.to_csv(out / f"{task}_agreement.csv", index=False, float_format="%.4f")
    table = auc_markdown(aucs, args.shots, args.methods)
    text = (
        f"# Perturbation test: {task}\n\n"
        f"AUC of top-1 accuracy while keeping the top 0-100% of heads (the rest zeroed at `hook_z`). "
        f"↑: the ranking's own order (higher is better); ↓: reversed, least important first (lower is better).\n\n"
        f"{table}\n\n"
        f"Model: {args.model or 'SmolLM2-135M-Instruct (embedded)'}; seed {args.seed}"
        f"{draw_note(args.draw)}; {'; '.join(notes)}; "
        f"{seconds / 60:.1f} min of scoring and curves.\n\n"
        f"```bash\n{command_line()}\n```\n"
    )
    (out / f"{task}_perturbation.md").write_text(text)
    plot_curves(curves, args.shots, task).savefig(out / f"{task}_curves.png", dpi=110, bbox_inches="tight")
    checkpoint.clear()
    print(table)
    print(f"wrote {out}/{task}_auc.csv, _curves.csv, _scores.csv{', _agreement.csv' if agreements is not None else ''}, _perturbation.md, _curves.png ({seconds / 60:.1f} min)")
    return 0


def _ranking_unit(model, method, *, train, corrupted, test, args, cache, head_scores, perturbation_test) -> dict:
    """Score the heads by one method and run its perturbation curves both ways (one checkpoint unit)."""
    scores = head_scores(model, train, method, corrupted=corrupted, seed=args.seed, batch_size=args.batch_size, progress=False)
    own, backward = (
        perturbation_test(model, test, scores, reverse=reverse, batch_size=args.batch_size, progress=False, cache=cache)
        for reverse in (False, True)
    )
    return {"scores": scores, "own": own, "reversed": backward}


def _unit_rows(task: str, shots: int, n_score: int, n_test: int, results: dict, info: dict) -> dict:
    """The table rows of one unit, made from its results (fresh or loaded from the checkpoint)."""
    import pandas as pd

    scores, own, backward = results["scores"], results["own"], results["reversed"]
    auc = {
        "task": task,
        "shots": shots,
        "method": scores.method,
        "auc": own.auc,
        "auc_reverse": backward.auc,
        "accuracy_all_heads": own.accuracy[-1],
        "accuracy_no_heads": own.accuracy[0],
        "score_seconds": round(scores.seconds, 1),
        "n_score": n_score,
        "n_test": n_test,
    }
    columns = ["task", "shots", "method", "reverse", "fraction", "n_kept", "accuracy"]
    curves = pd.concat([r.to_dataframe().assign(task=task, shots=shots) for r in (own, backward)], ignore_index=True)[columns]
    score_rows = scores.to_dataframe().assign(task=task, shots=shots)[["task", "shots", "method", "layer", "head", "score", "rank"]]
    score_rows["score"] += 0.0  # -0.0 (layer 0 of "index") is written as 0, as in the tables made before
    return {"auc": auc, "curves": curves, "scores": score_rows, "seconds": info["seconds"]}


def agreement_table(scores_table, reference: str = "cm1", ks: tuple = (10, "10%")):
    """Spearman and Recall@K of every method's scores against ``reference``'s, per shot count.

    ``scores_table``: the rows of ``{task}_scores.csv``. ``None`` when ``reference`` was
    not run. A K above the number of heads is left out.
    """
    import pandas as pd
    import torch

    from tl_reversed.experiments.agreement import agreement

    if reference not in set(scores_table["method"]):
        return None
    frames = []
    for (task, shots), rows in scores_table.groupby(["task", "shots"], sort=False):
        grids = {}
        for method, part in rows.groupby("method", sort=False):
            grid = part.pivot(index="layer", columns="head", values="score").sort_index().sort_index(axis=1)
            grids[method] = torch.tensor(grid.to_numpy(), dtype=torch.float64)
        ref = grids[reference]
        fitting = [k for k in ks if not isinstance(k, int) or k <= ref.numel()]
        table = agreement({m: g for m, g in grids.items() if m != reference}, ref, ks=fitting).to_dataframe()
        frames.append(table.assign(reference=reference, task=task, shots=shots))
    columns = ["task", "shots", "method", "reference", "spearman", *[c for c in frames[0] if c.startswith("recall@")]]
    return pd.concat(frames, ignore_index=True)[columns]


def auc_markdown(aucs, shots: list[int], methods: list[str]) -> str:
    """Methods as rows; for each shot count the AUC (↑) and the reversed AUC (↓); best in bold."""
    header = ["method"] + [f"{s}-shot {arrow}" for s in shots for arrow in ("↑", "↓")]
    best = {}
    for s in shots:
        part = aucs[aucs["shots"] == s]
        best[(s, "auc")] = part["auc"].max()
        best[(s, "auc_reverse")] = part["auc_reverse"].min()
    rows = []
    for method in methods:
        row: list[object] = [METHOD_NAMES.get(method, method)]
        for s in shots:
            hit = aucs[(aucs["shots"] == s) & (aucs["method"] == method)].iloc[0]
            for column in ("auc", "auc_reverse"):
                value = f"{hit[column]:.3f}"
                row.append(f"**{value}**" if hit[column] == best[(s, column)] else value)
        rows.append(row)
    base = ["all heads (no mask)"] + [
        f"{aucs[aucs['shots'] == s]['accuracy_all_heads'].iloc[0]:.2f}" if i == 0 else "" for s in shots for i in range(2)
    ]
    return markdown_table(header, rows + [base])


def plot_curves(curves, shots: list[int], task: str):
    """One panel per shot count: accuracy against share of heads kept, solid own order, dashed reversed.

    Each panel is :func:`tl_reversed.views.plotting.plot_perturbation`, labelled with the AUC.
    """
    from tl_reversed.views.plotting import figure_row, plot_perturbation

    fig, axes = figure_row(len(shots), (4.2, 3.6))
    for ax, s in zip(axes, shots):
        part = curves[curves["shots"] == s]
        names = part["method"].map(lambda m: METHOD_NAMES.get(m, m)) + part["reverse"].map({False: "", True: " reversed"})
        plot_perturbation(part.assign(method=names), title=f"{task}, {s}-shot", ax=ax)
        if ax is not axes[0]:
            ax.set_ylabel("")
    return fig
