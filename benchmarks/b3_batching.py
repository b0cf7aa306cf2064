"""B3 batching: Reversed Attention throughput by batch size, against a one-prompt loop.

Workload: 64 one-shot ``capitalize`` prompts (about 17 tokens) with their targets (16 with
``--quick``; five-shot prompts of about 57 tokens with ``--full``, which takes about four
times as long: the default keeps ``make bench`` within its 15-minute budget).

* ``batch_size=b`` for b in 1, 4, 16, 64: one ``reversed_attention(..., keep="norms",
  batch_size=b)`` call over all prompts (right padding inside each mini-batch).
* loop: one ``reversed_attention(prompt, target)`` call per prompt keeping the maps,
  then their norms, as the paper's code does (a prompt at a time).

Figures are prompts per second over the whole set: one timed pass per setting after a
warm-up call (a pass is itself 64 forward and backward passes' worth of work, and
B3 alone would otherwise take a third of the benchmark budget).
"""

from __future__ import annotations

from benchmarks.common import Context, Row, median_time, row


def run(ctx: Context) -> list[Row]:
    from tl_reversed import reversed_attention

    model = ctx.model()
    n = 8 if ctx.tiny else (16 if ctx.quick else 64)
    shots = 5 if ctx.full else 1
    examples = ctx.examples(n, shots=shots)
    prompts, targets = list(examples.prompts), list(examples.targets)
    what = f"{n} {shots}-shot prompts"
    sizes = [b for b in (1, 4, 16, 64) if b <= n] if not ctx.tiny else [1, 4, 8]
    repeats = 1

    def batched(size: int):
        return lambda: reversed_attention(model, prompts, targets, keep="norms", batch_size=size, progress=False)

    def loop():
        for prompt, target in zip(prompts, targets):
            result = reversed_attention(model, prompt, target, keep="maps", progress=False)
            result.maps.flatten(-2).norm(dim=-1)

    reversed_attention(model, prompts[:2], targets[:2], keep="norms", progress=False)  # warm-up
    rows = []
    loop_s = median_time(ctx, loop, repeats=repeats, warmup=0)["median"]
    rows.append(row("B3", "loop, one prompt per call (maps)", n / loop_s, "prompts/s", note=what))
    best = 0.0
    for size in sizes:
        seconds = median_time(ctx, batched(size), repeats=repeats, warmup=0)["median"]
        best = max(best, n / seconds)
        rows.append(row("B3", f"batch_size={size} (norms)", n / seconds, "prompts/s", note=what))
    rows.append(row("B3", "best batched throughput / loop", best * loop_s / n, "x"))
    return rows
