"""``python -m tl_reversed``: the ``tl-reversed`` command line."""

import sys

from tl_reversed.commands.cli import main

if __name__ == "__main__":
    sys.exit(main())
