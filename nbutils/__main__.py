"""``python -m nbutils …`` — see :mod:`nbutils.cli`."""

import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while torch is still importing: no traceback, the usual status
    print("error: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
