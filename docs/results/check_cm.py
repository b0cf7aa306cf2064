"""The resumed causal-mediation sweep against TransformerLens' own sweep, on the committed tables' settings.

    python docs/results/check_cm.py [--max-minutes 60] [--folders perturbation-5shot] [--reverse]

For every CM1 ranking in the committed perturbation tables (``perturbation/``,
``perturbation-5shot/``, ``perturbation-5shot/gemma-3-270m/``), builds the scoring
prompts of the table's settings (task, shots, ``n_score``, seed 0, template 0) and scores
the heads twice: with the sweep ``head_scores`` runs (stacked copies, each forward started
at the ablated layer from cached block inputs) and with TransformerLens' sweep
(``generic_activation_patch``, one full forward per head: the code the one-shot tables
were made with). Writes, per ranking, Spearman's correlation and the largest absolute
difference between the two, both run times, and Spearman's correlation with the
committed scores, to ``cm-resume-check.csv``. Rows already there are kept (it resumes); a
second run with ``--reverse`` works from the other end (each ranking is claimed once).
CM2 runs the same sweep with another setter on other prompts; tests/test_evidence.py
checks it on tiny models.

The SmolLM2 tables were made by tl_reversed 0.1.0 (``draw="0.1.0"`` rebuilds their
prompts) with TransformerLens' sweep, Gemma's with the stacked sweep from the embeddings;
the committed scores are rounded to six significant digits.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

HERE = Path(__file__).parent
FOLDERS = {"perturbation": None, "perturbation-5shot": None, "perturbation-5shot/gemma-3-270m": "gemma-3-270m"}
DRAWS = {"perturbation": "0.1.0", "perturbation-5shot": "0.1.0", "perturbation-5shot/gemma-3-270m": "current"}
"""The demonstrations each folder's tables were made with (``make_examples(draw=...)``)."""
OUT = HERE / "cm-resume-check.csv"


def units(methods: tuple[str, ...], folders: list[str]) -> list[dict]:
    """One row per committed CM ranking: folder, model, task, shots, method, n_score."""
    rows = []
    for folder in folders:
        model = FOLDERS[folder]
        for auc in sorted((HERE / folder).glob("*_auc.csv")):
            table = pd.read_csv(auc)
            for _, r in table[table["method"].isin(methods)].iterrows():
                rows.append(dict(folder=folder, model=model, task=r["task"], shots=int(r["shots"]), method=r["method"],
                                 n_score=int(r["n_score"])))  # fmt: skip
    return rows


def transformer_lens_sweep(model, examples) -> torch.Tensor:
    """CM1 scores by TransformerLens' sweep (``generic_activation_patch``), one full forward per head."""
    from transformer_lens.patching import layer_head_vector_patch_setter

    from tl_reversed.core.architecture import attn_hook, describe
    from tl_reversed.core.engine import run
    from tl_reversed.experiments.evaluation import prompt_batch
    from tl_reversed.experiments.mediation import SweepHeads

    spec = describe(model)
    batch = prompt_batch(model, examples, spec)
    zeros = torch.zeros(1, 1, spec.n_heads, 1)
    cache = {attn_hook(layer, "z"): zeros for layer in range(spec.n_layers)}
    sink = SweepHeads(model, spec, cache, lambda sub: layer_head_vector_patch_setter, drop=True, stacked=False)
    run(model, batch, [sink], backward=False, batch_size=16, progress=False)
    return sink.finish()[0]


def claim(unit: dict) -> bool:
    """Whether this run may score ``unit``: no other live run of this script has claimed it.

    A claim is a file in the temp folder holding the claiming process's id; a claim whose
    process has exited (a killed run) is taken over.
    """
    folder = Path(tempfile.gettempdir()) / f"tl_reversed_check_cm_{os.getuid()}"
    folder.mkdir(exist_ok=True)
    path = folder / "_".join(str(unit[k]) for k in ("folder", "task", "shots", "method")).replace("/", "-")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = path.read_text().strip()
            if not pid:
                return False  # being written by the run that claimed it
            try:
                os.kill(int(pid), 0)
                return False  # its process is alive
            except (ProcessLookupError, ValueError):
                path.unlink(missing_ok=True)  # stale: take it over
                continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-minutes", type=float, default=None, help="stop starting new rankings after this long")
    parser.add_argument("--folders", default=",".join(FOLDERS), help="which result folders (default: all three)")
    parser.add_argument("--reverse", action="store_true", help="last ranking first (a second run beside the first)")
    args = parser.parse_args()

    from tl_reversed import load_model
    from tl_reversed.experiments.agreement import spearman
    from tl_reversed.experiments.ranking import head_scores
    from tl_reversed.experiments.tasks import make_examples

    key = ["folder", "task", "shots", "method"]
    started, models = time.perf_counter(), {}
    todo = units(("cm1",), args.folders.split(","))
    for unit in reversed(todo) if args.reverse else todo:
        done = pd.read_csv(OUT) if OUT.exists() else pd.DataFrame()
        if len(done) and ((done[key] == pd.Series({k: unit[k] for k in key})).all(axis=1)).any():
            continue
        if not claim(unit):  # another run of this script has it
            continue
        if args.max_minutes is not None and time.perf_counter() - started > 60 * args.max_minutes:
            print("time is up; run again to go on")
            break
        if unit["model"] not in models:
            models[unit["model"]] = load_model(unit["model"])
        model = models[unit["model"]]
        train = make_examples(unit["task"], n=unit["n_score"], split="train", shots=unit["shots"], seed=0, model=model,
                              template=0, draw=DRAWS[unit["folder"]])  # fmt: skip
        start = time.perf_counter()
        new = head_scores(model, train, unit["method"], seed=0, batch_size=16, progress=False).scores
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        reference = transformer_lens_sweep(model, train)
        reference_seconds = time.perf_counter() - start
        scores = pd.read_csv(HERE / unit["folder"] / f"{unit['task']}_scores.csv")
        old = scores[(scores["shots"] == unit["shots"]) & (scores["method"] == unit["method"])].sort_values(["layer", "head"])
        committed = torch.tensor(old["score"].to_numpy(), dtype=torch.float32).reshape(new.shape)
        row = {**{k: unit[k] for k in key}, "n_score": len(train),
               "spearman": float(spearman(new.flatten(), reference.flatten())),
               "max_abs_diff": float((new - reference).abs().max()), "max_abs_score": float(reference.abs().max()),
               "seconds": round(seconds, 1), "tl_sweep_seconds": round(reference_seconds, 1),
               "spearman_committed": float(spearman(new.flatten(), committed.flatten()))}  # fmt: skip
        print(row, flush=True)
        with open(OUT.with_suffix(".lock"), "w") as lock:  # two runs may append at once
            fcntl.flock(lock, fcntl.LOCK_EX)
            done = pd.read_csv(OUT) if OUT.exists() else pd.DataFrame()
            pd.concat([done, pd.DataFrame([row])], ignore_index=True).to_csv(OUT, index=False, float_format="%.6g")
        OUT.with_suffix(".lock").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
