import json
import subprocess
import sys

import pytest

from nbutils import cli
from nbutils import data as D


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "nbutils", *args], capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_help_for_every_command():
    for cmd in ("info", "data", "notebooks"):
        out = run(cmd, "--help")
        assert out.returncode == 0 and "usage: python -m nbutils" in out.stdout


def test_info_json(monkeypatch, capsys):
    monkeypatch.setenv("NBUTILS_PRESET", "smoke")
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["preset"] == "smoke" and info["device"] in ("cpu", "cuda", "mps")
    assert {"torch", "torchvision", "python", "data"} <= set(info)


def test_unknown_preset_from_env_is_a_clear_error(monkeypatch):
    import os

    env = dict(os.environ, NBUTILS_PRESET="turbo")
    out = run("info", env=env)
    assert out.returncode == 1
    assert "error: unknown preset 'turbo'" in out.stderr and "smoke, cpu, gpu, shipped, full" in out.stderr


def test_bad_preset_argument_exits_2():
    out = run("info", "--preset", "turbo")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_data_writes_grid(fake_fashion, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(D, "FILES", D.FILES)  # patched by the fixture
    out = tmp_path / "grid.png"
    assert cli.main(["data", "--data-root", str(fake_fashion), "--out", str(out), "--per-class", "2"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["train"]["images"] == [40, 1, 28, 28]
    assert sum(stats["test"]["per_class"].values()) == 20
    import matplotlib.image

    img = matplotlib.image.imread(out)
    height, width = img.shape[:2]
    assert height == 2 * (10 * 30 + 2) and width > 2 * (2 * 30 + 2)  # 10 rows × 2 images, 2×, class names left


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "/nonexistent-folder/x.png"], "output folder '/nonexistent-folder' does not exist"),
        (["--out", "grid.jpg"], "must end in .png"),
    ],
)
def test_data_rejects_bad_output(fake_fashion, capsys, args, message):
    assert cli.main(["data", "--data-root", str(fake_fashion), *args]) == 1
    assert message in capsys.readouterr().err


def test_data_missing_dataset_is_a_clear_error(no_data_anywhere, capsys):
    assert cli.main(["data"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: FashionMNIST not found") and "apt-get install dataset-fashion-mnist" in err


def test_data_corrupt_dataset_is_a_clear_error(fake_fashion, capsys):
    path = fake_fashion / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-5])
    assert cli.main(["data", "--data-root", str(fake_fashion)]) == 1
    assert "train-labels-idx1-ubyte.gz is damaged" in capsys.readouterr().err


def test_per_class_must_be_positive():
    out = run("data", "--per-class", "0")
    assert out.returncode == 2 and "must be ≥ 1" in out.stderr


def test_a_closed_pipe_ends_quietly():
    """`python -m nbutils info | head -2`: the reader leaves early; no traceback, exit status 141 (as SIGPIPE)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "nbutils", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # the reader goes away while info is still printing
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, 141), err
    assert "Traceback" not in err
