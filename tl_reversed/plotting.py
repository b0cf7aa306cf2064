"""The public path of :mod:`tl_reversed.views.plotting` (the same module object)."""

import sys

from tl_reversed.views import plotting as _module

sys.modules[__name__] = _module
