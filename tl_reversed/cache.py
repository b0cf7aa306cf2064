"""The public path of :mod:`tl_reversed.core.cache` (the same module object)."""

import sys

from tl_reversed.core import cache as _module

sys.modules[__name__] = _module
