"""The public path of :mod:`tl_reversed.core.reversed_attention` (the same module object)."""

import sys

from tl_reversed.core import reversed_attention as _module

sys.modules[__name__] = _module
