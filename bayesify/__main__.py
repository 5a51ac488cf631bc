"""``python -m bayesify``: the ``bayesify`` command line."""

import sys

from .cli import main

sys.exit(main())
