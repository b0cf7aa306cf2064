"""B9 flow graph: the default graph of one prompt, forward and backward, beside one RA call.

Workload: ``flow_graph(model, "The capital city of France is", " Paris")`` with its
defaults (all layers: 30 on the embedded model; 2 heads, 2 memories per head and 2
neurons per layer), which is one forward and one backward pass plus the vocabulary
readings of every node, timed against ``reversed_attention`` on the same prompt and
target (one forward and one backward pass), interleaved. Also the time to write the
offline page and its size.

Target: the graph in under 10 s on the CPU machine; the page under 8 MB.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.common import Context, Row, interleaved, row

PROMPT, TARGET = "The capital city of France is", " Paris"


def run(ctx: Context) -> list[Row]:
    import tl_reversed

    model = ctx.model()
    prompt, target = ("The cat sat", " on") if ctx.tiny else (PROMPT, TARGET)
    kept: dict = {}

    def graph():
        kept["graph"] = tl_reversed.flow_graph(model, prompt, target)

    def ra():
        tl_reversed.reversed_attention(model, prompt, target)

    repeats = 1 if ctx.tiny or ctx.quick else min(ctx.repeats, 3)
    times = interleaved(ctx, {"graph": graph, "ra": ra}, repeats=repeats, warmup=0 if ctx.tiny else 1)
    g = kept["graph"]
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        path = Path(folder) / "graph.html"
        g.to_html(path)
        page_s = time.perf_counter() - start
        size_mb = path.stat().st_size / 1e6
    n_layers = len(g.layers)
    return [
        row("B9", f"flow graph, {n_layers} layers, forward+backward", times["graph"]["median"], "s", "<= 10",
            note=f"{len(g)} nodes, {len(g.edges['source'])} edges; cpu {times['graph']['cpu']:.1f} s",
            cpu_s=times["graph"]["cpu"], nodes=len(g)),  # fmt: skip
        row("B9", "reversed_attention, same prompt", times["ra"]["median"], "s",
            note=f"cpu {times['ra']['cpu']:.1f} s", cpu_s=times["ra"]["cpu"]),  # fmt: skip
        row("B9", "flow graph page written", page_s, "s"),
        row("B9", "flow graph page size", size_mb, "MB", "<= 8"),
    ]
