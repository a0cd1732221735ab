"""pyproject.toml, environment.yml, Makefile, README and CI agree with each other."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


#: conda-forge's names where they differ from PyPI's
CONDA_NAMES = {"torch": "pytorch", "matplotlib": "matplotlib-base"}


def test_environment_yml_covers_pyproject():
    """environment.yml (conda-forge packages, the project then with pip --no-deps) holds every dependency of the
    library, the notebooks and the tests, and a Python range inside requires-python."""
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {re.split(r"[<>=\s]", d)[0] for d in env["dependencies"] if isinstance(d, str)}
    project = PYPROJECT["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["notebooks"] \
        + project["optional-dependencies"]["dev"]
    names = {re.split(r"[<>=\[ ]", d)[0].lower() for d in wanted}
    assert {CONDA_NAMES.get(n, n) for n in names} <= conda
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert python.startswith("python" + project["requires-python"]) and "<" in python
    assert "pip install --no-deps -e ." in (ROOT / "environment.yml").read_text()


def test_distribution_name_license_and_extras():
    project = PYPROJECT["project"]
    assert project["name"] != "nbutils"  # taken on PyPI by an unrelated package; the import name stays nbutils
    assert project["license"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")
    core = {re.split(r"[<>=\[ ]", d)[0].lower() for d in project["dependencies"]}
    assert not {"pandas", "seaborn", "ipywidgets"} & core  # notebook-only: the `notebooks` extra


def test_required_dependencies_are_declared():
    names = {re.split(r"[<>=\[ ]", d)[0].lower() for d in PYPROJECT["project"]["dependencies"]}
    need = {"torch", "torchvision", "matplotlib", "tqdm", "safetensors", "scipy", "numpy", "filelock"}
    assert need <= names
    dev = {re.split(r"[<>=\[ ]", d)[0].lower() for d in PYPROJECT["project"]["optional-dependencies"]["dev"]}
    assert {"pytest", "nbval", "jupyterlab", "ruff"} <= dev


def test_ranges_not_pins_and_nothing_above_the_local_torch():
    for dep in PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["dev"]:
        assert "==" not in dep, f"{dep}: use a range, not a pin"
        assert ">=" in dep, f"{dep}: give a lower bound"
    torch = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch>"))
    lower = tuple(int(x) for x in torch.split(">=")[1].split(",")[0].split("."))
    assert lower <= (2, 14, 1)


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make demo" in readme
    assert ci.rstrip().splitlines()[-1] == "make test-all"
    assert "apt-get update" in ci and "apt-get install -y dataset-fashion-mnist" in ci
    assert "NBUTILS_PRESET=smoke" in ci
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo:", "test:", "test-all:", "train:", "reproduce:", "lab:"):
        assert re.search(rf"^{target}", makefile, re.M), target


def test_accelerate_is_an_optional_extra_the_notebooks_never_import():
    import subprocess
    import sys

    core = {re.split(r"[<>=\[ ]", d)[0].lower() for d in PYPROJECT["project"]["dependencies"]}
    extra = {re.split(r"[<>=\[ ]", d)[0].lower() for d in PYPROJECT["project"]["optional-dependencies"]["distributed"]}
    assert "accelerate" not in core and "accelerate" in extra
    code = ("import sys, nbutils, nbutils.cli, nbutils.train_unet, nbutils.pipeline, nbutils.plotting, "
            "nbutils.widgets; print('accelerate' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
