"""Keeping the notebooks in shape: Open-in-Colab badge, Colab setup cell, config cell.

The repository address is one setting, ``[tool.nbutils] repository`` in ``pyproject.toml``. Every
notebook's first cell carries a badge built from it and its second cell is the Colab setup cell built
from it; ``python -m nbutils notebooks --fix`` rewrites both after the setting changes, and
``tests/test_notebooks_meta.py`` fails while any notebook is out of sync.
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path

from .config import project_root
from .exercises import EXERCISE_KEY, EXERCISES

COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
SETUP_MARKER = "# Setup: on Colab"
CONFIG_MARKER = "nbutils.get_config("


def repository_url(pyproject: Path | None = None) -> str:
    """``[tool.nbutils] repository`` from pyproject.toml, e.g. ``https://github.com/OWNER/NAME``."""
    path = pyproject or project_root() / "pyproject.toml"
    text = path.read_text(encoding="utf-8")
    try:
        url = tomllib.loads(text)["tool"]["nbutils"]["repository"]
    except KeyError:
        raise KeyError(f"[tool.nbutils] repository is not set in {path}") from None
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url):
        raise ValueError(f"[tool.nbutils] repository must be https://github.com/OWNER/NAME, got {url!r}")
    return url


def colab_url(notebook: str, repo: str | None = None, branch: str = "main") -> str:
    repo = repo or repository_url()
    slug = repo.removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{slug}/blob/{branch}/notebooks/{notebook}"


def badge_markdown(notebook: str, repo: str | None = None) -> str:
    return f"[![Open In Colab]({COLAB_BADGE})]({colab_url(notebook, repo)})"


def setup_cell_source(repo: str | None = None) -> str:
    repo = repo or repository_url()
    name = repo.rstrip("/").rsplit("/", 1)[-1]
    return f'''{SETUP_MARKER}, fetch the repository and install nbutils; elsewhere this does nothing.
import sys

if "google.colab" in sys.modules:  # safe to run again: one clone, at an absolute path
    import os
    import subprocess

    REPO = "{repo}"
    ROOT = "/content/{name}"
    if not os.path.isdir(ROOT):
        subprocess.run(["git", "clone", "--depth", "1", REPO, ROOT], check=True)
    os.chdir(f"{{ROOT}}/notebooks")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"{{ROOT}}[notebooks]"], check=True)
    sys.path.insert(0, ROOT)'''


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def notebook_problems(path: Path, repo: str | None = None) -> list[str]:
    """What is wrong with a notebook's first cells (empty list = in sync)."""
    repo = repo or repository_url()
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    cells = nb.get("cells", [])
    problems = []
    if not cells or cells[0].get("cell_type") != "markdown" or badge_markdown(path.name, repo) not in _source(cells[0]):
        problems.append(f"{path.name}: first cell lacks the badge {badge_markdown(path.name, repo)}")
    if len(cells) < 2 or _source(cells[1]).strip() != setup_cell_source(repo).strip():
        problems.append(f"{path.name}: second cell is not the current Colab setup cell")
    if not any(c.get("cell_type") == "code" and CONFIG_MARKER in _source(c) for c in cells[2:5]):
        problems.append(f"{path.name}: no config cell (calling {CONFIG_MARKER}…) among cells 3-5")
    return problems


def fix_notebook(path: Path, repo: str | None = None) -> bool:
    """Rewrite the badge line and the setup cell in place. Returns True when the file changed."""
    repo = repo or repository_url()
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    nb = json.loads(text)
    cells = nb["cells"]
    first = _source(cells[0])
    badge = badge_markdown(path.name, repo)
    pattern = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)")
    first = pattern.sub(badge, first) if pattern.search(first) else badge + "\n\n" + first
    cells[0]["source"] = first.splitlines(keepends=True)
    setup = setup_cell_source(repo).splitlines(keepends=True)
    if len(cells) > 1 and SETUP_MARKER in _source(cells[1]):
        cells[1]["source"] = setup
    else:
        cell = {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": setup}
        if (nb.get("nbformat"), nb.get("nbformat_minor", 0)) >= (4, 5):
            cell["id"] = "colab-setup"  # cell ids are required from nbformat 4.5 on
        cells.insert(1, cell)
    new = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    if new != text:
        path.write_text(new, encoding="utf-8")
        return True
    return False


def notebook_paths() -> list[Path]:
    return sorted((project_root() / "notebooks").glob("[0-9][0-9]_*.ipynb"))


# --------------------------------------------------------------------------------------------
# Exercises (the course kit): the cells at the end of notebooks 01–06, and their solution copies
# --------------------------------------------------------------------------------------------

EXERCISES_HEADING = "## Exercises"


def _cell(kind: str, source: str, cell_id: str, metadata: dict | None = None) -> dict:
    cell = {"cell_type": kind, "id": cell_id, "metadata": metadata or {}, "source": source.splitlines(keepends=True)}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def exercise_cells(notebook: str) -> list[dict]:
    """The "Exercises" section of notebook ``notebook`` ("01" … "06"): a heading and imports, then per
    exercise its goal (markdown), the stub (code, tagged with its key) and the check call (code)."""
    chosen = [ex for ex in EXERCISES.values() if ex.notebook == notebook]
    if not chosen:
        raise ValueError(f"no exercises for notebook {notebook!r}")
    intro = (f"{EXERCISES_HEADING}\n\nFill in each function where it says `# YOUR CODE HERE` and run the cell below "
             "it. The check runs your function on stored test inputs (edge cases included) and says which input "
             "went wrong, what it expected and what it got, and — when your answer matches a common mistake — "
             "which one; from the second failed try it also gives the formula (`exercises.hint(\"name\")` gives it "
             "at once). Write the code with plain tensor operations: a function that calls the library's own "
             "version, or the PyTorch function that does the whole job, does not pass.")
    imports = ["import math  # noqa: F401 (for your code)", "import numpy as np  # noqa: F401",
               "import torch  # noqa: F401", "", "from nbutils import exercises"]
    cells = [_cell("markdown", intro, f"exercises-{notebook}"),
             _cell("code", "\n".join(imports), f"exercises-imports-{notebook}")]
    for ex in chosen:
        cells.append(_cell("markdown", f"### Exercise {ex.number}: {ex.title}\n\n{ex.goal}", f"goal-{ex.key}"))
        cells.append(_cell("code", ex.stub.rstrip("\n"), f"exercise-{ex.key}", {EXERCISE_KEY: ex.key}))
        cells.append(_cell("code", f'exercises.check("{ex.key}", {ex.key});', f"check-{ex.key}"))
    return cells


def add_exercises(path: Path, replace: bool = False) -> bool:
    """Append the Exercises section (the notebook's last section) to a notebook; ``replace=True`` rebuilds an
    existing one from :data:`nbutils.exercises.EXERCISES` (outputs cleared). Returns True when the file changed."""
    path = Path(path)
    nb = json.loads(path.read_text(encoding="utf-8"))
    start = next((i for i, c in enumerate(nb["cells"])
                  if c["cell_type"] == "markdown" and _source(c).startswith(EXERCISES_HEADING)), None)
    if start is not None and not replace:
        return False
    nb["cells"] = nb["cells"][:start] + exercise_cells(path.name[:2])
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return True


def solution_notebook(nb: dict, solutions: dict[str, str]) -> dict:
    """A copy of notebook ``nb`` with every exercise stub replaced by its cell from ``solutions`` (the answer
    key: ``{exercise key: solved cell source}``, kept outside the package), outputs cleared."""
    out = copy.deepcopy(nb)
    for cell in out["cells"]:
        key = cell.get("metadata", {}).get(EXERCISE_KEY)
        if key is not None:
            cell["source"] = solutions[key].rstrip("\n").splitlines(keepends=True)
            cell["outputs"], cell["execution_count"] = [], None
    return out
