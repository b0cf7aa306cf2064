"""docs/results/README.md's round-2 section is what ``summarize.py`` makes of the committed CSVs,
so its verdicts and tables cannot drift from the data; its pieces count what they say."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pandas as pd
import pytest

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


@pytest.fixture(scope="module")
def summarize():
    spec = importlib.util.spec_from_file_location("summarize", RESULTS / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_round2_section_is_made_from_the_csvs(summarize):
    text = (RESULTS / "README.md").read_text()
    assert summarize.readme_with_round2(text, summarize.round2()) == text, "stale: run python docs/results/summarize.py --write"
    assert summarize.main(["--check"]) == 0
    assert not re.search(r"\{[A-Z_0-9]+\}", summarize.round2())  # every placeholder filled


def test_the_top_readme_results_are_made_from_the_csvs(summarize):
    """README.md's "Results on the embedded model" bullets are readme.md.in filled from the CSVs."""
    text = summarize.TOP_README.read_text()
    block = summarize.readme_block()
    assert summarize.readme_with_block(text, block) == text, "stale: run python docs/results/summarize.py --write"
    assert not re.search(r"\{[A-Z_0-9]+\}", block)
    assert text.count(summarize.BLOCK[0]) == text.count(summarize.BLOCK[1]) == 1
    text = "a\n" + summarize.BLOCK[0] + "old\n" + summarize.BLOCK[1] + "b\n"
    assert summarize.readme_with_block(text, "new\n") == "a\n" + summarize.BLOCK[0] + "new\n" + summarize.BLOCK[1] + "b\n"


def test_the_standing_names_the_methods_ahead_of_ra(summarize):
    """RA's place by mean AUC, recomputed from the committed Gemma 3 tables."""
    frame = summarize.informative(summarize.perturbation_frame("gemma-3-270m", "perturbation-5shot"))
    means = frame.groupby("method")["auc"].mean().sort_values(ascending=False)
    ahead = list(means.index[: list(means.index).index("ra")])
    words = summarize.standing("gemma-3-270m", "perturbation-5shot")
    assert words.startswith(summarize.ORDINALS[len(ahead)])
    assert all(summarize.SPOKEN[m] in words for m in ahead)
    assert f"{means['ra']:.2f}" in words


def test_only_the_round2_section_is_replaced(summarize):
    text = "# top\n\n## Round 2: old\n\nold\n\n## Attention patching (the paper's Table 13)\n\nkept\n"
    assert summarize.readme_with_round2(text, "## Round 2: new\n\n") == (
        "# top\n\n## Round 2: new\n\n## Attention patching (the paper's Table 13)\n\nkept\n"
    )


def test_the_goal_counts_the_rows_of_the_tables(summarize):
    """The 90%-of-5-shot goal recomputed by hand from the committed CSVs."""
    for model in summarize.MODELS:
        frame = pd.concat(pd.read_csv(f) for f in summarize.folders("patching-structured", model)[0].glob("*_patching.csv"))
        acc = pd.read_csv(RESULTS / "accuracy" / model / "accuracy.csv")
        five = {r.task: r.accuracy for r in acc[acc["shots"] == 5].itertuples()}
        counted = [r for r in frame[frame["shots"] == 0].itertuples() if five[r.task] >= 0.3]
        goal = summarize.goal(model)
        assert goal["N"] == len(counted)
        assert goal["MET"] == sum(r.structured_iterative >= 0.9 * five[r.task] for r in counted)
        assert goal["MET_ONE"] == sum(r.iterative >= 0.9 * five[r.task] for r in counted)


def test_the_sparsity_verdict_is_the_share_of_pairs(summarize):
    frame = pd.read_csv(RESULTS / "sparsity" / "smollm2" / "sparsity.csv")
    hoyer = frame[frame["measure"] == "hoyer"]
    share = hoyer["ra_sparser_pairs"].sum() / hoyer["pairs"].sum()
    assert summarize.sparsity_verdict("smollm2").startswith(f"RA is the sparser map in {share:.0%} of (prompt, head) pairs")


# --------------------------------------------------------------------------- the scripts that made the tables


def recorded_commands(script: Path, tmp_path: Path) -> list[list[str]]:
    """Every command ``script`` runs, recorded instead of run: ``tl-reversed``, ``python`` and ``cp``
    are shell functions that write their arguments to a file (loops and helpers run as written)."""
    import subprocess

    log = tmp_path / f"{script.stem}.argv"
    fake = (f'record() {{ printf "%s\\037" "$@" >> "{log}"; printf "\\036" >> "{log}"; }}; '
            'tl-reversed() { record tl-reversed "$@"; }; python() { record python "$@"; }; cp() { :; }; ')  # fmt: skip
    subprocess.run(["bash", "-c", f"{fake} source {script}"], check=True, cwd=RESULTS.parents[1], env={"PATH": "/usr/bin:/bin"})
    return [entry.split("\x1f")[:-1] for entry in log.read_text().split("\x1e")[:-1]] if log.exists() else []


@pytest.mark.parametrize("script", sorted(RESULTS.glob("*.sh")), ids=lambda p: p.name)
def test_every_command_of_the_results_scripts_parses(script, tmp_path):
    """The commands the README points to still parse with today's CLI, with task names that exist."""
    from tl_reversed.commands.cli import build_parser
    from tl_reversed.experiments.tasks import load_task

    commands = recorded_commands(script, tmp_path)
    assert commands, f"{script.name} runs no command"
    parsed = 0
    for argv in commands:
        if argv[:3] == ["python", "-m", "tl_reversed.commands.cli"]:
            argv = ["tl-reversed", *argv[3:]]
        if argv[0] != "tl-reversed":
            assert argv[0] == "python" and (script.parents[2] / argv[1]).exists(), argv
            continue
        try:
            args = build_parser().parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{script.name}: {' '.join(argv)} does not parse")
        for task in [args.task] if isinstance(getattr(args, "task", None), str) else getattr(args, "task", None) or []:
            load_task(task)
        parsed += 1
    assert parsed
