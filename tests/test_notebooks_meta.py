"""Every notebook carries the Colab badge, the Colab setup cell and a config cell (in sync with
``[tool.nbutils] repository`` in pyproject.toml); and it was committed with outputs."""

import json

import pytest

from nbutils import nbtools

NOTEBOOKS = nbtools.notebook_paths()


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found in notebooks/"
    assert NOTEBOOKS[0].name == "00_fashion_mnist.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_badge_setup_and_config_cells(path):
    assert nbtools.notebook_problems(path) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_with_outputs_from_a_real_run(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    executed = [c for c in code[1:] if c.get("execution_count")]  # the Colab cell prints nothing
    assert len(executed) == len(code) - 1, "every code cell after the setup cell must have been run"
    counts = [c["execution_count"] for c in code if c.get("execution_count")]
    assert counts == sorted(counts), "cells were run out of order"
    assert any(c.get("outputs") for c in code), "no outputs committed"


def test_badge_follows_the_repository_setting(tmp_path):
    repo = "https://github.com/someone/fork"
    src = NOTEBOOKS[0]
    copy = tmp_path / src.name
    copy.write_text(src.read_text())
    assert nbtools.notebook_problems(copy, repo)  # out of sync with the fork's address
    assert nbtools.fix_notebook(copy, repo) is True
    assert nbtools.notebook_problems(copy, repo) == []
    url = "colab.research.google.com/github/someone/fork/blob/main/notebooks/00_fashion_mnist.ipynb"
    assert url in copy.read_text()
    assert nbtools.fix_notebook(copy, repo) is False  # idempotent


def test_repository_setting_is_validated(tmp_path):
    bad = tmp_path / "pyproject.toml"
    bad.write_text('[tool.nbutils]\nrepository = "gitlab.com/x"\n')
    with pytest.raises(ValueError, match="https://github.com/OWNER/NAME"):
        nbtools.repository_url(bad)
