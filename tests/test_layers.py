"""The package's structure: layered imports (import-linter contract in pyproject.toml), imports at the top of
each module, and no module that outgrew one reading."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nbutils"

#: Imports allowed inside functions: optional or slow-to-import dependencies that most commands never need.
DEFERRABLE = {"torchvision.datasets", "torchvision.datasets.utils",
              "accelerate", "accelerate.tracking", "IPython", "IPython.display", "ipywidgets", "matplotlib.pyplot",
              "pandas", "seaborn", "diffusers", "huggingface_hub"}


def test_layers_contract_holds():
    """``lint-imports`` checks the layers listed in pyproject.toml against every import of the package."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    result = subprocess.run([exe], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stdout[-3000:]


def test_package_modules_import_at_the_top():
    """Nothing of the package itself, and no core dependency, is imported inside a function."""
    deferred = []
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        # module level, including a top-level try (``__main__`` turns Ctrl-C during imports into one line)
        top = {id(node) for node in tree.body}
        top |= {id(n) for node in tree.body if isinstance(node, ast.Try) for n in node.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in top:
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                if isinstance(node, ast.ImportFrom) and node.level or any(n not in DEFERRABLE for n in names):
                    deferred.append(f"{path.name}:{node.lineno} {'.' * getattr(node, 'level', 0)}{names[0]}")
    assert not deferred, deferred


def test_no_module_outgrows_one_reading():
    """About 400 lines at most, unless the module says at its top why it is longer."""
    long = []
    for path in sorted(PACKAGE.glob("*.py")):
        text = path.read_text()
        if text.count("\n") > 420 and "Longer than" not in (ast.get_docstring(ast.parse(text)) or ""):
            long.append(f"{path.name}: {text.count(chr(10))} lines")
    assert not long, long
