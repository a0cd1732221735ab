"""The benchmark harness still runs against the library (tiny sizes; the measurements themselves are in
docs/results.md). No library test depends on benchmarks/: this file only keeps the harness from rotting."""

import json
import subprocess
import sys

import pytest

from benchmarks import TASKS

pytestmark = pytest.mark.slow


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks", *argv], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("task", TASKS)
def test_every_task_explains_itself(task):
    out = _run(task, "--help")
    assert out.returncode == 0 and "usage: python -m benchmarks" in out.stdout, out.stderr


def test_sampling_table_at_a_tiny_size():
    out = _run("sampling", "--n", "4", "--steps", "2", "--no-metrics", "--checkpoint", "checkpoints")
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout.strip().splitlines()[0])
    assert record["command"].startswith("python -m benchmarks sampling") and record["machine"]
    assert record["rows"] and all(row["seconds"] > 0 for row in record["rows"])


def test_bad_input_is_one_error_line():
    out = _run("sampling", "--checkpoint", "no/such/folder", "--n", "2", "--no-metrics")
    assert out.returncode == 1 and out.stderr.strip().startswith("error:") and "Traceback" not in out.stderr
