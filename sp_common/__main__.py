"""``python -m sp_common``: the ``sp-compare`` tool (see :mod:`sp_common.compare`)."""

import sys

from .compare import main

if __name__ == "__main__":
    sys.exit(main())
