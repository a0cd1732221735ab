"""``python -m nbutils …`` — see :mod:`nbutils.cli`."""

import os
import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while torch is still importing: no traceback, the usual status
    print("error: interrupted", file=sys.stderr)
    code = 130
else:
    code = main()
if code == 130:
    # Leave with the status said, now: had the interrupt passed through an eval() (namedtuple and dataclasses
    # build code that way), CPython would kill the process with SIGINT on its way out instead.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)
sys.exit(code)
