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


def test_judges_table_at_a_tiny_size():
    out = _run("judges", "--n", "40", "--checkpoint", "checkpoints")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[0])["rows"]
    assert [(r["reference"], r["judge"]) for r in rows[::3]] == [("test", "resnet"), ("test", "vgg"),
                                                                 ("val", "resnet"), ("val", "vgg")]
    assert [r["row"].split(":")[0] for r in rows[:3]] == ["floor", "ceiling", "recipe"]
    assert all(r["fid_vs_ceiling"] == 1.0 for r in rows if r["row"] == "ceiling")
    assert len({r["fid"] for r in rows if r["row"] == "recipe"}) == 4  # each judge and reference sees differently


def test_bad_input_is_one_error_line():
    out = _run("sampling", "--checkpoint", "no/such/folder", "--n", "2", "--no-metrics")
    assert out.returncode == 1 and out.stderr.strip().startswith("error:") and "Traceback" not in out.stderr


def test_the_reference_run_stops_at_its_budget_and_resumes_to_the_end(tmp_path):
    """full_gpu's path on a CPU (smoke preset): a budget that runs out mid-training leaves a resumable run; the same
    command again finishes training, samples and evaluates."""
    argv = ("full_gpu", "--preset", "smoke", "--run-dir", str(tmp_path / "run"), "--n", "100")
    first = _run(*argv, "--budget-s", "3")
    assert first.returncode == 0, first.stderr[-2000:]
    partial = json.loads(first.stdout.splitlines()[0])
    # where 3 s end depends on the machine: in the VAE's training or, on a fast one, in the UNet's
    stage = partial["stage"].removeprefix("stopped in ").split(" ")[0]
    assert partial["stage"].endswith("(budget); run the same command again to resume") and stage in ("vae", "unet")
    assert (partial["vae_epochs"], partial["unet_epochs"]) == ((0, 0) if stage == "vae" else (1, 0))
    saved = (tmp_path / "run" / f"{stage}_state.pt").is_file()  # False when the budget ran out before a step
    second = _run(*argv)
    assert second.returncode == 0, second.stderr[-2000:]
    done = json.loads(second.stdout.splitlines()[0])
    assert done["stage"] == "done" and done["vae_epochs"] == done["unet_epochs"] == 1
    # a finished VAE logs its resume too, before the UNet's
    assert second.stderr.count("resuming ") == (stage == "unet") + saved, second.stderr[-2000:]
    assert 0 <= done["cond_acc"] <= 1 and done["fid"] > 0
