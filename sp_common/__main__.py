"""``python -m sp_common``: the ``sp-compare`` tool (see :mod:`sp_common.compare.cli`)."""

import sys

from .compare.cli import main

if __name__ == "__main__":
    sys.exit(main())
