"""Write copies of the course notebooks with every exercise solved: ``python instructor/solutions.py [--out DIR]``.

The copies (default ``notebooks/solutions/``, git-ignored) carry the answer key's cells in place of the stubs,
outputs cleared; run them with ``NBUTILS_STRICT_CHECKS=1`` to turn a failed check into an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import answers  # noqa: E402 - this folder is not a package

from nbutils.exercises import EXERCISE_KEY, EXERCISES  # noqa: E402
from nbutils.nbtools import notebook_paths, solution_notebook  # noqa: E402


def write_solutions(out_dir: Path) -> list[Path]:
    solutions = {key: answers.solution_cell(key) for key in EXERCISES}
    written = []
    for path in notebook_paths():
        nb = json.loads(path.read_text(encoding="utf-8"))
        if not any(EXERCISE_KEY in c.get("metadata", {}) for c in nb["cells"]):
            continue
        target = out_dir / path.name
        target.write_text(json.dumps(solution_notebook(nb, solutions), indent=1, ensure_ascii=False) + "\n",
                          encoding="utf-8")
        written.append(target)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "notebooks" / "solutions")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for path in write_solutions(args.out):
        print(path)


if __name__ == "__main__":
    main()
