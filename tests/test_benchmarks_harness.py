"""The benchmark harness still runs against the library (tiny sizes; the measurements themselves are in
docs/results.md). No library test depends on benchmarks/: this file only keeps the harness from rotting."""

import json
import subprocess
import sys

import pytest
import torch

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


def test_throughput_compares_the_layouts_in_one_run():
    out = _run("throughput", "--preset", "smoke", "--steps", "1", "--warmup", "1", "--sample-batch", "8",
               "--batch-size", "8", "--channels-last", "--peak")
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads(out.stdout.strip().splitlines()[0])
    rows = record["rows"]
    assert [r["layout"] for r in rows] == ["contiguous", "channels_last"]
    assert rows[1]["forward_speedup"] == round(rows[0]["s_per_forward"] / rows[1]["s_per_forward"], 3)
    # the layout changes the speed, not the work; the rate is the work over the time, against the matmul's
    assert rows[0]["gflop_per_forward"] == rows[1]["gflop_per_forward"] > 0
    assert record["matmul_gflop_per_s"] > 0
    for r in rows:
        rate = r["gflop_per_forward"] / r["s_per_forward"]
        assert r["gflop_per_s"] == pytest.approx(rate, rel=0.02, abs=0.1)
        assert r["peak_fraction"] == pytest.approx(rate / record["matmul_gflop_per_s"], rel=0.02, abs=0.002)


def test_the_flop_count_is_the_convolutions_by_hand():
    """One 3×3 convolution's count, worked out by hand: 2 · (output positions) · (C_in · 9) · C_out."""
    from benchmarks.throughput import forward_gflop

    conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(5, 4, 7, 7)
    assert forward_gflop(lambda a, b, c: conv(a), x, None, None) * 1e9 == 2 * 5 * 49 * 4 * 9 * 8


def test_judges_table_at_a_tiny_size():
    out = _run("judges", "--n", "40", "--checkpoint", "checkpoints")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[0])["rows"]
    assert [(r["reference"], r["judge"]) for r in rows[::3]] == [("test", "resnet"), ("test", "vgg"),
                                                                 ("val", "resnet"), ("val", "vgg")]
    assert [r["row"].split(":")[0] for r in rows[:3]] == ["floor", "ceiling", "recipe"]
    assert all(r["fid_vs_ceiling"] == 1.0 for r in rows if r["row"] == "ceiling")
    assert len({r["fid"] for r in rows if r["row"] == "recipe"}) == 4  # each judge and reference sees differently


def test_guidance_sweeps_the_scale_of_a_listed_recipe():
    out = _run("guidance", "--n", "20", "--n-ref", "50", "--checkpoint", "checkpoints", "--timesteps", "995,500,0",
               "2@30-600", "3@30-600")
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads(out.stdout.strip().splitlines()[0])
    assert record["timesteps"] == [995, 500, 0] and [r["spec"] for r in record["rows"]] == [
        "2@30-600 (listed 3)", "3@30-600 (listed 3)"]
    assert all(r["recipe"]["timesteps"] == [995, 500, 0] and r["recipe"]["steps"] is None for r in record["rows"])
    assert record["rows"][0]["fid"] != record["rows"][1]["fid"]


@pytest.mark.parametrize("argv, message", [
    (("judges", "--samples", "a/s.npz", "b/s.npz"), "would be ambiguous"),  # two rows would be called "s"
    (("training", "--processes", "1", "--sync-every", "32"), "must be multiples of --sync-every"),
    (("guidance", "--timesteps", "shipped", "--spacing", "logsnr", "3"), "takes no --spacing"),
])
def test_settings_that_cannot_work_are_refused_first(argv, message):
    out = _run(*argv)
    assert out.returncode == 1 and out.stderr.startswith("error:") and message in out.stderr, out.stderr[-1000:]


def test_bad_input_is_one_error_line():
    out = _run("sampling", "--checkpoint", "no/such/folder", "--n", "2", "--no-metrics")
    assert out.returncode == 1 and out.stderr.strip().startswith("error:") and "Traceback" not in out.stderr


@pytest.mark.parametrize("stop, stage, resumes", [(3, "vae", 1), (10, "unet", 2)])  # smoke: 8 VAE steps
def test_the_reference_run_stops_and_resumes_to_the_end(tmp_path, stop, stage, resumes):
    """full_gpu's path on a CPU (smoke preset): a run stopped mid-training (here after a number of steps, the same
    SIGTERM path as --budget-s) is resumable; the same command again finishes training, samples and evaluates."""
    argv = ("full_gpu", "--preset", "smoke", "--run-dir", str(tmp_path / "run"), "--n", "100")
    first = _run(*argv, "--stop-after-steps", str(stop))
    assert first.returncode == 0, first.stderr[-2000:]
    partial = json.loads(first.stdout.splitlines()[0])
    assert partial["stage"] == f"stopped in {stage} training (budget); run the same command again to resume"
    assert (partial["vae_epochs"], partial["unet_epochs"]) == ((0, 0) if stage == "vae" else (1, 0))
    assert (tmp_path / "run" / f"{stage}_state.pt").is_file() and partial["steps_this_run"] == stop
    second = _run(*argv)
    assert second.returncode == 0, second.stderr[-2000:]
    done = json.loads(second.stdout.splitlines()[0])
    assert done["stage"] == "done" and done["vae_epochs"] == done["unet_epochs"] == 1
    assert second.stderr.count("resuming ") == resumes, second.stderr[-2000:]  # a finished VAE resumes too
    assert 0 <= done["cond_acc"] <= 1 and done["fid"] > 0 and 0 <= done["vgg"]["cond_acc"] <= 1
    other = "unet" if stage == "vae" else "vae"  # speed counts the epochs run whole (smoke: 8 steps an epoch)
    assert done[f"{stage}_speed"] == {} and done[f"{other}_speed"]["steps_per_epoch"] == 8
    assert done[f"{other}_speed"]["step_seconds"] > 0


def test_a_budget_that_ends_before_training_leaves_a_run_to_start_again(tmp_path):
    out = _run("full_gpu", "--preset", "smoke", "--run-dir", str(tmp_path / "run"), "--n", "100", "--budget-s", "0.001")
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads(out.stdout.splitlines()[0])
    assert record["stage"].startswith("stopped in vae training (budget)") and record["vae_epochs"] == 0
