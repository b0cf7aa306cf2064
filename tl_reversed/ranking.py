"""The public path of :mod:`tl_reversed.experiments.ranking` (the same module object)."""

import sys

from tl_reversed.experiments import ranking as _module

sys.modules[__name__] = _module
