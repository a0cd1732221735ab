"""Grading submitted notebooks: ``python -m nbutils grade STUDENT.ipynb [...] --out scores.csv``.

For every code cell tagged as an exercise (cell metadata ``nbutils_exercise``: the function's name), the cell's
text is checked first (:func:`nbutils.exercises.source_violation`: only the plain tensor libraries may be imported,
and nothing that reaches the checker, the answer key or the interpreter's machinery may be named); then a fresh Python
process executes the cell and runs the function on the exercise's stored cases under the call monitor of
:mod:`nbutils.exercises`; only the function's outputs come back (as JSON), and this process judges them against
the stored expected outputs. So a notebook's own check cells are never trusted (deleting one changes nothing), a
cell that patches the checker patches it only in its own process, and an endless loop costs one time limit.
An exercise with no tagged cell scores 0 ("not found"), like an unsolved stub or one that delegates the work.

The student's code runs with the grader's permissions: grade untrusted submissions inside a container or a
throw-away account.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .exercises import EXERCISE_KEY, EXERCISES, decode_outputs, encode_outputs, judge, run_cases, source_violation

DEFAULT_TIMEOUT = 60.0
FIELDS = ("notebook", "exercise", "function", "points", "max_points", "message")


@dataclass
class Score:
    notebook: str
    exercise: str  # its number, e.g. "3.1"
    function: str
    points: float
    max_points: float
    message: str

    def __post_init__(self) -> None:  # written the same way in the CSV, whole points or not
        self.points, self.max_points = float(self.points), float(self.max_points)


def exercise_sources(nb: dict) -> dict[str, str]:
    """``{exercise key: cell source}`` for the tagged code cells of notebook ``nb`` (the last one wins)."""
    out = {}
    for cell in nb.get("cells", []):
        key = cell.get("metadata", {}).get(EXERCISE_KEY)
        if cell.get("cell_type") == "code" and key in EXERCISES:
            src = cell.get("source", "")
            out[key] = "".join(src) if isinstance(src, list) else str(src)
    return out


def notebook_number(path: Path, nb: dict) -> str | None:
    """Which course notebook a submission is: "01" … "06", from the file name, else from its tagged cells."""
    if path.name[:2].isdigit():
        return path.name[:2]
    tagged = {EXERCISES[k].notebook for k in exercise_sources(nb)}
    return tagged.pop() if len(tagged) == 1 else None


def run_in_fresh_process(key: str, source: str, timeout: float) -> list[dict] | str:
    """The outputs of exercise ``key``'s function defined by ``source``, computed in a new Python process; a
    one-line reason instead when it could not run (time limit, crash, no such function)."""
    request = json.dumps({"key": key, "source": source})
    try:
        proc = subprocess.run([sys.executable, "-m", "nbutils.grading"], input=request, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"stopped at the time limit of {timeout:g} s"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("NBUTILS-OUTPUTS ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"the cell did not run: {tail[:300]}"
    payload = json.loads(lines[-1].removeprefix("NBUTILS-OUTPUTS "))
    if "error" in payload:
        return payload["error"]
    try:
        return decode_outputs(json.dumps(payload["outputs"]))
    except (KeyError, TypeError, ValueError) as err:
        return f"unreadable outputs ({err})"


def grade_notebook(path: str | Path, timeout: float = DEFAULT_TIMEOUT) -> list[Score]:
    """One :class:`Score` per exercise of the course notebook that ``path`` is a submission of."""
    path = Path(path)
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(nb, dict):
            raise ValueError("not a notebook")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return [Score(path.name, "-", "-", 0.0, 0.0, f"could not read the notebook: {err}")]
    number = notebook_number(path, nb)
    chosen = [ex for ex in EXERCISES.values() if ex.notebook == number]
    if not chosen:
        return [Score(path.name, "-", "-", 0.0, 0.0, "no exercises: not one of the course notebooks 01–06")]
    sources = exercise_sources(nb)
    scores = []
    for ex in chosen:
        if ex.key not in sources:
            scores.append(Score(path.name, ex.number, ex.key, 0.0, ex.points,
                                f"not found: no code cell tagged {EXERCISE_KEY}={ex.key!r}"))
            continue
        violation = source_violation(sources[ex.key])
        outputs = violation or run_in_fresh_process(ex.key, sources[ex.key], timeout)
        if isinstance(outputs, str):
            scores.append(Score(path.name, ex.number, ex.key, 0.0, ex.points, f"✗ {outputs}"))
            continue
        result = judge(ex.key, outputs, attempt=1)
        scores.append(Score(path.name, ex.number, ex.key, result.points, result.max_points, result.message))
    return scores


def grade(paths: list[str | Path], out: str | Path | None = None, timeout: float = DEFAULT_TIMEOUT,
          progress=None) -> list[Score]:
    """Grade every notebook in ``paths``; write the scores as CSV to ``out`` when given (one row per notebook ×
    exercise: notebook, exercise, function, points, max_points, message)."""
    scores = []
    for path in paths:
        scores += grade_notebook(path, timeout)
        if progress is not None:
            progress(path)
    if out is not None:
        write_scores(scores, out)
    return scores


def write_scores(scores: list[Score], out: str | Path) -> None:
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(asdict(s) for s in scores)


def _worker() -> None:
    """The fresh process: define the student's function, run it on the stored cases, print the outputs."""
    request = json.loads(sys.stdin.read())
    key, source = request["key"], request["source"]
    namespace = {"__name__": "__student__", "math": math, "np": np, "torch": torch}
    try:
        exec(compile(source, f"<exercise {key}>", "exec"), namespace)  # noqa: S102 - grading runs student code
    except BaseException as err:  # noqa: BLE001 - anything the cell does wrong is the student's score
        payload = {"error": f"the cell raised {type(err).__name__}: {err}"}
    else:
        fn = namespace.get(key)
        if not callable(fn):
            payload = {"error": f"the cell defines no function named {key}"}
        else:
            payload = {"outputs": json.loads(encode_outputs(run_cases(key, fn)))}
    sys.stdout.write("\nNBUTILS-OUTPUTS " + json.dumps(payload) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    _worker()
