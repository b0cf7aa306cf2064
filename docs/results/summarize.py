"""Collect the per-task CSVs under docs/results/ into the summary tables of README.md.

    python docs/results/summarize.py          # prints the tables as Markdown
    python docs/results/summarize.py --write  # rebuilds README.md's round-2 section (and the top README's results in short)
    python docs/results/summarize.py --check  # exits 1 (and shows the difference) if either is stale

The round-2 section is ``round2.md.in`` (its prose) with every ``{NAME}`` filled from the CSVs
(:func:`round2_values`); the top README's "Results on the embedded model" bullets are
``readme.md.in`` filled the same way (:func:`readme_block`, between the :data:`BLOCK` markers).
tests/test_results_summary.py runs the check. Printing and ``--write``
also draw ``patching-structured[/<model>]/steps.png``: accuracy per step of iterative patching.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
TOP_README = HERE.parents[1] / "README.md"
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


LARGE = "perturbation-5shot-25-60"
"""SmolLM2's five-shot perturbation tables with the evidence issue's 25 scoring / 60 test prompts and eight methods."""


def folders(kind: str, model: str) -> list[Path]:
    """Result folders of one kind (``perturbation``, ``patching-structured``, ...) for one model: the
    top-level folders hold SmolLM2's tables, ``<kind>/<model>/`` another model's. ``perturbation``
    is the paper's tables (round 1's for SmolLM2); ``agreement`` adds SmolLM2's :data:`LARGE` ones."""
    if kind == "agreement":
        return folders("perturbation", model) + (folders(LARGE, model) if model == "smollm2" else [])
    kinds = ["perturbation", "perturbation-5shot"] if kind == "perturbation" else [kind]
    return [HERE / k if model == "smollm2" else HERE / k / model for k in kinds]


def agreement() -> str:
    """Spearman and Recall@K of each ranking against CM1, from every ``*_agreement.csv``, per model."""
    rows, recalls = [], []
    for model, name in MODELS.items():
        files = sorted(f for folder in folders("agreement", model) for f in folder.glob("*_agreement.csv"))
        if not files:
            continue
        frame = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
        recalls = [c for c in frame.columns if c.startswith("recall@")]
        mine = []
        for method, part in frame.groupby("method", sort=False):
            defined = part["spearman"].notna().sum()  # AtP's is undefined where all its scores are 0
            mine.append([name, NAMES.get(method, method), len(part),
                         f"{part['spearman'].mean():.2f}" + ("" if defined == len(part) else f" ({defined} defined)"),
                         f"{part['spearman'].min():.2f} to {part['spearman'].max():.2f}",
                         *[f"{part[c].mean():.2f}" for c in recalls]])  # fmt: skip
        rows += sorted(mine, key=lambda r: -float(r[3].split()[0]) if not r[3].startswith("nan") else 2.0)
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
    if not any(folders("patching-structured", model)[0].glob("*_patching.csv")):
        return "(no structured patching results yet)", ""
    frame, five = structured_frame(model), five_shot(model)
    rows = []
    for _, r in frame.iterrows():
        sparse = " / ".join(f"{r[f'structured_top{k:g}']:.2f}" for k in (0.01, 0.05, 0.1, 0.25))
        rows.append([r.task, r.shots, f"{r.original:.2f} ({r.n_test})", f"{r.iterative:.2f} (step {int(r.iterative_chosen_step)})",
                     f"{r.all_original:.2f} ({int(r.n_test_all)})", f"{r.structured:.2f}",
                     f"{r.structured_iterative:.2f} (step {int(r.structured_iterative_step)})", sparse,
                     f"{five[r.task]:.2f}" if r.task in five else ""])  # fmt: skip
    zero, bar = goal_rows(model)
    counted = list(zero["task"])
    met_same = list(zero[zero["iterative"] >= bar]["task"])
    met_struct = list(zero[zero["structured_iterative"] >= bar]["task"])
    header = ["task", "shots", "one length: original (n)", "one length: iterative RA, auto", "every length: original (n)",
              "structured RA (-30)", "iterative structured RA, auto", "structured, top 1/5/10/25% heads", "5-shot accuracy"]  # fmt: skip
    goal = (f"0-shot tasks with 5-shot accuracy >= 0.3: {len(counted)}. Patched 0-shot accuracy at least 90% of "
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


def patching(model: str = "smollm2") -> str:
    """The paper's patching table (one length; ``patching/``, another model's under ``patching/<model>/``)."""
    files = sorted(folders("patching", model)[0].glob("*_patching.csv"))
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


def perturbation_frame(model: str, kind: str = "perturbation") -> pd.DataFrame:
    """Every ``*_auc.csv`` of one model's perturbation tables (of ``kind``, see :func:`folders`), in task order."""
    files = [f for folder in folders(kind, model) for f in sorted(folder.glob("*_auc.csv"))]
    return ordered(pd.concat([pd.read_csv(f) for f in files], ignore_index=True)) if files else pd.DataFrame()


def informative(frame: pd.DataFrame) -> pd.DataFrame:
    """The tests where the model gets something right with all heads (else every curve is 0)."""
    return frame[frame["accuracy_all_heads"] >= 0.1]


def method_means(model: str, kind: str = "perturbation") -> tuple[int, dict[str, float], dict[str, int]]:
    """Over the informative tests: their number, each method's mean AUC, and how often it is best (ties count)."""
    frame = informative(perturbation_frame(model, kind))
    wins = {m: 0 for m in dict.fromkeys(frame["method"])}
    for _, part in frame.groupby(["task", "shots"], sort=False):
        best = part["auc"].round(3).max()
        for m in part[part["auc"].round(3) == best]["method"]:
            wins[m] += 1
    means = {m: frame[frame["method"] == m]["auc"].mean() for m in wins}
    return frame.groupby(["task", "shots"]).ngroups, means, wins


def perturbation(model: str = "smollm2", kind: str = "perturbation") -> tuple[str, str]:
    """The perturbation table (AUC both orders per task) and the per-method summary over the informative tests."""
    frame = perturbation_frame(model, kind)
    if frame.empty:
        return "(no perturbation results yet)", ""
    methods = list(dict.fromkeys(frame["method"]))
    rows = []
    for (task, shots), part in frame.groupby(["task", "shots"], sort=False):
        part = part.set_index("method")
        row: list[object] = [task, shots, f"{int(part['n_score'].iloc[0])} / {int(part['n_test'].iloc[0])}", f"{part['accuracy_all_heads'].iloc[0]:.2f}"]
        for m in methods:  # a method added to only some tables (atp0) is "-" elsewhere
            row.append(f"{part.loc[m, 'auc']:.2f} / {part.loc[m, 'auc_reverse']:.2f}" if m in part.index else "-")
        rows.append(row)
    header = ["task", "shots", "prompts (scoring / test)", "acc. all heads"] + [f"{NAMES.get(m, m)} ↑ / ↓" for m in methods]
    # the method summary counts only tests where the model gets something right (else every curve is 0)
    chosen = informative(frame)
    n_tests, _, wins = method_means(model, kind)
    summary_rows = []
    for m in methods:
        mine = chosen[chosen["method"] == m]
        summary_rows.append(
            [
                NAMES.get(m, m) + ("" if len(mine) == n_tests else f" ({len(mine)} tests)"),
                f"{mine['auc'].mean():.3f}",
                f"{mine['auc_reverse'].mean():.3f}",
                f"{(mine['auc'] - mine['auc_reverse']).mean():.3f}",
                wins.get(m, 0),
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


def minutes(folder: Path, suffix: str, what: str) -> str:
    """The range of run times ``"{lo}-{hi}"`` that the tables ``*_{suffix}.md`` in ``folder`` state as "N min of {what}"."""
    found = [float(m.group(1)) for f in folder.glob(f"*_{suffix}.md") if (m := re.search(rf"([\d.]+) min of {what}", f.read_text()))]
    return f"{min(found):.0f}-{max(found):.0f}" if found else "?"


def _sparser_share(part: pd.DataFrame) -> tuple[float, float]:
    """The share of (prompt, head) pairs and of heads in which RA is the sparser map."""
    return part["ra_sparser_pairs"].sum() / part["pairs"].sum(), part["ra_sparser_heads"].sum() / part["heads"].sum()


def sparsity_frame(model: str) -> pd.DataFrame:
    """One model's sparsity table (``sparsity/<model>/sparsity.csv``)."""
    return pd.read_csv(HERE / "sparsity" / model / "sparsity.csv")


def sparsity_verdict(model: str) -> str:
    """In what share of (prompt, head) pairs and heads RA is the sparser map, by measure and shots (``sparsity/<model>/``)."""
    frame, share = sparsity_frame(model), _sparser_share
    hoyer, top = share(frame[frame["measure"] == "hoyer"]), share(frame[frame["measure"] == "top_mass"])
    by_shots = ", ".join(f"{a:.0%} / {b:.0%} at {k} shot{'' if k == 1 else 's'}"
                         for k, part in frame[frame["measure"] == "top_mass"].groupby("shots") for a, b in [share(part)])  # fmt: skip
    shots = " and ".join(str(k) for k in sorted(set(frame["shots"])))
    prompts = f"{frame['n'].min()}" if frame["n"].min() == frame["n"].max() else f"{frame['n'].min()}-{frame['n'].max()}"
    return (f"RA is the sparser map in {hoyer[0]:.0%} of (prompt, head) pairs and {hoyer[1]:.0%} of heads by the Hoyer index, "
            f"{top[0]:.0%} and {top[1]:.0%} by top-5% mass ({by_shots}); {frame['task'].nunique()} tasks, {shots} shots, "
            f"{prompts} prompts each")  # fmt: skip


def structured_frame(model: str) -> pd.DataFrame:
    folder = folders("patching-structured", model)[0]
    return ordered(pd.concat([pd.read_csv(f) for f in sorted(folder.glob("*_patching.csv"))], ignore_index=True))


def goal_rows(model: str) -> tuple[pd.DataFrame, pd.Series]:
    """The 0-shot structured patching rows of the tasks whose 5-shot accuracy is >= 0.3, and 90% of that accuracy."""
    frame, five = structured_frame(model), five_shot(model)
    zero = frame[(frame["shots"] == 0) & frame["task"].map(lambda t: five.get(t, 0) >= 0.3)]
    return zero, zero["task"].map(five) * 0.9


def goal(model: str) -> dict[str, object]:
    """The 90%-of-5-shot goal at 0 shots: tasks counted, met (every length / one length), and those short of it."""
    (zero, bar), five = goal_rows(model), five_shot(model)
    short = zero[zero["structured_iterative"] < bar]
    return {
        "N": len(zero), "MET": int((zero["structured_iterative"] >= bar).sum()), "MET_ONE": int((zero["iterative"] >= bar).sum()),
        "SHORT": ", ".join(f"{r.task} ({r.structured_iterative:.2f} vs {five[r.task]:.2f})" for r in short.itertuples()) or "none",
    }  # fmt: skip


def below_bar(model: str) -> tuple[str, list[str]]:
    """Tasks under the 0.3 bar: their 0-shot iterative structured accuracy against 5-shot, and those not run yet."""
    five = five_shot(model)
    low = [t for t in TASK_ORDER if t in five and five[t] < 0.3]
    frame = structured_frame(model)
    zero = frame[frame["shots"] == 0].set_index("task")
    done = ", ".join(f"{t} {zero.loc[t, 'all_original']:.2f} → {zero.loc[t, 'structured_iterative']:.2f} (5-shot {five[t]:.2f})"
                     for t in low if t in zero.index)  # fmt: skip
    above = [t for t in low if t in zero.index and zero.loc[t, "structured_iterative"] >= 0.9 * five[t]]
    if above:
        done += f" (at least 90% of the 5-shot accuracy in {len(above)} of {sum(t in zero.index for t in low)})"
    return done or "none run yet", [t for t in low if t not in zero.index]


def five_shot_tables(model: str, kind: str) -> tuple[str, str]:
    """The five-shot tables with 25 scoring / 60 test prompts run so far: a verdict clause, and a
    *Open points* bullet naming the informative tasks still without one (empty when none)."""
    done, todo = five_shot_count(model, kind)
    name = MODELS[model]
    took = f" One took {minutes(folders(kind, model)[0], 'perturbation', 'scoring and curves')} minutes on one shared core." if done else ""
    bullet = (f"- **Five-shot perturbation tables on {name}** with 25 scoring / 60 test prompts and eight methods "
              f"(issue 14): {len(done)} of its {len(done) + len(todo)} informative tasks are in; not run yet: {', '.join(todo)}."
              f"{took}\n") if todo else ""  # fmt: skip
    if not done:
        return "The five-shot tables with 25 scoring / 60 test prompts are not run.", bullet
    return f"With 25 scoring / 60 test prompts (where the split holds them) at five shots ({', '.join(done)}): {ranking_verdict(model, kind)}.", bullet


def few_prompts(model: str, kind: str) -> str:
    """A sentence naming the tables that rest on fewer than 25 scoring / 60 test prompts (their task's split is small)."""
    frame = perturbation_frame(model, kind)
    small = frame[(frame["n_test"] < 60) | (frame["n_score"] < 25)].drop_duplicates(["task", "shots"]) if not frame.empty else frame
    if small.empty:
        return ""
    listed = ", ".join(f"{r.task} ({r.n_score} / {r.n_test})" for r in small.itertuples())
    return f" Where a task's split holds fewer prompts the table rests on fewer: {listed}; one test prompt then moves an AUC by more."


ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"]


def ranking_verdict(model: str, kind: str = "perturbation") -> str:
    """Where RA stands among the methods by mean AUC over the informative tests, every mean, and
    which methods are best in how many tables (ties count)."""
    n_tests, means, wins = method_means(model, kind)
    order = sorted(means, key=lambda m: -means[m])
    listed = ", ".join(f"{NAMES.get(m, m)} {means[m]:.3f}" for m in order)
    best = ", ".join(f"{NAMES.get(m, m)} in {wins[m]}" for m in sorted(wins, key=lambda m: -wins[m]) if wins[m])
    return (f"RA is {ORDINALS[order.index('ra')]} of {len(order)} methods by mean AUC over {n_tests} test{'s' if n_tests > 1 else ''} "
            f"({listed}); best ↑ per table: {best}")  # fmt: skip


SPOKEN = {"cm1": "CM1", "cm2": "CM2", "fa": "forward attention", "atp": "AtP", "atp0": "`atp0`", "random": "the random order", "index": "the layer order"}


def standing(model: str, kind: str = "perturbation") -> str:
    """Where RA stands by mean AUC over the informative tests, in words, with the methods ahead of it."""
    _, means, _ = method_means(model, kind)
    order = sorted(means, key=lambda m: -means[m])
    place, ahead = ORDINALS[order.index("ra")], order[: order.index("ra")]
    if not ahead:
        runner = order[1]
        return f"first on average (mean AUC {means['ra']:.2f}, {SPOKEN.get(runner, runner)} {means[runner]:.2f})"
    names = [SPOKEN.get(m, m) for m in ahead]
    behind = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{place} on average, behind {behind} (mean AUC {means['ra']:.2f} against {', '.join(f'{means[m]:.2f}' for m in ahead)})"


def five_shot_count(model: str, kind: str) -> tuple[list[str], list[str]]:
    """The informative tasks with a five-shot table of ``kind`` (25 / 60 prompts), and those still without one."""
    frame = perturbation_frame(model, kind)
    done = list(dict.fromkeys(frame[frame["shots"] == 5]["task"])) if not frame.empty else []
    return done, [t for t in ordered(pd.DataFrame({"task": informative_tasks(model), "shots": 5}))["task"] if t not in done]


def tables_phrase(done: list[str], todo: list[str]) -> str:
    """"3 such tables (of 13 informative tasks: *a*, *b*, *c*)", or "13 such tables (one per informative task)"."""
    if not todo:
        return f"{len(done)} such tables (one per informative task)"
    return f"{len(done)} such table{'s' if len(done) != 1 else ''} (of {len(done) + len(todo)} informative tasks: {', '.join(f'*{t}*' for t in done)})"


def readme_values(vals: dict[str, object]) -> dict[str, object]:
    """The ``{NAME}``s of ``readme.md.in`` (README.md's results in short) that :func:`round2_values` has not."""
    out: dict[str, object] = {}
    for model, key, kind in (("smollm2", "SMOL5", LARGE), ("gemma-3-270m", "GEMMA5", "perturbation-5shot")):
        done, todo = five_shot_count(model, kind)
        out[f"{key}_TABLES"], out[f"{key}_STANDING"] = tables_phrase(done, todo), standing(model, kind)
        out[f"{key}_LEFT"] = len(todo)
    for model, key in (("smollm2", "SMOL"), ("gemma-3-270m", "GEMMA")):
        frame = sparsity_frame(model)
        out[f"{key}_HOYER_PAIRS"] = f"{_sparser_share(frame[frame['measure'] == 'hoyer'])[0]:.0%}"
        out[f"{key}_TOP_PAIRS"] = f"{_sparser_share(frame[frame['measure'] == 'top_mass'])[0]:.0%}"
        out[f"{key}_SPARSE_TASKS"] = frame["task"].nunique()
    left = [f"{n} of {name}'s" for name, n in (("SmolLM2", out["SMOL5_LEFT"]), ("Gemma 3", out["GEMMA5_LEFT"])) if n]
    out["FIVE_SHOT_TODO"] = (f" Not run yet: {' and '.join(left)} five-shot tables with 25 / 60 prompts (the results page lists them)."
                             if left else "")  # fmt: skip
    return {**vals, **out}


def readme_block(vals: dict[str, object] | None = None) -> str:
    """README.md's results in short: ``readme.md.in`` filled from the CSVs (``vals``: :func:`round2_values`, if made already)."""
    vals = round2_values() if vals is None else vals
    return (HERE / "readme.md.in").read_text().format(**readme_values(vals))


BLOCK = ("<!-- made by docs/results/summarize.py from docs/results/readme.md.in: edit that, not this -->\n",
         "<!-- end of the part made by summarize.py -->\n")  # fmt: skip


def readme_with_block(text: str, block: str) -> str:
    """``text`` (the top README.md) with the part between the :data:`BLOCK` markers replaced by ``block``."""
    missing = [m.strip() for m in BLOCK if text.count(m) != 1]
    if missing:
        raise ValueError(f"README.md must hold each of these lines once, around its results in short: {missing}")
    start, end = text.index(BLOCK[0]) + len(BLOCK[0]), text.index(BLOCK[1])
    return text[:start] + block + text[end:]


def round2_values(figures: bool = False) -> dict[str, object]:
    """Every ``{NAME}`` of ``round2.md.in``, computed from the CSVs (``figures``: also draw the steps figures)."""
    if figures:
        for model in MODELS:
            steps_figure(model)
    vals: dict[str, object] = {"ACCURACY": accuracy(), "AGREEMENT": agreement(), "SPARSITY": sparsity()}
    for model, key in (("smollm2", "SMOL"), ("gemma-3-270m", "GEMMA")):
        vals.update({f"{key}_{k}": v for k, v in goal(model).items()})
        vals[f"{key}_SPARSE"] = sparsity_verdict(model)
        vals[f"{key}_PATCH_MIN"] = minutes(folders("patching-structured", model)[0], "patching", "patching runs")
        vals[f"{key}_BELOW"], todo = below_bar(model)
        vals[f"{key}_BELOW_SO_FAR"] = " run so far" if todo else ""
        vals[f"{key}_TODO"] = ", ".join(todo)
        agree = pd.concat([pd.read_csv(f) for folder in folders("agreement", model) for f in folder.glob("*_agreement.csv")])
        vals[f"{key}_AGREE_N"] = int((agree["method"] == "ra").sum())
        for m in ("atp0", "ra"):
            vals[f"{key}_{m.upper()}_RHO"] = f"{agree[agree['method'] == m]['spearman'].mean():.2f}"
    vals["STRUCT_SMOL"], vals["GOAL_SMOL"] = structured("smollm2")
    vals["STRUCT_GEMMA"], vals["GOAL_GEMMA"] = structured("gemma-3-270m")
    vals["PERT_GEMMA"], vals["WINS_GEMMA"] = perturbation("gemma-3-270m")
    vals["PATCH_GEMMA"] = patching("gemma-3-270m")
    vals["PERT_SMOL5"], vals["WINS_SMOL5"] = perturbation("smollm2", LARGE)
    vals["SMOL5_MIN"] = minutes(HERE / LARGE, "perturbation", "scoring and curves")
    vals["SMOL5_FEW"], vals["GEMMA5_FEW"] = few_prompts("smollm2", LARGE), few_prompts("gemma-3-270m", "perturbation-5shot")
    vals["SMOL5_VERDICT"], vals["SMOL5_TODO"] = five_shot_tables("smollm2", LARGE)
    _, vals["GEMMA_TODO_PERT"] = five_shot_tables("gemma-3-270m", "perturbation-5shot")
    vals["GEMMA_PATCH5_MIN"] = minutes(HERE / "patching" / "gemma-3-270m", "patching", "patching runs")
    todo = [f"on {name} for {vals[key + '_TODO']}" for name, key in (("SmolLM2", "SMOL"), ("Gemma 3", "GEMMA")) if vals[key + "_TODO"]]
    vals["BELOW_TODO"] = f"- **Structured patching on the tasks below the 0.3 bar** not run yet {'; '.join(todo)}.\n" if todo else ""
    # the perturbation test: SmolLM2's informative tests, Gemma 3's five-shot tables
    gemma = perturbation_frame("gemma-3-270m")
    vals["GEMMA_PERT_N"] = gemma["task"].nunique()
    vals["GEMMA_PERT_MIN"] = minutes(HERE / "perturbation-5shot" / "gemma-3-270m", "perturbation", "scoring and curves")
    for m in ("ra", "cm1", "atp0"):
        vals["GEMMA_" + m.upper() + ("_AUC" if m == "atp0" else "")] = gemma[gemma["method"] == m]["auc"].mean()
    vals["GEMMA_PERT_VERDICT"] = ranking_verdict("gemma-3-270m")
    large = perturbation_frame("smollm2", LARGE)
    for m in ("ra", "cm1", "atp0"):
        vals["SMOL5_" + m.upper()] = large[large["method"] == m]["auc"].mean() if not large.empty else float("nan")
    n_tests, means, wins = method_means("smollm2")
    vals["SMOL_PERT_N"], vals["SMOL_PERT_RA"], vals["SMOL_PERT_CM1"], vals["SMOL_PERT_RA_WINS"] = n_tests, f"{means['ra']:.3f}", f"{means['cm1']:.3f}", wins["ra"]
    smol = informative(perturbation_frame("smollm2"))
    with_atp0 = set(map(tuple, smol[smol["method"] == "atp0"][["task", "shots"]].values))
    smol = smol[[(t, k) in with_atp0 for t, k in zip(smol["task"], smol["shots"])]]  # the tests that have atp0
    for m in ("ra", "cm1", "atp0"):
        vals["SMOL_" + m.upper() + "_AUC"] = smol[smol["method"] == m]["auc"].mean()
    vals["SMOL_ATP0_N"] = int((smol["method"] == "atp0").sum())
    cm = pd.read_csv(HERE / "cm-resume-check.csv")
    speed = cm["tl_sweep_seconds"] / cm["seconds"]
    vals.update(CM_CHECKED=len(cm), CM_MAXDIFF=f"{cm['max_abs_diff'].max():.1e}", CM_SPEED=f"{speed.min():.1f}-{speed.max():.1f}x",
                CM_SPEARMAN=f"{cm['spearman'].min():.4f}" if cm["spearman"].min() < 0.99995 else "1.0000 in every one")  # fmt: skip
    return vals


def round2(figures: bool = False, vals: dict[str, object] | None = None) -> str:
    """README.md's round-2 section: ``round2.md.in`` filled from the CSVs (``vals``: :func:`round2_values`, if made already)."""
    return (HERE / "round2.md.in").read_text().format(**(round2_values(figures) if vals is None else vals))


def readme_with_round2(text: str, section: str) -> str:
    """``text`` (README.md) with its round-2 section (from "## Round 2" to the next round-1 heading) replaced."""
    start, end = text.index("## Round 2"), text.index("## Attention patching (the paper")
    return text[:start] + section + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rebuild README.md's round-2 section and the top README's results in short from the CSVs")
    mode.add_argument("--check", action="store_true", help="exit 1 if either part differs from the CSVs")
    args = parser.parse_args(argv)
    if args.write or args.check:
        vals = round2_values(figures=args.write)
        made = {HERE / "README.md": lambda text: readme_with_round2(text, round2(vals=vals)),
                TOP_README: lambda text: readme_with_block(text, readme_block(vals))}  # fmt: skip
        stale = 0
        for path, make in made.items():
            text = path.read_text()
            new = make(text)
            if args.check:
                name = str(path.relative_to(TOP_README.parent))
                sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True), name, "from the CSVs"))
                stale |= new != text
            else:
                path.write_text(new)
        return int(stale)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
