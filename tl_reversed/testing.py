"""The public path of :mod:`tl_reversed.core.testing` (the same module object)."""

import sys

from tl_reversed.core import testing as _module

sys.modules[__name__] = _module
