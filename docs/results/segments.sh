#!/usr/bin/env bash
# The segment-mask LoRA experiment (docs/results/segments/): causal-LoRA and MAS-LoRA adapters
# per task on the embedded SmolLM2-135M-Instruct, then held-out accuracy of base / causal-LoRA /
# MAS-LoRA. Run from the repository root (`python -m tl_reversed.commands.cli` is `tl-reversed`
# of this checkout). Both commands resume: a rerun keeps the finished adapters and tasks.
# One thread: on the shared 2-core machine a multi-threaded torch slows down under load.
# The adapters (~3.7 MB each) stay in $OUT; the tables are copied here.
set -euo pipefail
export OMP_NUM_THREADS=1
PYTHON=${PYTHON:-python}
OUT=${OUT:-out/segments}
tlr() { "$PYTHON" -m tl_reversed.commands.cli "$@"; }
tlr segments train --steps 40 --batch-size 8 --lr 2e-3 --rank 8 --seed 0 --out "$OUT"
tlr segments eval --n-test 200 --seed 0 --out "$OUT"
cp "$OUT"/segments.csv "$OUT"/segments.md "$OUT"/segments.png "$OUT"/train.csv docs/results/segments/
