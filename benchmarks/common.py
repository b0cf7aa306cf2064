"""What every benchmark shares: the run context, timing, peak memory, result rows.

Timing is wall-clock (``time.perf_counter``, after ``torch.cuda.synchronize`` on a GPU):
one warm-up call, then the median of ``repeats`` calls. Where two things are compared
they are measured in the same process and interleaved (a, b, a, b, ...), so a busy
machine slows both alike.

Peak memory is measured in a fresh subprocess per point (see :func:`run_child`): on the
CPU as the rise of the resident-set high-water mark (``VmHWM`` in ``/proc/self/status``,
reset through ``/proc/self/clear_refs`` just before the call) over the resident set
just before it; on a GPU as ``torch.cuda.max_memory_allocated`` over the memory
allocated before the call. Python's ``tracemalloc`` does not see torch's CPU
allocations, so it is not used.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    """One measured figure, printed beside its target.

    Attributes:
        bench: benchmark id (``"B1"`` ...).
        name: what was measured.
        value: the figure.
        unit: its unit (``"s"``, ``"x"``, ``"prompts/s"``, ``"MiB"``, ...).
        target: the target as text (``"<= 1.3"``), or ``""`` where the figure is context.
        met: whether the target is met (None where there is no target).
        note: how it was measured, or what stops the target.
    """

    bench: str
    name: str
    value: float
    unit: str
    target: str = ""
    met: bool | None = None
    note: str = ""
    detail: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def check(value: float, target: str) -> bool | None:
    """Whether ``value`` meets a target written as ``"<= 1.3"`` or ``">= 50"``."""
    if not target:
        return None
    op, bound = target.split()
    bound_value = float(bound)
    return value <= bound_value if op == "<=" else value >= bound_value


def row(bench: str, name: str, value: float, unit: str, target: str = "", note: str = "", **detail) -> Row:
    """A :class:`Row` with ``met`` filled in from the target."""
    return Row(bench, name, float(value), unit, target, check(float(value), target), note, detail)


@dataclass
class Context:
    """How to run: device, size, repeats; caches the embedded model across benchmarks.

    ``full=True`` runs the hour-long causal-mediation rankings of B2 for real instead of
    estimating them. ``tiny=True`` (the smoke test) swaps the embedded model for a tiny random one and
    every workload for a small one, so each benchmark runs in seconds.
    """

    device: str = "cpu"
    quick: bool = False
    full: bool = False
    tiny: bool = False
    repeats: int = 5
    warmup: int = 1
    log: Callable[[str], None] = print
    _model: object = field(default=None, repr=False)

    def model(self):
        """The model the benchmarks share: the embedded SmolLM2 (tiny: a random Llama)."""
        if self._model is None:
            self._model = self.tiny_model(n_layers=2, d_model=64, n_heads=4) if self.tiny else self.load_embedded()
        return self._model

    def load_embedded(self):
        import tl_reversed

        return tl_reversed.load_model(device=self.device if self.device != "cpu" else None)

    def tiny_model(self, n_layers: int = 2, d_model: int = 64, n_heads: int = 4, n_ctx: int = 256):
        from tl_reversed.testing import tiny_model

        model = tiny_model("llama", n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_ctx=n_ctx)
        return model.to(self.device) if self.device != "cpu" else model

    def examples(self, n: int, shots: int = 5, task: str = "capitalize", **kwargs):
        """``n`` ICL examples of a task; single-token targets on the embedded model.

        The tiny model's character tokenizer makes every target several tokens long, so
        there the single-token filter is off (the workload shape is what matters).
        """
        from tl_reversed.tasks import make_examples

        model = None if self.tiny else self.model()
        examples = make_examples(task, shots=shots, n=n, model=model, **kwargs)
        if len(examples) < n:
            raise RuntimeError(f"{task} has only {len(examples)} usable {shots}-shot examples, {n} needed")
        return examples

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


def median_time(ctx: Context, fn: Callable[[], object], repeats: int | None = None, warmup: int | None = None) -> dict:
    """Median wall time of ``fn`` over repeats, after warm-up calls."""
    return interleaved(ctx, {"t": fn}, repeats, warmup)["t"]


def interleaved(
    ctx: Context, fns: dict[str, Callable[[], object]], repeats: int | None = None, warmup: int | None = None
) -> dict[str, dict]:
    """Time several functions in turn (a, b, a, b, ...); median and all times of each.

    ``cpu`` is the median CPU time of this process (all its threads) over the same
    calls: on a shared machine it moves much less than the wall time.
    """
    repeats = ctx.repeats if repeats is None else repeats
    warmup = ctx.warmup if warmup is None else warmup
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            ctx.sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            ctx.sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return {
        name: {"median": statistics.median(t), "times": t, "cpu": statistics.median(cpu[name])}
        for name, t in times.items()
    }


def timed_once(ctx: Context, fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds of one call (for workloads too long to repeat)."""
    ctx.sync()
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    ctx.sync()
    return time.perf_counter() - start, time.process_time() - start_cpu


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x`` (y grows like x to this power)."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(max(y, 1e-12)) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else float("nan")


# ---------------------------------------------------------------------------
# Peak memory of one call (run inside a child process)
# ---------------------------------------------------------------------------


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def peak_memory(device: str, fn: Callable[[], object]) -> tuple[float, str]:
    """Run ``fn`` once; the extra memory at its peak in MiB, and how it was measured."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20, "torch.cuda.max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        how = "VmHWM rise (reset by clear_refs)"
    except OSError:
        how = "VmHWM rise (not resettable: upper bound of earlier peaks)"
    before = _status_kib("VmRSS")
    fn()
    return max(0, _status_kib("VmHWM") - before) / 1024, how


def run_child(module: str, args: dict, timeout: float = 600) -> dict:
    """Run ``python -m benchmarks.<module> '<json args>'`` in a fresh process; its JSON reply."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark child {module} {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def child_main(handler: Callable[[dict], dict]) -> None:
    """Entry point of a child process: JSON args in ``argv[1]``, one JSON line out."""
    args = json.loads(sys.argv[1])
    print(json.dumps(handler(args)), flush=True)
