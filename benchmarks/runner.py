"""Run the benchmarks, print each figure beside its target, write Markdown and JSON.

Results go to ``<out>/benchmarks-<device>.json``, and ``<out>/benchmarks.md`` is rewritten
from every device's JSON there (``<out>`` defaults to ``docs``).
A run with ``--only`` replaces the rows of the benchmarks it ran and keeps the others,
so final figures can be assembled from separate, quieter runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import resource
import sys
import time
import traceback
from pathlib import Path

from benchmarks import BENCHMARKS
from benchmarks.common import Context, Row


def machine() -> dict:
    """The machine and software the figures were measured with."""
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_average_at_start"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def run_benchmarks(ctx: Context, only: list[str]) -> tuple[list[Row], dict[str, dict]]:
    """Run the chosen benchmarks; their rows, and per benchmark its time and any error."""
    rows: list[Row] = []
    status: dict[str, dict] = {}
    for bench in only:
        module, title = BENCHMARKS[bench]
        ctx.log(f"\n== {bench}: {title}")
        start, cpu = time.perf_counter(), _cpu_seconds()
        try:
            got = importlib.import_module(f"benchmarks.{module}").run(ctx)
            error = None
        except Exception as exc:  # one broken benchmark must not hide the others
            got, error = [], f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
        for r in got:
            ctx.log(format_row(r))
        status[bench] = {
            "seconds": seconds,
            "cpu_seconds": cpu,
            "error": error,
            "finished": dt.datetime.now().isoformat(timespec="seconds"),
        }
        ctx.log(f"   ({bench} took {seconds:.0f} s, {cpu:.0f} CPU s{'; FAILED: ' + error if error else ''})")
        rows.extend(got)
    return rows, status


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the subprocess benchmarks)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _fmt(value: float) -> str:
    if value != value:  # nan
        return "nan"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def format_row(r: Row) -> str:
    verdict = "" if r.met is None else ("  MET" if r.met else "  NOT MET")
    target = f"   target {r.target}{verdict}" if r.target else ""
    note = f"   [{r.note}]" if r.note else ""
    return f"   {r.bench} {r.name:<52} {_fmt(r.value):>9} {r.unit:<10}{target}{note}"


def markdown(data: dict) -> str:
    """The results table, then one line per benchmark: when, how and on what it ran."""
    meta = data["last_run"]
    machine = meta["machine"]
    lines = [
        f"Device: {meta['device']} ({machine.get('gpu') or machine['cpu']}, {machine['cores']} cores, "
        f"{machine['torch_threads']} torch threads).",
        "",
        "| | measured | value | target | met | note |",
        "|---|---|---:|---|---|---|",
    ]
    for r in data["rows"]:
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(
            f"| {r['bench']} | {r['name']} | {_fmt(r['value'])} {r['unit']} | {r['target']} | {met} | {r['note']} |"
        )
    lines += [
        "",
        "| | run | command | OMP_WAIT_POLICY | load average at start | wall | CPU |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for bench in sorted(data["benchmarks"], key=lambda b: int(b[1:])):
        b = data["benchmarks"][bench]
        run_meta = b.get("meta", {})
        load = run_meta.get("machine", {}).get("load_average_at_start")
        policy = run_meta.get("machine", {}).get("omp_wait_policy") or "(unset)"
        lines.append(
            f"| {bench} | {b.get('finished', '')} | `{run_meta.get('command', '')}` | {policy} | "
            f"{'' if load is None else f'{load:.1f}'} | {b['seconds']:.0f} s | {b.get('cpu_seconds', float('nan')):.0f} s |"
        )
    return "\n".join(lines) + "\n"


def write(out: Path, device: str, rows: list[Row], status: dict, meta: dict) -> tuple[Path, Path]:
    """Merge these rows into ``out``'s results for the device; write JSON and Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"benchmarks-{device.split(':')[0]}.json"
    old = json.loads(path.read_text()) if path.exists() else {"rows": [], "benchmarks": {}}
    ran = set(status)
    merged = [r for r in old["rows"] if r["bench"] not in ran] + [r.as_dict() for r in rows]
    merged.sort(key=lambda r: int(r["bench"][1:]))
    benchmarks = {**old.get("benchmarks", {}), **{b: {**s, "meta": meta} for b, s in status.items()}}
    data = {"rows": merged, "benchmarks": benchmarks, "last_run": meta}
    path.write_text(json.dumps(data, indent=1))
    md = out / "benchmarks.md"
    md.write_text(report(out))
    return path, md


def report(out: Path) -> str:
    """``benchmarks.md``: one section per device measured, from every ``benchmarks-<device>.json`` in ``out``."""
    sections = [
        "# Benchmarks",
        "",
        "Measured by `make bench` (`python -m benchmarks --out docs`; `--device cuda` on a GPU, "
        "`--only B1,B5` to rerun some, `--full` to run causal mediation in B2 instead of estimating it, "
        "`--passive-wait` for steadier figures on a busy machine). "
        "Each figure is the median of timed repeats after a warm-up; peak memory and load times are "
        "taken in fresh subprocesses. The second table of each section says when each benchmark last "
        "ran, with which command and OpenMP wait policy, and how busy the machine was (load average) "
        "when it started.",
    ]
    for path in sorted(out.glob("benchmarks-*.json")):
        data = json.loads(path.read_text())
        device = path.stem.split("-", 1)[1]
        sections += ["", f"## {device.upper()}", "", markdown(data).rstrip("\n")]
    return "\n".join(sections) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--only", default="", help="comma-separated benchmark ids, e.g. B1,B3 (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller sweeps")
    parser.add_argument(
        "--full",
        action="store_true",
        help="B2: run the causal-mediation rankings (10-25 min each) instead of estimating them; "
        "B3 and B5: five-shot prompts too",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (default 5, quick 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--passive-wait",
        action="store_true",
        help="OMP_WAIT_POLICY=PASSIVE (read before torch loads, so only through python -m benchmarks): "
        "steadier figures on a busy machine, slower ones on a quiet one",
    )
    parser.add_argument("--out", default="docs", help="folder for the JSON and Markdown results (default docs)")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    only = [b.strip().upper() for b in args.only.split(",") if b.strip()] or list(BENCHMARKS)
    unknown = [b for b in only if b not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)} (B7 is --device)")
    repeats = args.repeats or (2 if args.quick else 5)
    ctx = Context(device=args.device, quick=args.quick, full=args.full, repeats=repeats)
    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "device": args.device,
        "quick": args.quick,
        "full": args.full,
        "repeats": repeats,
        "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
    }
    print(
        f"tl_reversed benchmarks on {args.device}: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, "
        f"{meta['machine']['torch_threads']} torch threads, OMP_WAIT_POLICY={meta['machine']['omp_wait_policy'] or '(unset)'}"
    )
    start, cpu = time.perf_counter(), _cpu_seconds()
    rows, status = run_benchmarks(ctx, only)
    meta["seconds"], meta["cpu_seconds"] = time.perf_counter() - start, _cpu_seconds() - cpu
    path, md = write(Path(args.out), args.device, rows, status, meta)
    print(f"\n== summary ({meta['seconds']:.0f} s, {meta['cpu_seconds']:.0f} CPU s)")
    for r in rows:
        print(format_row(r))
    failed = [b for b, s in status.items() if s["error"]]
    print(f"\nwrote {path} and {md}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
