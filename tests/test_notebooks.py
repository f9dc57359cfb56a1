"""Every notebook in ``notebooks/`` runs top to bottom, and is committed without outputs.

A notebook runs in a temporary working directory (a copy of it; what it writes stays there)
with ``FEDSIM_NOTEBOOK_SMALL=1``, which notebooks read to pick their small CI setting. The
kernel is this interpreter: a ``python3`` kernel spec pointing at ``sys.executable`` is
installed into a temporary directory put first on ``JUPYTER_PATH``, so a user-level
``python3`` spec of another Python cannot shadow it.

Committed notebooks carry no outputs; to strip them: Jupyter's "Clear All Outputs", or
``jupyter nbconvert --clear-output --inplace notebooks/NAME.ipynb``.
"""

import shutil
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
ipykernel_kernelspec = pytest.importorskip("ipykernel.kernelspec")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 600  # per cell


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory):
    """A JUPYTER_PATH entry whose ``python3`` kernel runs this interpreter."""
    prefix = tmp_path_factory.mktemp("jupyter")
    ipykernel_kernelspec.install(kernel_name="python3", prefix=str(prefix))
    path = prefix / "share" / "jupyter"
    spec = (path / "kernels" / "python3" / "kernel.json").read_text(encoding="utf-8")
    assert sys.executable.replace("\\", "\\\\") in spec
    return path


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks in {ROOT / 'notebooks'}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} have outputs or execution counts; "
                       "commit notebooks without outputs (Clear All Outputs)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch, kernel_path):
    monkeypatch.setenv("FEDSIM_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_path))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # Tiny models gain nothing from intra-op threads, and on a busy CI machine spinning
    # OpenMP threads made the small setting ~6x slower (10 s vs 64 s for its real sweep).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    work = tmp_path / "work"
    work.mkdir()
    copy = work / path.name
    shutil.copy(path, copy)
    nb = nbformat.read(copy, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(work)}})
    started = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell failed:\n{e}", pytrace=False)
    print(f"{path.name}: {time.perf_counter() - started:.1f} s")
