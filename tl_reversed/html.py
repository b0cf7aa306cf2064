"""The public path of :mod:`tl_reversed.views.html` (the same module object)."""

import sys

from tl_reversed.views import html as _module

sys.modules[__name__] = _module
