"""The public path of :mod:`tl_reversed.experiments.attention_patching` (the same module object)."""

import sys

from tl_reversed.experiments import attention_patching as _module

sys.modules[__name__] = _module
