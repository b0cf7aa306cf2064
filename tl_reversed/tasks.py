"""The public path of :mod:`tl_reversed.experiments.tasks` (the same module object)."""

import sys

from tl_reversed.experiments import tasks as _module

sys.modules[__name__] = _module
