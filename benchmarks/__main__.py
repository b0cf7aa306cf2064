"""``python -m benchmarks [--device cpu|cuda] [--only B1,B3] [--quick] [--out DIR] [--passive-wait]``."""

import os
import sys

# OpenMP's wait policy must be chosen before torch loads. By default the benchmarks run
# under the same policy a user gets (OpenMP's own: spin, then sleep), which is 1.5x faster
# for the small ops of short prompts on a quiet machine. On a busy machine a spinning
# barrier waits for a descheduled partner thread (5-10x slower passes with 2 threads on
# 2 shared cores); `--passive-wait` sets OMP_WAIT_POLICY=PASSIVE for that case. An
# explicit OMP_WAIT_POLICY in the environment wins either way.
if "--passive-wait" in sys.argv[1:]:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from benchmarks.runner import main  # noqa: E402

raise SystemExit(main())
