"""The notebooks in ``notebooks/`` run top to bottom in a fresh kernel of this interpreter, show their plots,
write nothing outside temporary directories, and are committed without outputs.

Each notebook runs in its own kernel process, started from a kernelspec written for this test (so the kernel
is this interpreter, whatever kernelspecs the machine has installed), in an empty working directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["01_ptq_walkthrough.ipynb", "02_qat_lightning.ipynb", "03_sparsity_and_shrink.ipynb",
            "04_collaborative.ipynb", "05_transformers_kv_cache.ipynb"]
KERNEL = "amct-torch-notebook-tests"
CELL_TIMEOUT_S = 1800  # generous: on a fresh install the first use of a reference model pretrains it


@pytest.fixture
def kernel_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernelspec that starts ``sys.executable``, found first through ``JUPYTER_PATH``."""
    from ipykernel.kernelspec import write_kernel_spec

    root = tmp_path / "jupyter"
    (root / "kernels").mkdir(parents=True)
    write_kernel_spec(root / "kernels" / KERNEL, overrides={
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "amct-torch (tests)"})
    monkeypatch.setenv("JUPYTER_PATH", str(root))
    return KERNEL


def _outputs(nb) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


def test_the_issue_notebooks_are_all_there():
    missing = [name for name in EXPECTED if not (NOTEBOOK_DIR / name).is_file()]
    assert not missing, f"notebooks missing from {NOTEBOOK_DIR}: {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_has_no_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} have saved outputs or execution counts; clear them "
                       "(jupyter nbconvert --clear-output --inplace) before committing")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom_and_plots(path: Path, kernel_name: str, tmp_path: Path):
    nb = nbformat.read(path, as_version=4)
    code_cells = sum(cell.cell_type == "code" for cell in nb.cells)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))  # which interpreter ran it
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=kernel_name,
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute()  # raises CellExecutionError, with the cell and the traceback, if any cell fails

    errors = [out for out in _outputs(nb) if out.output_type == "error"]
    assert not errors, f"{path.name}: {[(e.ename, e.evalue) for e in errors]}"
    executed = [cell for cell in nb.cells[:-1] if cell.cell_type == "code" and cell.execution_count is not None]
    assert len(executed) == code_cells, f"{path.name}: {len(executed)} of {code_cells} code cells ran"
    images = [out for out in _outputs(nb) if out.output_type in ("display_data", "execute_result")
              and "image/png" in out.get("data", {})]
    assert images, f"{path.name}: no cell produced a plot (image/png output)"
    interpreter = "".join(out.text for out in nb.cells[-1].outputs if out.output_type == "stream").strip()
    assert Path(interpreter) == Path(sys.executable), f"{path.name} ran in {interpreter}, not {sys.executable}"
    written = sorted(p.name for p in workdir.iterdir())
    assert not written, f"{path.name} wrote {written} into its working directory; write to a tempfile directory"
