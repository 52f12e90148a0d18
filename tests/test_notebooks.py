"""Runs every notebook in notebooks/ top to bottom; any error fails the test.

Needs the notebooks extra (``pip install -e ".[test,notebooks]"``); without it the whole
module is skipped, so the default test run (``.[test]`` only) skips it. The kernel is
this interpreter (``sys.executable``), whatever kernels are registered elsewhere.
"""

import json
import pathlib
import sys
import time

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
KERNEL_NAME = "recjax-notebook-tests"

pytestmark = [
    pytest.mark.slow,
    # Older jupyter_core releases warn about their own path migration; not ours to fix.
    pytest.mark.filterwarnings("ignore:Jupyter is migrating its paths:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    """A kernel spec that starts this interpreter, found first on JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "recjax notebook tests",
        "language": "python",
        "env": {"MPLBACKEND": "module://matplotlib_inline.backend_inline"},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(root))
        yield KERNEL_NAME


def test_notebooks_found():
    names = [p.name for p in NOTEBOOKS]
    assert names == [
        "01_quickstart.ipynb",
        "02_tree_lstm_sentiment.ipynb",
        "03_code_trees.ipynb",
        "04_performance.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name}: commit notebooks with outputs cleared"
            )
    first = nb.cells[0]
    assert first.cell_type == "markdown" and (
        f"https://colab.research.google.com/github/recjax/recjax/blob/main/notebooks/{path.name}"
        in first.source
    )
    install = next(c for c in nb.cells if c.cell_type == "code")
    assert 'if "google.colab" in sys.modules:' in install.source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_name):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    print(f"{path.name}: {seconds:.1f} s")
