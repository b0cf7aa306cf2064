"""The public path of :mod:`tl_reversed.experiments.perturbation` (the same module object)."""

import sys

from tl_reversed.experiments import perturbation as _module

sys.modules[__name__] = _module
