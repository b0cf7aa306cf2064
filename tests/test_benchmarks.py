"""Smoke test of the benchmarks: each runs once on a tiny random model, so none can rot.

The figures themselves are measured by ``make bench`` (``python -m benchmarks``), not here.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the benchmarks package lives beside tests/

from benchmarks import BENCHMARKS  # noqa: E402
from benchmarks.common import Context, check, fit_exponent  # noqa: E402
from benchmarks.runner import markdown, run_benchmarks, write  # noqa: E402

EXPECTED_ROWS = {"B1": 4, "B2": 9, "B3": 5, "B4": 12, "B5": 4, "B6": 5, "B8": 9, "B9": 4}
NOT_POSITIVE = {"B4", "B8"}  # growth exponents of tiny points may be zero or negative


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    ctx = Context(tiny=True, repeats=1, warmup=0, log=lambda line: None)
    rows, status = run_benchmarks(ctx, list(BENCHMARKS))
    out = tmp_path_factory.mktemp("bench")
    meta = {"device": "cpu", "command": "smoke", "machine": {"cpu": "test", "cores": 1, "torch_threads": 1}}
    paths = write(out, "cpu", rows, status, meta)
    return rows, status, paths


@pytest.mark.parametrize("bench", list(BENCHMARKS))
def test_each_benchmark_runs_and_gives_finite_figures(results, bench):
    rows, status, _ = results
    assert status[bench]["error"] is None, status[bench]["error"]
    mine = [r for r in rows if r.bench == bench]
    assert len(mine) == EXPECTED_ROWS[bench], [r.name for r in mine]
    for r in mine:
        assert math.isfinite(r.value), r
        if bench not in NOT_POSITIVE:
            assert r.value > 0, r
        assert (r.met is None) == (r.target == ""), r


def test_json_and_markdown_have_every_row(results):
    rows, _, (json_path, md_path) = results
    data = json.loads(json_path.read_text())
    assert [(r["bench"], r["name"]) for r in data["rows"]] == [(r.bench, r.name) for r in rows]
    assert set(data["benchmarks"]) == set(BENCHMARKS)
    table = md_path.read_text()
    for r in rows:
        assert f"| {r.bench} | {r.name} |" in table
    assert md_path.name == "benchmarks.md" and "## CPU" in table
    assert markdown(data) in table
    runs = table.split("| | run |")[1]
    for bench in BENCHMARKS:
        assert f"| {bench} | " in runs
    assert "| OMP_WAIT_POLICY |" in table and "| `smoke` | (unset) |" in runs


def test_targets_and_exponents():
    assert check(1.2, "<= 1.3") is True and check(1.4, "<= 1.3") is False
    assert check(60, ">= 50") is True and check(1, "") is None
    assert fit_exponent([32, 64, 128], [1.0, 4.0, 16.0]) == pytest.approx(2.0)
    assert fit_exponent([2, 4, 8], [3.0, 6.0, 12.0]) == pytest.approx(1.0)
