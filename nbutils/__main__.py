"""``python -m nbutils …`` — see :mod:`nbutils.cli`."""

import sys

from .cli import main

sys.exit(main())
