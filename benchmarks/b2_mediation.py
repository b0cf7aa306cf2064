"""B2 head ranking: Reversed Attention against causal mediation and attribution patching.

Workload: ``head_scores(model, examples, method)`` on the same 25 five-shot
``capitalize`` examples of the embedded model (30 layers x 9 heads = 270 heads).

* ``"ra"``: one forward and one backward pass per mini-batch (median of repeats).
* ``"atp"``: two forwards and one backward (median of repeats).
* ``"cm1"``: the stacked sweep (:func:`tl_reversed.experiments.mediation._stacked_sweep`):
  per layer, one forward of the 25 prompts repeated once per head (225 rows, one head
  zeroed in each copy, last-token logits only), plus the unpatched forward: 31 forwards.
* ``"cm2"``: one clean forward for the mean activations, then the same 31 forwards.

The two causal-mediation rankings take 10-25 minutes each on 2 CPU cores, more than the
whole benchmark budget, so by default they are estimated: the median time of one
stacked forward (the 25 prompts once per head, one head zeroed per copy) times the
number of layers, plus one plain forward of the 25 prompts per unpatched pass.
``--full`` runs them for real, once each.

Targets: ``cm1 / ra >= 50``; the stacked sweep at least 2x faster than the sweep it
replaced (one full forward of the prompts per head, estimated from the plain forward).
"""

from __future__ import annotations

import torch

from benchmarks.common import Context, Row, median_time, row, timed_once


def _forwards(ctx: Context, model, examples) -> tuple[dict, dict]:
    """Median times of one stacked CM forward (every head's copy of the examples) and of one plain forward."""
    from tl_reversed.core.architecture import describe
    from tl_reversed.experiments.evaluation import last_logits, prompt_batch
    from tl_reversed.perturbation import mask_hooks

    spec = describe(model)
    batch = prompt_batch(model, examples)
    stacked = batch.rows([row for _ in range(spec.n_heads) for row in range(len(batch))])
    mask = torch.ones(spec.n_layers, spec.n_heads)
    mask[spec.n_layers // 2, 0] = 0.0

    def stacked_forward():  # an engine pass: it keeps the model untouched itself
        last_logits(model, stacked, mask_hooks(mask), batch_size=None)  # rows <= mediation.STACKED_ROWS here

    def plain_forward():
        last_logits(model, batch, batch_size=32)  # head_scores' default mini-batch

    repeats = max(2, ctx.repeats // 2)
    return median_time(ctx, stacked_forward, repeats=repeats), median_time(ctx, plain_forward, repeats=repeats)


def run(ctx: Context) -> list[Row]:
    from tl_reversed.core.architecture import describe
    from tl_reversed.ranking import head_scores

    model = ctx.model()
    spec = describe(model)
    n_heads = spec.n_layers * spec.n_heads
    examples = ctx.examples(4 if ctx.tiny else 25, shots=5)
    n = len(examples)

    def scores(method: str):
        return lambda: head_scores(model, examples, method, progress=False)

    ra = median_time(ctx, scores("ra"))
    atp = median_time(ctx, scores("atp"), repeats=max(1, ctx.repeats // 2))
    measured = ctx.full or ctx.tiny
    stacked, plain = _forwards(ctx, model, examples)
    if measured:
        cm1, cm1_cpu = timed_once(ctx, scores("cm1"))
        cm2, cm2_cpu = timed_once(ctx, scores("cm2"))
        how = {"cm1": f"one call, {spec.n_layers + 1} stacked forwards", "cm2": f"one call, {spec.n_layers + 2} forwards"}
    else:
        layers = spec.n_layers
        cm1, cm1_cpu = stacked["median"] * layers + plain["median"], stacked["cpu"] * layers + plain["cpu"]
        cm2, cm2_cpu = cm1 + plain["median"], cm1_cpu + plain["cpu"]
        base = (
            f"{layers} x one stacked forward of {n} x {spec.n_heads} rows ({stacked['median']:.2f} s) "
            f"+ {{}} x one plain forward ({plain['median']:.2f} s)"
        )
        how = {
            "cm1": f"estimated: {base.format(1)}; --full runs it",
            "cm2": f"estimated: {base.format(2)}; --full runs it",
        }
    shape = f"{n} examples, {n_heads} heads"
    per_head = (n_heads + 1) * plain["median"]  # the sweep before the stacked one: one full forward per head
    return [
        row("B2", "head_scores 'ra'", ra["median"], "s", note=f"{shape}; cpu {ra['cpu']:.1f} s", cpu_s=ra["cpu"]),
        row("B2", "head_scores 'atp'", atp["median"], "s", note=f"{shape}; cpu {atp['cpu']:.1f} s", cpu_s=atp["cpu"]),
        row("B2", "head_scores 'cm1'", cm1, "s", note=how["cm1"], estimated=not measured, cpu_s=cm1_cpu),
        row("B2", "head_scores 'cm2'", cm2, "s", note=how["cm2"], estimated=not measured, cpu_s=cm2_cpu),
        row(
            "B2",
            "speed-up of RA over cm1",
            cm1 / ra["median"],
            "x",
            ">= 50",
            note=f"in CPU time {cm1_cpu / ra['cpu']:.0f}x" + ("" if measured else " (estimated cm1)"),
        ),
        row("B2", "speed-up of RA over cm2", cm2 / ra["median"], "x"),
        row("B2", "speed-up of RA over atp", atp["median"] / ra["median"], "x"),
        row(
            "B2",
            "cm1: stacked sweep over one forward per head",
            per_head / cm1,
            "x",
            ">= 2",
            note=f"one forward per head: {n_heads + 1} x {plain['median']:.2f} s = {per_head:.0f} s"
            + ("" if measured else " (both estimated)"),
        ),
    ]
