#!/usr/bin/env bash
# Attention-patching tables (docs/results/patching/): the exact commands.
# One thread: on a shared 2-core machine a multi-threaded torch slows down ~10x under load,
# and a fixed thread count keeps the float reductions, hence the numbers, identical.
set -euo pipefail
export OMP_NUM_THREADS=1
OUT=docs/results/patching
for task in capitalize present-past singular-plural capitalize_first_letter country-capital antonym \
            choose_middle_of_3 person-sport landmark_in_country verb_past_tense; do
  tl-reversed patching --task "$task" --shots 0,1,5 --iterative --n-train 25 --n-test 100 --seed 0 --out "$OUT"
done
