"""The public path of :mod:`tl_reversed.core.models` (the same module object)."""

import sys

from tl_reversed.core import models as _module

sys.modules[__name__] = _module
