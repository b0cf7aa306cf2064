"""``python -m benchmarks [--device cpu|cuda] [--only B1,B3] [--quick] [--out DIR]``."""

import os

# Under a busy CPU, OpenMP's spinning barrier makes every torch op wait for a descheduled
# partner thread (5-10x slower forward passes with 2 threads on 2 shared cores); passive
# waiting removes that. Must be set before torch loads; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from benchmarks.runner import main  # noqa: E402

raise SystemExit(main())
