"""``tl-reversed segments train|eval``: LoRA under segment masks (MAS) against the causal baseline.

``train`` fine-tunes, for each task, a causal-LoRA and a MAS-LoRA adapter on the same
prompts (``[instruction, query]`` segments, :data:`~tl_reversed.experiments.segment_lora.INSTRUCTIONS`),
the same steps, seed and batches, and saves them under ``--out``::

    adapters/{task}-causal/      peft adapter + run.safetensors (losses, settings, wall time)
    adapters/{task}-segments/
    train.csv                    one row per adapter: steps, final loss, minutes

An adapter already there with the same settings is kept (a killed run resumes).
``eval`` loads them and writes the held-out accuracy of the base model (causal and
segment mask), causal-LoRA (causal mask) and MAS-LoRA (segment mask)::

    segments.csv                 one row per (task, model, mask)
    segments.md                  the table, with the command that made it
    segments.png                 accuracy per task and condition
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tl_reversed.commands.common import (
    Checkpoint,
    CommandError,
    add_model_argument,
    command_line,
    load_cli_model,
    markdown_table,
    positive_int,
    writable_folder,
)

TASKS = ("choose_middle_of_3", "alphabetically_first_3", "animal_v_object_3", "adjective_v_verb_3", "present-past", "singular-plural")
"""The tasks of the experiment (those with an instruction in segment_lora.INSTRUCTIONS)."""

VARIANTS = {"causal-LoRA": "causal", "MAS-LoRA": "segments"}


def task_list(text: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``, each a task with an instruction (argparse type)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated task names")
    return names


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "segments",
        help="LoRA fine-tuning under segment masks (MAS) and its causal baseline: train, eval",
        description="Fine-tune LoRA adapters (attention projections) with the segment mask (MAS) and with the causal "
        "mask on [instruction, query] prompts, then compare their held-out accuracy with the base model's.",
    )
    actions = parser.add_subparsers(dest="action", required=True)
    train = actions.add_parser("train", help="train causal-LoRA and MAS-LoRA adapters per task (resumable)")
    evaluate = actions.add_parser("eval", help="held-out accuracy of base, causal-LoRA and MAS-LoRA per task")
    for sub in (train, evaluate):
        sub.add_argument("--tasks", type=task_list, default=list(TASKS), help=f"comma-separated tasks (default {','.join(TASKS)})")
        sub.add_argument("--seed", type=int, default=0, help="seed of the train/test split, LoRA init and batch order (default 0)")
        sub.add_argument("--out", default="out/segments", help="folder of the adapters and tables (default out/segments)")
        add_model_argument(sub)
    train.add_argument("--steps", type=positive_int, default=40, help="optimizer steps per adapter (default 40)")
    train.add_argument("--batch-size", type=positive_int, default=8, help="prompts per step (default 8)")
    train.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default 0.002)")
    train.add_argument("--rank", type=positive_int, default=8, help="LoRA rank (default 8)")
    train.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; the update is scaled by alpha/rank (default 16)")
    train.add_argument("--n-train", type=positive_int, default=None, help="training pairs per task, at most (default all)")
    train.add_argument("--no-resume", action="store_true", help="retrain adapters that are already saved")
    evaluate.add_argument("--n-test", type=positive_int, default=None, help="test pairs per task, at most (default all)")
    evaluate.add_argument("--cross", action="store_true", help="also run each adapter under the other mask")
    evaluate.add_argument("--batch-size", type=positive_int, default=16, help="prompts per forward pass (default 16)")
    return parser


def _check_tasks(tasks: list[str]) -> list[str]:
    from tl_reversed.experiments.segment_lora import INSTRUCTIONS
    from tl_reversed.experiments.task_data import load_task

    names = [load_task(t).name for t in tasks]
    unknown = [t for t in names if t not in INSTRUCTIONS]
    if unknown:
        raise CommandError(f"no instruction segment for {unknown}: choose among {', '.join(INSTRUCTIONS)}")
    return names


def adapter_folder(out: Path, task: str, mask: str) -> Path:
    return out / "adapters" / f"{task}-{mask}"


def run(args: argparse.Namespace) -> int:
    from tl_reversed.experiments.segment_lora import require_peft

    require_peft()  # before any work: a clear ImportError, one line on the command line
    tasks = _check_tasks(args.tasks)
    out = writable_folder(args.out)
    if args.action == "train":
        return _train(args, tasks, out)
    return _evaluate(args, tasks, out)


def _train(args: argparse.Namespace, tasks: list[str], out: Path) -> int:
    import pandas as pd

    from tl_reversed.experiments.segment_lora import LoRARun, segment_examples, train_segment_lora

    settings = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, rank=args.rank, alpha=args.alpha, seed=args.seed)
    model, rows = None, []
    for task in tasks:
        examples = segment_examples(task, "train", n=args.n_train, seed=args.seed)
        wanted = {**settings, "n_train": len(examples), "model": args.model}
        for name, mask in VARIANTS.items():
            folder = adapter_folder(out, task, mask)
            record = folder / "run.safetensors"
            run_ = LoRARun.load(record) if record.is_file() and not args.no_resume else None
            if run_ is None or {k: run_.settings.get(k) for k in wanted} != wanted:
                model = model or load_cli_model(args)
                adapter = train_segment_lora(model, examples, mask, task=task, **settings)
                adapter.run.settings["model"] = args.model
                adapter.save(folder)
                run_ = adapter.run
                del adapter
            else:
                print(f"kept {folder} (trained with the same settings)")
            rows.append(dict(task=task, model=name, mask=mask, steps=len(run_.losses), n_train=len(examples),
                             first_loss=float(run_.losses[:10].mean()), final_loss=float(run_.losses[-10:].mean()),
                             minutes=run_.seconds / 60))  # fmt: skip
    table = pd.DataFrame(rows)
    table.to_csv(out / "train.csv", index=False, float_format="%.4f")
    print(table.to_string(index=False))
    print(f"wrote {out}/adapters/ and {out}/train.csv")
    return 0


def _evaluate(args: argparse.Namespace, tasks: list[str], out: Path) -> int:
    import pandas as pd

    from tl_reversed.experiments.segment_lora import LoRARun, SegmentLoRA, evaluate_segment_lora, segment_examples

    missing = [str(adapter_folder(out, t, m)) for t in tasks for m in VARIANTS.values() if not (adapter_folder(out, t, m) / "adapter_config.json").is_file()]
    if missing:
        raise CommandError(f"no adapter in {missing[0]} ({len(missing)} missing): run `tl-reversed segments train` with the same --out and --tasks first")
    settings = {"model": args.model, "seed": args.seed, "n_test": args.n_test, "cross": args.cross}
    model, frames, start, checkpoints = None, [], time.perf_counter(), []
    for task in tasks:
        # a unit is redone when its adapters were retrained: their settings are part of its key
        trained = {mask: LoRARun.load(adapter_folder(out, task, mask) / "run.safetensors").settings for mask in VARIANTS.values()}
        checkpoint = Checkpoint(out, f"segments_eval_{task}", {**settings, "adapters": trained})
        checkpoints.append(checkpoint)
        saved = checkpoint.load(task)
        if saved is None:
            model = model or load_cli_model(args)
            adapters = {name: SegmentLoRA.load(model, adapter_folder(out, task, mask)) for name, mask in VARIANTS.items()}
            test = segment_examples(task, "test", n=args.n_test, seed=args.seed)
            result = evaluate_segment_lora(model, task, adapters, test, cross=args.cross, batch_size=args.batch_size)
            checkpoint.save(task, {"comparison": result})
            del adapters
        else:
            result = saved[0]["comparison"]
        mas_only, causal_only = result.paired()  # test examples only MAS-LoRA / only causal-LoRA gets right
        frames.append(result.to_dataframe().assign(mas_only=mas_only, causal_only=causal_only))
    table = pd.concat(frames, ignore_index=True)
    table.to_csv(out / "segments.csv", index=False, float_format="%.4f")
    markdown = segments_markdown(table)
    (out / "segments.md").write_text(
        "# LoRA under segment masks (MAS) against the causal baseline\n\n"
        "Held-out top-1 accuracy of the first answer token at the last prompt token. Prompts are "
        "[instruction, query] segments; each adapter runs under the mask it was trained with.\n\n"
        f"{markdown}\n\nModel: {args.model or 'SmolLM2-135M-Instruct (embedded)'}; seed {args.seed}; "
        f"evaluation {(time.perf_counter() - start) / 60:.1f} min.\n\n```bash\n{command_line()}\n```\n"
    )
    from tl_reversed.views.segment_lora import plot_accuracy

    plot_accuracy(table).savefig(out / "segments.png", dpi=110, bbox_inches="tight")
    for checkpoint in checkpoints:
        checkpoint.clear()
    print(markdown)
    print(f"wrote {out}/segments.csv, segments.md, segments.png")
    return 0


def segments_markdown(table) -> str:
    """Tasks as rows: sizes, base (causal, segments), causal-LoRA, MAS-LoRA, the paired counts, training minutes."""
    conditions = list(dict.fromkeys(table["model"] + " / " + table["mask"]))
    header = ["task", "train / test", *conditions, "only MAS / only causal right", "train min (causal / MAS)"]
    rows = []
    for task, part in table.groupby("task", sort=False):
        acc = dict(zip(part["model"] + " / " + part["mask"], part["accuracy"]))
        minutes = dict(zip(part["model"], part["train_seconds"] / 60))
        first = part.iloc[0]
        paired = f"{int(first['mas_only'])} / {int(first['causal_only'])}"
        rows.append([task, f"{int(first['n_train'])} / {int(first['n_test'])}", *(f"{acc[c]:.2f}" for c in conditions), paired,
                     f"{minutes.get('causal-LoRA', float('nan')):.1f} / {minutes.get('MAS-LoRA', float('nan')):.1f}"])  # fmt: skip
    return markdown_table(header, rows)
