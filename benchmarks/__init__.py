"""Benchmarks of tl_reversed: Reversed Attention at the cost of one forward and one backward pass.

``python -m benchmarks`` (``make bench``) runs them; ``docs/benchmarks.md`` has the figures.
Each module ``bN_*.py`` measures one thing and returns result rows; they run side by
side in one process (load times and peak memory in fresh subprocesses).
"""

BENCHMARKS = {
    "B1": ("b1_overhead", "RA overhead over a plain forward+backward"),
    "B2": ("b2_mediation", "head ranking: RA against causal mediation and attribution patching"),
    "B3": ("b3_batching", "RA throughput by batch size against a one-prompt loop"),
    "B4": ("b4_growth", "time and peak memory as prompts and models grow"),
    "B5": ("b5_perturbation", "perturbation test: 100 prompts, 11 fractions, 2 orders"),
    "B6": ("b6_load", "embedded model load: cold and warm"),
    "B8": ("b8_long", "long prompts: the memory-bounded RA pass against the standard one"),
    "B9": ("b9_flow_graph", "flow graph of one prompt (forward+backward) beside one RA call"),
}
"""Benchmark id -> (module in this package, what it measures). B7 (devices) is ``--device``."""
