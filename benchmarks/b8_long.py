"""B8 long prompts: peak memory and time of the memory-bounded RA pass against the standard one.

On the embedded model, one prompt of 512, 1k, 2k and 4k tokens (8k with ``--full``;
``--quick``: 512 to 2k) read with the target :data:`TARGET` at its end (random prompt
tokens, then the target: the default target loss unembeds the target positions alone,
as for any user's prompt and answer), and per length:

* ``bounded norms``: ``reversed_attention(keep="norms", path="bounded")``;
* ``bounded last``: ``query_positions="last"`` (maps of the last row), ``path="bounded"``;
* ``standard norms``: ``keep="norms", path="standard"``, only where its estimated peak
  (four copies of every layer's ``[head, T, T]`` float32 attention, what the eager
  backward keeps, :data:`STANDARD_COPIES`) stays under :data:`MEMORY_GUARD_BYTES`; the
  skipped lengths are said in the note;
* ``plain fwdbwd``: the same forward and backward to the embeddings without RA's hooks
  and without checkpointing (the model's own cost, as in B4); it keeps every layer's
  attention like the standard pass, so it runs only where that fits the same guard.

Each length runs in a fresh subprocess, the modes one after the other, memory handed
back to the OS before each (as in B4), after a warm-up of every mode at 256 tokens; each
mode's first call gives its peak memory and a time. Up to :data:`TIMED_UP_TO` tokens,
:data:`TIME_ROUNDS` more rounds time every mode again, interleaved (a, b, c, a, b, c), so
a machine busy with other jobs slows them alike; the time is the median. The memory
exponent is the least-squares slope of log(peak) against log(tokens) from 1k tokens up
(1k-4k by default, 1k-8k with ``--full``).
"""

from __future__ import annotations

import sys

from benchmarks.b4_growth import _release_memory
from benchmarks.common import Context, Row, child_main, fit_exponent, row, run_child

LENGTHS = (512, 1024, 2048, 4096)
FULL_LENGTHS = (*LENGTHS, 8192)
MEMORY_GUARD_BYTES = 16 * 2**30
STANDARD_COPIES = 4
MODES = ("bounded norms", "bounded last", "standard norms", "plain fwdbwd")
TIMED_UP_TO = 2048
TIME_ROUNDS = 2
TARGET = " Paris"
"""The answer the loss reads (what a user asks RA about): only its positions are unembedded."""


def standard_fits(model, length: int) -> bool:
    """Whether the standard pass's estimated peak at ``length`` tokens stays under the guard."""
    from tl_reversed.core.architecture import describe
    from tl_reversed.core.bounded import standard_pattern_bytes

    spec = describe(model)
    dtype = next(model.parameters()).dtype
    return STANDARD_COPIES * standard_pattern_bytes(spec, spec.n_layers, 1, length, dtype) <= MEMORY_GUARD_BYTES


def point(args: dict) -> dict:
    """Child process: every mode's peak memory and time at one length."""
    import statistics
    import time

    import torch

    from benchmarks.common import Context, peak_memory
    from tl_reversed import reversed_attention
    from tl_reversed.core.architecture import describe
    from tl_reversed.core.engine import forward_backward
    from tl_reversed.core.inputs import tokenize
    from tl_reversed.core.state import untouched

    ctx = Context(device=args["device"], tiny=args["tiny"])
    model = ctx.tiny_model(n_layers=4, d_model=64, n_heads=4, n_ctx=512) if args["tiny"] else ctx.model()
    length = args["length"]
    tokens = torch.randint(3, model.cfg.d_vocab, (1, length), generator=torch.Generator().manual_seed(0))
    spec = describe(model)
    n_target = len(tokenize(model, tokens[:, :1], [TARGET], spec, need_targets=True).targets[0])

    def caller(mode: str, n: int = length):
        path, what = mode.split()
        kwargs = {"keep": "norms"} if what == "norms" else {"keep": "maps", "query_positions": "last"}
        prompt = tokens[:, : n - n_target + 1]  # prompt + target = n tokens read

        def call():
            if path == "plain":
                with untouched(model):
                    forward_backward(model, tokenize(model, prompt, [TARGET], spec, need_targets=True), None)
            else:
                # memory_check off: the standard mode runs only where standard_fits says it fits this
                # machine, and other jobs' memory must not refuse a measurement
                reversed_attention(model, prompt, [TARGET], progress=False, path=path, memory_check=False, **kwargs)
            ctx.sync()

        return call

    # a warm-up of every mode first, so one-time allocations (thread pools, allocator arenas)
    # count against none of them: the first mode measured at 512 tokens without it gained ~700 MiB
    for mode in args["modes"]:
        caller(mode, min(length, 256))()
    out = {}
    for mode in args["modes"]:
        _release_memory()
        start = time.perf_counter()
        peak, how = peak_memory(ctx.device, caller(mode))
        out[mode] = {"times": [time.perf_counter() - start], "peak_mib": peak, "memory": how}
    for _ in range(args.get("rounds", 0)):  # interleaved: a busy machine slows every mode alike
        for mode in args["modes"]:
            start = time.perf_counter()
            caller(mode)()
            out[mode]["times"].append(time.perf_counter() - start)
    for got in out.values():
        got["seconds"] = statistics.median(got["times"])
    return out


def run(ctx: Context) -> list[Row]:
    if ctx.tiny:
        lengths = (64, 128, 256)
    elif ctx.full:
        lengths = FULL_LENGTHS
    elif ctx.quick:
        lengths = LENGTHS[:3]
    else:
        lengths = LENGTHS
    model = ctx.tiny_model(n_layers=4, d_model=64, n_heads=4, n_ctx=512) if ctx.tiny else ctx.model()
    points, skipped = {}, []
    for length in lengths:
        # the standard pass and the plain forward+backward both keep every layer's eager attention
        modes = [m for m in MODES if m.startswith("bounded") or standard_fits(model, length)]
        if len(modes) < len(MODES):
            skipped.append(length)
        rounds = TIME_ROUNDS if length <= TIMED_UP_TO else 0
        args = {"length": length, "modes": modes, "device": ctx.device, "tiny": ctx.tiny, "rounds": rounds}
        points[length] = run_child("b8_long", args, timeout=3600)
        for mode, got in points[length].items():
            ctx.log(f"   B8 {length:>5} tokens {mode:<15} {got['seconds']:8.1f} s   peak +{got['peak_mib']:8.0f} MiB")
    where = "smoke test, tiny model" if ctx.tiny else "embedded model, 1 prompt, CPU" if ctx.device == "cpu" else "embedded model"
    fit = [n for n in lengths if n >= (lengths[1] if len(lengths) > 2 else lengths[0])]
    rows: list[Row] = []
    for mode in ("bounded norms", "bounded last"):
        peaks = [points[n][mode]["peak_mib"] for n in lengths]
        seconds = [points[n][mode]["seconds"] for n in lengths]
        label = "keep='norms'" if mode.endswith("norms") else "query_positions='last'"
        steps = " -> ".join(f"{p:.0f}" for p in peaks)
        detail = {"lengths": list(lengths), "peak_mib": peaks, "seconds": seconds}
        exponent = fit_exponent(fit, [max(points[n][mode]["peak_mib"], 1e-3) for n in fit])
        rows.append(row("B8", f"peak-memory exponent in tokens, bounded {label}", exponent, "", "<= 1.1",
                        note=f"{where}; fitted over {', '.join(map(str, fit))} tokens; +{steps} MiB", **detail))  # fmt: skip
        top = lengths[-1]
        target = "<= 6144" if top >= 8192 else ""
        rows.append(row("B8", f"peak memory at {top} tokens, bounded {label}", peaks[-1], "MiB", target,
                        note=f"{where}; target 6 GB at 8k tokens" + ("" if target else " (8k runs with --full)"),
                        **detail))  # fmt: skip
    both = [n for n in lengths if "standard norms" in points[n]]
    ran = [n for n in lengths if "plain fwdbwd" in points[n]]
    plain = ", ".join(f"{points[n]['plain fwdbwd']['seconds']:.3g} s / +{points[n]['plain fwdbwd']['peak_mib']:.0f} MiB"
                      for n in ran)  # fmt: skip
    rows.append(row("B8", f"plain forward+backward at {ran[-1]} tokens (no RA, no checkpointing)",
                    points[ran[-1]]["plain fwdbwd"]["peak_mib"], "MiB",
                    note=f"{where}; at {ran} tokens: {plain}" + (f"; skipped at {skipped} (estimated over 16 GB)" if skipped else "")))  # fmt: skip
    if both:
        note = f"{where}; standard path skipped at {skipped} tokens (estimated over 16 GB)" if skipped else where
        for n in both:
            ratio = points[n]["bounded norms"]["seconds"] / points[n]["standard norms"]["seconds"]
            timed = f"median of {1 + TIME_ROUNDS} interleaved" if n <= TIMED_UP_TO else "one call each"
            rows.append(row("B8", f"time bounded / standard, keep='norms', {n} tokens", ratio, "x", "<= 2",
                            note=f"{note}; {timed}"))  # fmt: skip
        n = both[-1]
        saved = points[n]["standard norms"]["peak_mib"] / max(points[n]["bounded norms"]["peak_mib"], 1e-3)
        standard = " -> ".join(f"{points[m]['standard norms']['peak_mib']:.0f}" for m in both)
        rows.append(row("B8", f"peak memory standard / bounded, keep='norms', {n} tokens", saved, "x",
                        note=f"{note}; standard +{standard} MiB at {both} tokens"))  # fmt: skip
    return rows


if __name__ == "__main__":
    sys.exit(child_main(point))
