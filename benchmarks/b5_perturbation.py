"""B5 perturbation test: one task, 100 test prompts, 11 fractions x 2 orders.

Workload: the RA ranking of the embedded model's heads from 25 ``capitalize`` training
prompts, then ``perturbation_test`` on 100 test prompts at the paper's 11 fractions
(keep 0 %, 10 %, ..., 100 % of the heads), in the ranking's order and reversed, sharing
one forward cache (keep-none and keep-all are common to both orders, so 20 distinct
masks are run). Timed once, the ranking apart.

Run with one-shot prompts (about 17 tokens); ``--full`` also runs five-shot prompts
(about 57 tokens, as in B1), which take about three times as long. The cost is 20 forward passes over
the 100 prompts, so it grows with the prompt length.

Target: the two perturbation curves in under 90 s.
"""

from __future__ import annotations

import time

from benchmarks.common import Context, Row, row, timed_once


def _case(ctx: Context, model, shots: int) -> list[Row]:
    from tl_reversed.experiments.evaluation import prompt_batch
    from tl_reversed.perturbation import perturbation_test
    from tl_reversed.ranking import head_scores

    test = ctx.examples(8 if ctx.tiny else 100, shots=shots)
    train = ctx.examples(4 if ctx.tiny else 25, shots=shots, split="train")
    tokens = float(prompt_batch(model, test).lengths.float().mean())

    start = time.perf_counter()
    scores = head_scores(model, train, "ra", progress=False)
    ctx.sync()
    ranking_s = time.perf_counter() - start

    cache: dict = {}
    curves = {}

    def both_orders():
        curves["in order"] = perturbation_test(model, test, scores, progress=False, cache=cache)
        curves["reversed"] = perturbation_test(model, test, scores, reverse=True, progress=False, cache=cache)

    seconds, cpu = timed_once(ctx, both_orders)
    forward, backward = curves["in order"], curves["reversed"]
    return [
        row("B5", f"RA ranking, 25 {shots}-shot training prompts", ranking_s, "s"),
        row(
            "B5",
            f"perturbation test, {shots}-shot prompts",
            seconds,
            "s",
            "<= 90",
            note=(
                f"{len(test)} prompts of {tokens:.0f} tokens on average x 11 fractions x 2 orders, "
                f"{len(cache)} distinct masks; cpu {cpu:.0f} s; AUC {forward.auc:.3f} in order, "
                f"{backward.auc:.3f} reversed"
            ),
            cpu_s=cpu,
            mean_tokens=tokens,
            auc=forward.auc,
            auc_reversed=backward.auc,
            accuracy=forward.accuracy,
            accuracy_reversed=backward.accuracy,
        ),
    ]


def run(ctx: Context) -> list[Row]:
    model = ctx.model()
    rows: list[Row] = []
    for shots in (5, 1) if ctx.full or ctx.tiny else (1,):
        rows.extend(_case(ctx, model, shots))
    return rows
