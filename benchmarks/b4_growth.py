"""B4 growth: time and peak memory of ``keep="maps"`` and ``keep="norms"`` as inputs grow.

* Prompt length: one prompt of 32, 64, 128, 256 and 512 tokens on the embedded model;
  also a plain forward+backward to the embeddings without hooks (as in B1), so RA's
  own share of the time and memory can be told from the model's.
* Depth: tiny random Llama models (``d_model`` 256, 8 heads) of 2, 4, 8, 16 and 32
  layers, 4 prompts of 128 tokens.

Each point runs in a fresh subprocess: the first call gives the peak memory (see
:func:`benchmarks.common.peak_memory`), the median of the following calls the time.
The growth exponent is the least-squares slope of log(figure) against log(size):
time and norms memory should grow about linearly in depth; in length the maps
(``[layer, head, pos, pos]``) grow quadratically, and so does the attention inside
the forward pass of either mode.
"""

from __future__ import annotations

import sys

from benchmarks.common import Context, Row, child_main, fit_exponent, row, run_child

LENGTHS = (32, 64, 128, 256, 512)
LAYERS = (2, 4, 8, 16, 32)


def _loss(logits, tokens):
    """Any per-example scalar will do for timing: the last position's log-probability of token 0."""
    return -logits[:, -1].float().log_softmax(-1)[:, 0]


def point(args: dict) -> dict:
    """Child process: build the model and input of one point, measure peak memory and time."""
    import statistics
    import time

    import torch

    from benchmarks.b1_overhead import _embedding_weight, plain_pass
    from benchmarks.common import Context, peak_memory
    from tl_reversed import reversed_attention

    ctx = Context(device=args["device"], tiny=args["tiny"])
    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    if args["sweep"] == "length":
        model = ctx.model()
        length, batch = args["size"], 1
    else:
        d_model = 32 if args["tiny"] else 256
        model = ctx.tiny_model(n_layers=args["size"], d_model=d_model, n_heads=8 if not args["tiny"] else 4)
        length, batch = (16, 2) if args["tiny"] else (128, 4)
    vocab = model.cfg.d_vocab
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, vocab, (batch, length), generator=generator)

    def call():
        if args["keep"] == "plain":
            plain_pass(model, tokens.to(_embedding_weight(model).device), _loss)
        else:
            reversed_attention(model, tokens, metric=_loss, keep=args["keep"], progress=False)
        ctx.sync()

    peak, how = peak_memory(ctx.device, call)
    times = []
    for _ in range(args["repeats"]):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "times": times, "peak_mib": peak, "memory": how}


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
        # a plain forward+backward (no hooks) along the length sweep, to tell RA's own cost from the model's
        for keep in ("plain", "norms", "maps") if sweep == "length" else ("norms", "maps"):
            points = []
            for size in sizes:
                args = {"sweep": sweep, "size": size, "keep": keep, "device": ctx.device, "tiny": ctx.tiny, "repeats": repeats}
                # the smoke test runs one point in a child (to check the plumbing), the rest in-process
                result = point(args) if ctx.tiny and rows + points else run_child("b4_growth", args)
                points.append(result)
                ctx.log(
                    f"   B4 {sweep}={size:<4} keep={keep:<5} {result['seconds']:8.3f} s   "
                    f"peak +{result['peak_mib']:8.1f} MiB"
                )
            seconds = [p["seconds"] for p in points]
            peaks = [max(p["peak_mib"], 1e-3) for p in points]
            where = "embedded model, 1 prompt" if sweep == "length" else "tiny Llama d_model 256, 4 x 128 tokens"
            where = "smoke test, tiny model" if ctx.tiny else where
            detail = {"sizes": list(sizes), "seconds": seconds, "peak_mib": peaks, "memory": points[0]["memory"]}
            label = "plain forward+backward" if keep == "plain" else f"keep={keep}"
            rows.append(
                row(
                    "B4",
                    f"time exponent in {unit_name}, {label}",
                    fit_exponent(sizes, seconds),
                    "",
                    note=f"{where}; {sizes[0]}->{sizes[-1]} {unit_name}: {seconds[0]:.3g}->{seconds[-1]:.3g} s",
                    **detail,
                )
            )
            rows.append(
                row(
                    "B4",
                    f"peak-memory exponent in {unit_name}, {label}",
                    fit_exponent(sizes, peaks),
                    "",
                    note=f"{where}; {sizes[0]}->{sizes[-1]} {unit_name}: +{peaks[0]:.0f}->+{peaks[-1]:.0f} MiB",
                    **detail,
                )
            )
    return rows


if __name__ == "__main__":
    sys.exit(child_main(point))
