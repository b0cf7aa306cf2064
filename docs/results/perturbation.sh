#!/usr/bin/env bash
# Perturbation-test tables (docs/results/perturbation/): the exact commands.
#
# Budget: these ran on 2 shared CPU cores at roughly 100-150 tokens/s per process. CM1 and
# CM2 need one forward pass per head (270 on SmolLM2) over the scoring prompts, and the
# curves 128 forward passes over the test prompts, so a 5-shot task (about 60-token
# prompts) costs about an hour. Heads are scored on 10 training prompts, curves use 30
# test prompts; 5 shots for capitalize, present-past and verb_past_tense, 1 shot for every
# task, 0 shots for capitalize. One thread: multi-threaded torch slows down ~10x on a
# loaded 2-core machine, and a fixed thread count keeps the numbers identical run to run.
set -euo pipefail
export OMP_NUM_THREADS=1
OUT=docs/results/perturbation
METHODS=ra,fa,cm1,cm2,atp,random,index
run() { tl-reversed perturbation --task "$1" --shots "$2" --methods "$METHODS" --n 30 --n-score 10 --seed 0 --out "$OUT"; }

run capitalize 0,1,5
run present-past 1,5
run verb_past_tense 1,5
for task in singular-plural capitalize_first_letter country-capital antonym choose_middle_of_3 \
            person-sport landmark_in_country; do
  run "$task" 1
done
