"""Collect the per-task CSVs under docs/results/ into the summary tables of README.md.

    python docs/results/summarize.py          # prints Markdown to paste into README.md

It also draws ``patching-structured[/<model>]/steps.png``: accuracy per step of iterative patching.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
TASK_ORDER = [
    "capitalize", "present-past", "singular-plural", "capitalize_first_letter", "country-capital", "antonym",
    "choose_middle_of_3", "person-sport", "landmark_in_country", "verb_past_tense", "adjective_v_verb_3",
    "animal_v_object_3", "alphabetically_first_3", "product_by_company", "country_capital_city", "english-french",
    "landmark-country", "person_plays_pro_sport", "company_hq", "synonym", "next_item", "prev_item",
    "next_capital_letter",
]  # fmt: skip
NAMES = {"ra": "RA", "fa": "FA", "cm1": "CM1", "cm2": "CM2", "atp": "AtP", "atp0": "AtP0", "random": "Random", "index": "Index"}
MODELS = {"smollm2": "SmolLM2-135M", "gemma-3-270m": "Gemma 3 270M"}


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def ordered(frame: pd.DataFrame) -> pd.DataFrame:
    rank = {t: i for i, t in enumerate(TASK_ORDER)}
    return frame.sort_values(["task", "shots"], kind="stable", key=lambda c: c.map(lambda t: rank.get(t, len(rank))) if c.name == "task" else c)


def accuracy() -> str:
    """Which tasks each model solves: top-1 accuracy at 0, 1 and 5 shots (``accuracy/<model>/``)."""
    frames = {m: pd.read_csv(f) for m in MODELS if (f := HERE / "accuracy" / m / "accuracy.csv").exists()}
    if not frames:
        return "(no accuracy tables yet)"
    tasks = list(dict.fromkeys(t for f in frames.values() for t in f["task"]))
    shots = sorted(set.union(*(set(f["shots"]) for f in frames.values())))
    header = ["task"] + [f"{MODELS[m]} {k}-shot" for m in frames for k in shots]
    rows = []
    for task in tasks:
        row: list[object] = [task]
        for frame in frames.values():
            part = frame[frame["task"] == task].set_index("shots")
            row += [f"{part.loc[k, 'accuracy']:.2f}" if k in part.index else "" for k in shots]
        rows.append(row)
    sizes = "; ".join(f"{MODELS[m]}: {int(f['n'].min())}-{int(f['n'].max())} test prompts per task" for m, f in frames.items())
    return table(header, rows) + f"\n\n({sizes}.)"


def five_shot(model: str) -> dict[str, float]:
    """Each task's 5-shot accuracy (``accuracy/<model>/accuracy.csv``; empty if not measured)."""
    path = HERE / "accuracy" / model / "accuracy.csv"
    if not path.exists():
        return {}
    acc = pd.read_csv(path)
    return dict(zip(acc[acc["shots"] == 5]["task"], acc[acc["shots"] == 5]["accuracy"]))


def informative_tasks(model: str = "smollm2", shots: int = 5, floor: float = 0.3) -> list[str]:
    """Tasks whose ``shots``-shot accuracy is at least ``floor`` (the issues' bar for an informative test)."""
    path = HERE / "accuracy" / model / "accuracy.csv"
    if not path.exists():
        return []
    frame = pd.read_csv(path)
    return frame[(frame["shots"] == shots) & (frame["accuracy"] >= floor)]["task"].tolist()


def folders(kind: str, model: str) -> list[Path]:
    """Result folders of one kind (``perturbation``, ``patching-structured``) for one model: the
    top-level folders hold SmolLM2's tables, ``<kind>/<model>/`` another model's."""
    kinds = ["perturbation", "perturbation-5shot"] if kind == "perturbation" else [kind]
    return [HERE / k if model == "smollm2" else HERE / k / model for k in kinds]


def agreement() -> str:
    """Spearman and Recall@K of each ranking against CM1, from every ``*_agreement.csv``, per model."""
    rows, recalls = [], []
    for model, name in MODELS.items():
        files = sorted(f for folder in folders("perturbation", model) for f in folder.glob("*_agreement.csv"))
        if not files:
            continue
        frame = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
        recalls = [c for c in frame.columns if c.startswith("recall@")]
        mine = []
        for method, part in frame.groupby("method", sort=False):
            mine.append([name, NAMES.get(method, method), len(part), f"{part['spearman'].mean():.2f}",
                         f"{part['spearman'].min():.2f} to {part['spearman'].max():.2f}",
                         *[f"{part[c].mean():.2f}" for c in recalls]])  # fmt: skip
        rows += sorted(mine, key=lambda r: -float(r[3]) if r[3] != "nan" else 2.0)
    if not rows:
        return "(no agreement tables yet)"
    return table(["model", "method", "tests", "mean Spearman with CM1", "range", *[f"mean {c}" for c in recalls]], rows)


def sparsity() -> str:
    """In how many (prompt, head) pairs and heads RA is sparser than forward attention (``sparsity/<model>/``)."""
    rows = []
    for model, name in MODELS.items():
        path = HERE / "sparsity" / model / "sparsity.csv"
        if not path.exists():
            continue
        frame = pd.read_csv(path)
        for measure, part in frame.groupby("measure", sort=False):
            pairs, heads = part["ra_sparser_pairs"].sum() / part["pairs"].sum(), part["ra_sparser_heads"].sum() / part["heads"].sum()
            tests = f"{part['task'].nunique()} tasks x shots {sorted(set(part['shots']))}"
            rows.append([name, measure, tests, f"{pairs:.1%}", f"{heads:.1%}", f"{part['ra_mean'].mean():.3f}", f"{part['fa_mean'].mean():.3f}"])
    if not rows:
        return "(no sparsity tables yet)"
    return table(["model", "measure", "tests", "RA sparser: (prompt, head) pairs", "RA sparser: heads", "RA mean", "FA mean"], rows)


def structured(model: str = "smollm2") -> tuple[str, str]:
    """Structured patching per task and shot count, and the 90%-of-5-shot goal at 0 shots."""
    files = sorted(folders("patching-structured", model)[0].glob("*_patching.csv"))
    if not files:
        return "(no structured patching results yet)", ""
    frame = ordered(pd.concat([pd.read_csv(f) for f in files], ignore_index=True))
    five = five_shot(model)
    rows, met_same, met_struct, counted = [], [], [], []
    for _, r in frame.iterrows():
        sparse = " / ".join(f"{r[f'structured_top{k:g}']:.2f}" for k in (0.01, 0.05, 0.1, 0.25))
        rows.append([r.task, r.shots, f"{r.original:.2f} ({r.n_test})", f"{r.iterative:.2f} (step {int(r.iterative_chosen_step)})",
                     f"{r.all_original:.2f} ({int(r.n_test_all)})", f"{r.structured:.2f}",
                     f"{r.structured_iterative:.2f} (step {int(r.structured_iterative_step)})", sparse,
                     f"{five[r.task]:.2f}" if r.task in five else ""])  # fmt: skip
        if r.shots == 0 and five.get(r.task, 0) >= 0.3:
            counted.append(r.task)
            if r.iterative >= 0.9 * five[r.task]:
                met_same.append(r.task)
            if r.structured_iterative >= 0.9 * five[r.task]:
                met_struct.append(r.task)
    header = ["task", "shots", "one length: original (n)", "one length: iterative RA, auto", "every length: original (n)",
              "structured RA (-30)", "iterative structured RA, auto", "structured, top 1/5/10/25% heads", "5-shot accuracy"]  # fmt: skip
    goal = (f"0-shot tasks with 5-shot accuracy >= 0.3 run so far: {len(counted)}. Patched 0-shot accuracy at least 90% of "
            f"the model's own 5-shot accuracy: iterative RA on one length in {len(met_same)} ({', '.join(met_same) or 'none'}); "
            f"iterative structured RA on every length in {len(met_struct)} ({', '.join(met_struct) or 'none'}).")  # fmt: skip
    return table(header, rows), goal


def steps_figure(model: str = "smollm2", shots: int = 0) -> Path | None:
    """Accuracy after each step of iterative RA patching (``*_iterative.csv``) for the tasks whose
    5-shot accuracy is at least 0.3: left raw, right as a share of the 5-shot accuracy (goal: 0.9).
    The step chosen on the training loss is circled. Writes ``steps.png`` beside the tables."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = folders("patching-structured", model)[0]
    files = sorted(folder.glob("*_iterative.csv"))
    five = five_shot(model)
    if not files or not five:
        return None
    steps = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    tables = pd.concat([pd.read_csv(f) for f in sorted(folder.glob("*_patching.csv"))], ignore_index=True)
    chosen = {r.task: int(r.iterative_chosen_step) for r in tables[tables["shots"] == shots].itertuples()}
    fig, (raw, share) = plt.subplots(1, 2, figsize=(11, 5.2), sharex=True)
    for task in ordered(tables[tables["shots"] == shots])["task"]:
        if five.get(task, 0) < 0.3:
            continue
        part = steps[(steps["task"] == task) & (steps["shots"] == shots)].sort_values("step")
        (line,) = raw.plot(part["step"], part["accuracy"], marker=".", label=f"{task} (5-shot {five[task]:.2f})")
        share.plot(part["step"], part["accuracy"] / five[task], marker=".", color=line.get_color())
        at = part[part["step"] == chosen[task]]["accuracy"]
        for ax, y in ((raw, at), (share, at / five[task])):
            ax.plot([chosen[task]], y, "o", markersize=9, fillstyle="none", color=line.get_color())
    share.axhline(0.9, color="grey", linestyle="--", label="goal: 90% of 5-shot")
    raw.set(xlabel="step", ylabel=f"top-1 accuracy, {shots}-shot test prompts", ylim=(-0.02, 1.02))
    share.set(xlabel="step", ylabel="share of the model's own 5-shot accuracy")
    share.legend(fontsize="small")
    fig.legend(*raw.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize="small")
    fig.suptitle(f"Iterative RA patching on test prompts of one length (lr -10; circled: the step chosen on the training loss), {MODELS[model]}")
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    out = folder / "steps.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


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


def perturbation(model: str = "smollm2") -> tuple[str, str]:
    files = [f for folder in folders("perturbation", model) for f in sorted(folder.glob("*_auc.csv"))]
    if not files:
        return "(no perturbation results yet)", ""
    frame = ordered(pd.concat([pd.read_csv(f) for f in files], ignore_index=True))
    methods = list(dict.fromkeys(frame["method"]))
    rows, wins = [], {m: [0] for m in methods}
    for (task, shots), part in frame.groupby(["task", "shots"], sort=False):
        part = part.set_index("method")
        row: list[object] = [task, shots, f"{part['accuracy_all_heads'].iloc[0]:.2f}"]
        for m in methods:  # a method added to only some tables (atp0) is "-" elsewhere
            row.append(f"{part.loc[m, 'auc']:.2f} / {part.loc[m, 'auc_reverse']:.2f}" if m in part.index else "-")
        best_own = part["auc"].round(3).max()
        for m in methods:
            wins[m][0] += int(m in part.index and round(part.loc[m, "auc"], 3) == best_own and part["accuracy_all_heads"].iloc[0] >= 0.1)
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
                NAMES.get(m, m) + ("" if len(mine) == n_tests else f" ({len(mine)} tests)"),
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


def section(title: str, *blocks: str, first: bool = False) -> None:
    """Print one Markdown section: its heading (after a blank line unless ``first``), then each block after a blank line."""
    print(f"## {title}" if first else f"\n## {title}")
    for block in blocks:
        print(f"\n{block}")


if __name__ == "__main__":
    section("Which tasks each model solves", accuracy(), first=True)
    section("Agreement with causal mediation (CM1)", agreement())
    section("Sparsity", sparsity())
    for model, name in MODELS.items():
        figure = steps_figure(model)
        picture = [f"![accuracy per step]({figure.relative_to(HERE)})"] if figure is not None else []
        section(f"Structured patching: {name}", *structured(model), *picture)
    section("Patching", patching())
    for model, name in MODELS.items():
        section(f"Perturbation: {name}", *perturbation(model))
