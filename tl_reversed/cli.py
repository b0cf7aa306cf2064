"""The public path of :mod:`tl_reversed.commands.cli` (the same module object)."""

import sys

from tl_reversed.commands import cli as _module

sys.modules[__name__] = _module
