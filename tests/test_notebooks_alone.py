"""Each notebook opened alone in a fresh clone — no runs/, so on the shipped checkpoints, as on Colab — runs top
to bottom, and its checks hold (notebook 05's sampler by hand equals the library's on the shipped v-prediction
UNet, for example). nbval in `make test` runs them the other way: in order, each on the previous one's runs."""

import os
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from nbutils import nbtools

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", nbtools.notebook_paths(), ids=lambda p: p.name)
def test_notebook_runs_alone_on_the_shipped_checkpoints(path, tmp_path, monkeypatch):
    clone = tmp_path / "clone"
    (clone / "notebooks").mkdir(parents=True)
    shutil.copy(path, clone / "notebooks" / path.name)
    shutil.copytree(ROOT / "checkpoints", clone / "checkpoints")
    shutil.copy(ROOT / "pyproject.toml", clone / "pyproject.toml")
    (clone / "nbutils").symlink_to(ROOT / "nbutils")  # what a clone holds; the package is the one installed
    monkeypatch.setenv("NBUTILS_HOME", str(clone))  # runs/ and checkpoints/ of the clone, not of this checkout
    monkeypatch.setenv("NBUTILS_PRESET", os.environ.get("NBUTILS_PRESET", "smoke"))
    nb = nbformat.read(clone / "notebooks" / path.name, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(clone / "notebooks")}}).execute()
