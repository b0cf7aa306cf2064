"""Collect the per-task CSVs under docs/results/ into the summary tables of README.md.

    python docs/results/summarize.py          # prints Markdown to paste into README.md
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
TASK_ORDER = [
    "capitalize", "present-past", "singular-plural", "capitalize_first_letter", "country-capital", "antonym",
    "choose_middle_of_3", "person-sport", "landmark_in_country", "verb_past_tense",
]  # fmt: skip
NAMES = {"ra": "RA", "fa": "FA", "cm1": "CM1", "cm2": "CM2", "atp": "AtP", "random": "Random", "index": "Index"}


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def ordered(frame: pd.DataFrame) -> pd.DataFrame:
    rank = {t: i for i, t in enumerate(TASK_ORDER)}
    return frame.sort_values(["task", "shots"], key=lambda c: c.map(rank) if c.name == "task" else c)


def patching() -> str:
    files = sorted((HERE / "patching").glob("*_patching.csv"))
    if not files:
        return "(no patching results yet)"
    frame = ordered(pd.concat([pd.read_csv(f) for f in files], ignore_index=True))
    rows = [
        [
            r.task, r.shots, f"{r.n_train} / {r.n_test}", f"{r.original:.2f}", f"{r.fa:.2f}", f"{r.ra:.2f}",
            f"{r.ra_best:.2f} ({r.ra_best_lr:+g})", f"{r.iterative:.2f}",
        ]
        for r in frame.itertuples()
    ]  # fmt: skip
    header = ["task", "shots", "train / test", "original", "FA (+1)", "RA (-30)", "RA best lr*", "iterative RA (-10 x 5)"]
    return table(header, rows)


def perturbation() -> tuple[str, str]:
    files = sorted((HERE / "perturbation").glob("*_auc.csv")) + sorted((HERE / "perturbation-5shot").glob("*_auc.csv"))
    if not files:
        return "(no perturbation results yet)", ""
    frame = ordered(pd.concat([pd.read_csv(f) for f in files], ignore_index=True))
    methods = list(dict.fromkeys(frame["method"]))
    rows, wins = [], {m: [0] for m in methods}
    for (task, shots), part in frame.groupby(["task", "shots"], sort=False):
        part = part.set_index("method")
        row: list[object] = [task, shots, f"{part['accuracy_all_heads'].iloc[0]:.2f}"]
        for m in methods:
            row.append(f"{part.loc[m, 'auc']:.2f} / {part.loc[m, 'auc_reverse']:.2f}")
        best_own = part["auc"].round(3).max()
        for m in methods:
            wins[m][0] += int(round(part.loc[m, "auc"], 3) == best_own and part["accuracy_all_heads"].iloc[0] >= 0.1)
        rows.append(row)
    header = ["task", "shots", "acc. all heads"] + [f"{NAMES.get(m, m)} ↑ / ↓" for m in methods]
    # the method summary counts only tests where the model gets something right (else every curve is 0)
    informative = frame[frame["accuracy_all_heads"] >= 0.1]
    n_tests = informative.groupby(["task", "shots"]).ngroups
    summary_rows = []
    for m in methods:
        mine = informative[informative["method"] == m]
        summary_rows.append(
            [
                NAMES.get(m, m),
                f"{mine['auc'].mean():.3f}",
                f"{mine['auc_reverse'].mean():.3f}",
                f"{(mine['auc'] - mine['auc_reverse']).mean():.3f}",
                wins[m][0],
            ]
        )
    summary = table(
        ["method", f"mean AUC ↑ ({n_tests} tests)", "mean AUC ↓", "mean gap ↑ − ↓", "best ↑ (ties count)"],
        summary_rows,
    )
    return table(header, rows), summary


if __name__ == "__main__":
    print("## Patching\n")
    print(patching())
    full, wins = perturbation()
    print("\n## Perturbation\n")
    print(full)
    print()
    print(wins)
