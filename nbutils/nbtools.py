"""Keeping the notebooks in shape: Open-in-Colab badge, Colab setup cell, config cell.

The repository address is one setting, ``[tool.nbutils] repository`` in ``pyproject.toml``. Every
notebook's first cell carries a badge built from it and its second cell is the Colab setup cell built
from it; ``python -m nbutils notebooks --fix`` rewrites both after the setting changes, and
``tests/test_notebooks_meta.py`` fails while any notebook is out of sync.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from .config import project_root

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

if "google.colab" in sys.modules:
    import os
    import subprocess

    REPO = "{repo}"
    if not os.path.isdir("{name}"):
        subprocess.run(["git", "clone", "--depth", "1", REPO], check=True)
    os.chdir("{name}/notebooks")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", ".."], check=True)
    sys.path.insert(0, os.path.abspath(".."))'''


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
