"""``python -m benchmarks TASK [options]``: the measurements a user re-runs (``TASK --help`` for each)."""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

from benchmarks import TASKS
from benchmarks.common import emit
from nbutils.checkpoints import CheckpointError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmarks of the FashionMNIST latent diffusion project. Each task prints one JSON object "
                    "(date, machine, command included); results go to docs/results.md.",
    )
    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    for name in TASKS:
        module = importlib.import_module(f"benchmarks.{name}")
        p = sub.add_parser(name, help=module.__doc__.strip().splitlines()[0].partition(": ")[2],
                           description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = "python -m benchmarks " + shlex.join(argv)
    try:
        record = args.module.run(args)
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if record is not None:  # None: a worker process that printed its own line for its parent
        emit(args, record, getattr(args.module, "COLUMNS", None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
