"""Add one ranking method to a committed perturbation table without recomputing the others.

    python docs/results/add_method.py --folder docs/results/perturbation --task capitalize \
        --shots 1 --method atp0 --n 30 --n-score 10

Runs ``tl-reversed perturbation`` for the one method with the table's settings (the same
seed, scoring and test prompts: the command picks them from the seed) into a temporary
folder, then replaces that method's rows in the table's ``_auc``, ``_curves`` and
``_scores`` CSVs, and rewrites ``_agreement.csv`` (against CM1), the Markdown table and
the curves figure from the merged rows. Every method's rows are computed by the same
command with the same settings; only their order of computation differs. Used to add
``atp0`` (issue 14) to the tables computed before it existed. Tables made by
tl_reversed 0.1.0 (the one-shot and SmolLM2 five-shot tables) need ``--draw 0.1.0``: its
demonstrations were drawn differently; the script refuses new rows whose accuracy with
all heads differs from the table's (other test prompts).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from tl_reversed.commands.perturbation import agreement_table, auc_markdown, plot_curves


def merge(folder: Path, new: Path, task: str, method: str) -> pd.DataFrame:
    """Replace ``method``'s rows of each CSV; returns the merged AUC table."""
    tables = {}
    old_auc, new_auc = pd.read_csv(folder / f"{task}_auc.csv"), pd.read_csv(new / f"{task}_auc.csv")
    for shots, part in new_auc.groupby("shots"):
        others = old_auc[(old_auc["shots"] == shots) & (old_auc["method"] != method)]
        if len(others) and not (others["accuracy_all_heads"] - part["accuracy_all_heads"].iloc[0]).abs().max() < 1e-9:
            raise SystemExit(
                f"{task} {shots}-shot: the new rows' accuracy with all heads ({part['accuracy_all_heads'].iloc[0]:.4f}) is "
                f"not the table's ({others['accuracy_all_heads'].iloc[0]:.4f}): other test prompts. Was the table made "
                "by tl_reversed 0.1.0? Then pass --draw 0.1.0."
            )
    for kind in ("auc", "curves", "scores"):
        old = pd.read_csv(folder / f"{task}_{kind}.csv")
        add = pd.read_csv(new / f"{task}_{kind}.csv")
        if set(add["shots"]) - set(old["shots"]):
            raise SystemExit(f"{task}: the table has shots {sorted(set(old['shots']))}, the new rows {sorted(set(add['shots']))}")
        tables[kind] = pd.concat([old[old["method"] != method], add], ignore_index=True)
    fmt = {"auc": "%.4f", "curves": "%.4f", "scores": "%.6g"}
    for kind, frame in tables.items():
        frame.to_csv(folder / f"{task}_{kind}.csv", index=False, float_format=fmt[kind])
    agreements = agreement_table(tables["scores"])
    if agreements is not None:
        agreements.to_csv(folder / f"{task}_agreement.csv", index=False, float_format="%.4f")
    return tables["auc"], tables["curves"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--shots", required=True, help="the table's shot counts, e.g. 1 or 0,1")
    parser.add_argument("--method", required=True)
    parser.add_argument("--n", required=True)
    parser.add_argument("--n-score", required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--draw", default="current", help="current, or 0.1.0 for the tables tl_reversed 0.1.0 made")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "tl_reversed.commands.cli", "perturbation", "--task", args.task, "--shots", args.shots,
                   "--methods", args.method, "--n", args.n, "--n-score", args.n_score, "--seed", "0", "--draw", args.draw, "--out", tmp]  # fmt: skip
        if args.model:
            command += ["--model", args.model]
        subprocess.run(command, check=True)
        aucs, curves = merge(args.folder, Path(tmp), args.task, args.method)
    shots = [int(s) for s in args.shots.split(",")]
    methods = list(dict.fromkeys(aucs["method"]))
    md = args.folder / f"{args.task}_perturbation.md"
    text = md.read_text()
    start = text.index("| method |")
    end = text.index("\n\n", start)
    draw = "" if args.draw == "current" else f" --draw {args.draw}"
    added = f"\n\nThe {args.method} rows were added later by `python docs/results/add_method.py --folder {args.folder} " \
            f"--task {args.task} --shots {args.shots} --method {args.method} --n {args.n} --n-score {args.n_score}{draw}` " \
            "(the same command and settings for that one method)."  # fmt: skip
    rest = text[end:].rstrip("\n")
    if f"\n\nThe {args.method} rows were added later" in rest:  # added again: the new sentence replaces the old
        rest = rest[: rest.index(f"\n\nThe {args.method} rows were added later")]
    md.write_text(text[:start] + auc_markdown(aucs, shots, methods) + rest + added + "\n")
    plot_curves(curves, shots, args.task).savefig(args.folder / f"{args.task}_curves.png", dpi=110, bbox_inches="tight")
    print(f"added {args.method} to {args.folder}/{args.task}_*")


if __name__ == "__main__":
    main()
