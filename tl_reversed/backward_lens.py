"""The public path of :mod:`tl_reversed.lens.backward_lens` (the same module object)."""

import sys

from tl_reversed.lens import backward_lens as _module

sys.modules[__name__] = _module
