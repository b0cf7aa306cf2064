"""B2 head ranking: Reversed Attention against causal mediation and attribution patching.

Workload: ``head_scores(model, examples, method)`` on the same 25 five-shot
``capitalize`` examples of the embedded model (30 layers x 9 heads = 270 heads).

* ``"ra"``: one forward and one backward pass per mini-batch (median of repeats).
* ``"atp"``: two forwards and one backward (median of repeats).
* ``"cm1"``: the stacked sweep (:func:`tl_reversed.experiments.mediation._stacked_sweep`):
  per layer, one forward of the 25 prompts repeated once per head (225 rows, one head
  zeroed in each copy, last-token logits only) that starts at that layer from the
  prompts' cached block inputs (:class:`tl_reversed.core.resume.Resume`), plus the
  unpatched forward, the capture forward and the replay check (two copies from layer 0).
* ``"cm2"``: one clean forward for the mean activations, then the same sweep.

The two causal-mediation rankings take minutes each on 2 CPU cores, more than the whole
benchmark budget, so by default they are estimated: a resumed stacked forward is timed
from the first and from the last layer, its cost is linear in the number of blocks it
runs, so the sweep over ``n`` layers costs ``n`` times their mean, plus the plain forwards
and the check. ``--full`` runs them for real, once each.

Targets: ``cm1 / ra >= 50``; the resumed sweep at least 2x faster than the same stacked
sweep run from the embeddings (``n`` stacked forwards through every block; skipping the
blocks before the layer bounds this at ``2n / (n + 1)``, 1.94 for 30 layers), and than the
sweep before both (one full forward of the prompts per head, estimated from the plain forward).
"""

from __future__ import annotations

import torch

from benchmarks.common import Context, Row, median_time, row, timed_once


def _forwards(ctx: Context, model, examples) -> dict[str, dict]:
    """Median times of one stacked CM forward (every head's copy of the examples), from the
    embeddings and resumed at the first and at the last layer, and of one plain forward."""
    from tl_reversed.core.architecture import describe
    from tl_reversed.core.resume import Resume
    from tl_reversed.core.state import untouched
    from tl_reversed.experiments.evaluation import last_logits, prompt_batch
    from tl_reversed.perturbation import mask_hooks

    spec = describe(model)
    batch = prompt_batch(model, examples)
    stacked = batch.rows([row for _ in range(spec.n_heads) for row in range(len(batch))])
    mask = torch.ones(spec.n_layers, spec.n_heads)
    mask[spec.n_layers // 2, 0] = 0.0
    mask[spec.n_layers - 1, 0] = 0.0
    with untouched(model):
        start = Resume.capture(model, spec, batch)
    if not start.ok:
        raise RuntimeError("B2: this model's blocks do not replay from a cached residual; the sweep runs every block")

    def stacked_forward():  # an engine pass: it keeps the model untouched itself
        last_logits(model, stacked, mask_hooks(mask), batch_size=None)  # rows <= mediation.STACKED_ROWS here

    def resumed(layer: int):
        def forward():
            with untouched(model):
                start.last_logits(layer, spec.n_heads, mask_hooks(mask))

        return forward

    def plain_forward():
        last_logits(model, batch, batch_size=32)  # head_scores' default mini-batch

    repeats = max(2, ctx.repeats // 2)
    fns = {"stacked": stacked_forward, "first": resumed(0), "last": resumed(spec.n_layers - 1), "plain": plain_forward}
    return {name: median_time(ctx, fn, repeats=repeats) for name, fn in fns.items()}


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
    t = _forwards(ctx, model, examples)
    layers = spec.n_layers
    mean_resumed = {k: (t["first"][k] + t["last"][k]) / 2 for k in ("median", "cpu")}
    check = 2 / spec.n_heads  # the replay check: two copies of the prompts from layer 0
    est = {k: layers * mean_resumed[k] + check * t["first"][k] + 2 * t["plain"][k] for k in ("median", "cpu")}
    from_embeddings = layers * t["stacked"]["median"] + t["plain"]["median"]
    if measured:
        cm1, cm1_cpu = timed_once(ctx, scores("cm1"))
        cm2, cm2_cpu = timed_once(ctx, scores("cm2"))
        how = {"cm1": f"one call, {layers} resumed stacked forwards", "cm2": f"one call, {layers} resumed stacked forwards"}
    else:
        cm1, cm1_cpu = est["median"], est["cpu"]
        cm2, cm2_cpu = cm1 + t["plain"]["median"], cm1_cpu + t["plain"]["cpu"]
        base = (
            f"{layers} x one resumed stacked forward of {n} x {spec.n_heads} rows (from layer 0: "
            f"{t['first']['median']:.2f} s, from layer {layers - 1}: {t['last']['median']:.2f} s) "
            f"+ {{}} x one plain forward ({t['plain']['median']:.2f} s) + the replay check"
        )
        how = {
            "cm1": f"estimated: {base.format(2)}; --full runs it",
            "cm2": f"estimated: {base.format(3)}; --full runs it",
        }
    shape = f"{n} examples, {n_heads} heads"
    per_head = (n_heads + 1) * t["plain"]["median"]  # the sweep before the stacked one: one full forward per head
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
            "cm1: resumed at the patched layer over every block run",
            from_embeddings / cm1,
            "x",
            ">= 2",
            note=f"every block: {layers} x {t['stacked']['median']:.2f} s + {t['plain']['median']:.2f} s = {from_embeddings:.0f} s "
            f"(estimated); bound 2n/(n+1) = {2 * layers / (layers + 1):.2f}",
        ),
        row(
            "B2",
            "cm1: over one forward per head",
            per_head / cm1,
            "x",
            ">= 2",
            note=f"one forward per head: {n_heads + 1} x {t['plain']['median']:.2f} s = {per_head:.0f} s"
            + ("" if measured else " (both estimated)"),
        ),
    ]
