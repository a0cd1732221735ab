"""The path a Colab student takes, simulated offline: a fresh Python environment without the project, the
notebook's own setup cell (with the repository address pointed at a local clone, Colab detected through a stand-in
``google.colab`` module), then the notebook's first cells in the same process."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from nbutils.nbtools import repository_url

ROOT = Path(__file__).resolve().parents[1]


def _code_cells(notebook: str) -> list[str]:
    nb = json.loads((ROOT / "notebooks" / notebook).read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


@pytest.mark.slow
def test_colab_setup_cell_in_a_fresh_environment(tmp_path):
    origin = tmp_path / "origin"  # stands in for GitHub: a clone of this repository's committed state
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(origin)], check=True)

    # A fresh virtual environment without the project. Offline, its dependencies come from this environment's
    # site-packages through a path line (which, unlike a site directory, brings no editable install with it).
    venv = tmp_path / "colab"
    # (no pip of its own: pip and setuptools come with the dependencies; Colab's pip builds with PyPI's setuptools)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "offline-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    assert subprocess.run([str(python), "-c", "import nbutils"], capture_output=True, cwd=tmp_path).returncode != 0

    content = tmp_path / "content"  # Colab's working folder
    content.mkdir()
    setup, *cells = _code_cells("00_fashion_mnist.ipynb")
    url = repository_url()
    assert f'REPO = "{url}"' in setup and 'ROOT = "/content/' in setup
    setup = setup.replace(url, str(origin)).replace('"/content/', f'"{content}/')
    fake = tmp_path / "fake"  # `import google.colab` succeeds, as on Colab
    (fake / "google" / "colab").mkdir(parents=True)
    (fake / "google" / "__init__.py").write_text("")
    (fake / "google" / "colab" / "__init__.py").write_text("")
    script = "\n\n".join(["import google.colab", setup, setup, *cells[:3],  # the setup cell twice: it is idempotent
                          "print('COLAB-SIMULATION-OK', nbutils.__file__, cfg.preset)"])
    env = {**os.environ, "PYTHONPATH": str(fake), "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0",
           "NBUTILS_PRESET": "smoke", "MPLBACKEND": "Agg"}
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run([str(python), "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    clone = content / url.rsplit("/", 1)[-1]  # where the setup cell clones to
    assert "COLAB-SIMULATION-OK" in proc.stdout and str(clone / "nbutils") in proc.stdout
    assert sorted(p.name for p in content.iterdir()) == [clone.name]  # one clone
    assert not (clone / clone.name).exists() and not (clone / "notebooks" / clone.name).exists()  # none nested
