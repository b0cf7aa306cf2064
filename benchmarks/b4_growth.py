"""B4 growth: time and peak memory of ``keep="maps"`` and ``keep="norms"`` as inputs grow.

* Prompt length: one prompt of 32, 64, 128, 256 and 512 tokens on the embedded model;
  also the same forward+backward to the embeddings without RA's hooks (only the
  embedding hook that makes the embeddings the leaf, so no weight gradient is
  allocated), to tell RA's own share of the time and memory from the model's.
  Beside them ``bounded``: ``keep="norms"`` on the memory-bounded path
  (``path="bounded"``: blocks checkpointed, attention in query tiles).
* Depth: tiny random Llama models (``d_model`` 256, 8 heads) of 2, 4, 8, 16 and 32
  layers, 4 prompts of 128 tokens.

Each point runs in a fresh subprocess, which runs the modes one after the other: after
a short warm-up call, and with freed memory handed back to the OS (``malloc_trim``)
before each mode, the mode's first call gives its peak memory (see
:func:`benchmarks.common.peak_memory`), the median of the following calls its time.
The growth exponent is the least-squares slope of log(figure) against log(size) over
the three largest sizes (fixed costs dominate the smallest ones):
time and norms memory should grow about linearly in depth; in length the maps
(``[layer, head, pos, pos]``) grow quadratically, and so does the attention inside
the forward pass of either mode.
"""

from __future__ import annotations

import ctypes
import gc
import sys

from benchmarks.common import Context, Row, child_main, fit_exponent, row, run_child

LENGTHS = (32, 64, 128, 256, 512)
LAYERS = (2, 4, 8, 16, 32)


def _loss(logits, tokens):
    """Any per-example scalar will do for timing: the last position's log-probability of token 0."""
    return -logits[:, -1].float().log_softmax(-1)[:, 0]


def _release_memory() -> None:
    """Hand freed memory back to the OS, so the next peak is measured from a clean floor."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def point(args: dict) -> dict:
    """Child process: build the model and input of one point; per mode, its peak memory and time."""
    import statistics
    import time

    import torch

    from benchmarks.common import Context, peak_memory
    from tl_reversed import reversed_attention
    from tl_reversed.core.engine import forward_backward
    from tl_reversed.core.inputs import Batch
    from tl_reversed.core.state import untouched

    ctx = Context(device=args["device"], tiny=args["tiny"])
    if args["sweep"] == "length":
        model = ctx.model()
        length, batch = args["size"], 1
    else:
        d_model = 32 if args["tiny"] else 256
        model = ctx.tiny_model(n_layers=args["size"], d_model=d_model, n_heads=8 if not args["tiny"] else 4)
        length, batch = (16, 2) if args["tiny"] else (128, 4)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, model.cfg.d_vocab, (batch, length), generator=generator)
    lengths = torch.full((batch,), length)
    plain_batch = Batch(tokens, lengths, lengths, [torch.empty(0, dtype=torch.long)] * batch, None, None)

    def call(keep: str):
        def run():
            if keep == "plain":
                with untouched(model):
                    forward_backward(model, plain_batch, _loss)
            elif keep == "bounded":
                reversed_attention(model, tokens, metric=_loss, keep="norms", path="bounded", progress=False)
            else:
                reversed_attention(model, tokens, metric=_loss, keep=keep, progress=False, path="standard")
            ctx.sync()

        return run

    # one short call first, so one-time allocations (thread pools, kernels) count for no mode
    reversed_attention(model, tokens[:, :8], metric=_loss, keep="norms", progress=False)
    out = {}
    for keep in args["keeps"]:
        _release_memory()
        peak, how = peak_memory(ctx.device, call(keep))
        times = []
        for _ in range(args["repeats"]):
            start = time.perf_counter()
            call(keep)()
            times.append(time.perf_counter() - start)
        out[keep] = {"seconds": statistics.median(times), "times": times, "peak_mib": peak, "memory": how}
    return out


def run(ctx: Context) -> list[Row]:
    if ctx.tiny:
        lengths, layers = (16, 32), (1, 2)
    elif ctx.quick:
        lengths, layers = (32, 128, 512), (2, 8, 32)
    else:
        lengths, layers = LENGTHS, LAYERS
    repeats = 1 if ctx.tiny else (2 if ctx.quick else 3)
    rows: list[Row] = []
    for sweep, sizes, unit_name in (("length", lengths, "tokens"), ("layers", layers, "layers")):
        # forward+backward without RA's hooks along the length sweep, to tell RA's own cost from the model's
        keeps = ("plain", "norms", "maps", "bounded") if sweep == "length" else ("norms", "maps")
        points = []
        for size in sizes:
            args = {"sweep": sweep, "size": size, "keeps": keeps, "device": ctx.device, "tiny": ctx.tiny, "repeats": repeats}
            # the smoke test runs one point in a child (to check the plumbing), the rest in-process
            result = point(args) if ctx.tiny and (rows or points) else run_child("b4_growth", args)
            points.append(result)
            for keep in keeps:
                ctx.log(
                    f"   B4 {sweep}={size:<4} {keep:<5} {result[keep]['seconds']:8.3f} s   "
                    f"peak +{result[keep]['peak_mib']:8.1f} MiB"
                )
        where = "embedded model, 1 prompt" if sweep == "length" else "tiny Llama d_model 256, 4 x 128 tokens"
        where = "smoke test, tiny model" if ctx.tiny else where
        top = slice(-3, None)  # fit where growth, not fixed cost, dominates
        fitted = f"fitted over {', '.join(map(str, sizes[top]))} {unit_name}"
        for keep in keeps:
            seconds = [p[keep]["seconds"] for p in points]
            peaks = [max(p[keep]["peak_mib"], 1e-3) for p in points]
            labels = {"plain": "forward+backward without RA hooks", "bounded": "keep=norms, path=bounded"}
            label = labels.get(keep, f"keep={keep}")
            detail = {"sizes": list(sizes), "seconds": seconds, "peak_mib": peaks, "memory": points[0][keep]["memory"]}
            steps = " -> ".join(f"{t:.3g}" for t in seconds)
            rows.append(
                row(
                    "B4",
                    f"time exponent in {unit_name}, {label}",
                    fit_exponent(sizes[top], seconds[top]),
                    "",
                    note=f"{where}; {fitted}; {steps} s",
                    **detail,
                )
            )
            steps = " -> ".join(f"{m:.0f}" for m in peaks)
            rows.append(
                row(
                    "B4",
                    f"peak-memory exponent in {unit_name}, {label}",
                    fit_exponent(sizes[top], peaks[top]),
                    "",
                    note=f"{where}; {fitted}; +{steps} MiB",
                    **detail,
                )
            )
    return rows


if __name__ == "__main__":
    sys.exit(child_main(point))
