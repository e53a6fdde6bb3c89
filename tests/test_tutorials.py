"""The tutorial notebooks run from top to bottom, and are kept without outputs.

The notebooks run with `SBI_FM_TUTORIAL_QUICK=1`, which shrinks their budgets to a
smoke test, in a kernel whose working directory is the test's temporary directory, so
that sbi's `sbi-logs/` lands there.
"""

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))
KERNEL = "python3"
CELL_TIMEOUT_S = 600


def _notebooks() -> list[Path]:
    # Notebooks git would commit: tracked ones and new ones it does not ignore.
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "*.ipynb"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return TUTORIALS
    return sorted({ROOT / name for name in listed if (ROOT / name).is_file()})


def _id(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_tutorials_are_found():
    assert TUTORIALS, f"No notebooks in {ROOT / 'tutorials'}."


def test_kernel_runs_this_interpreter():
    # The notebooks import this package, so the kernel must be this environment's.
    client = NotebookClient(nbformat.v4.new_notebook(), kernel_name=KERNEL)
    command = client.create_kernel_manager().format_kernel_cmd()

    assert Path(command[0]).absolute() == Path(sys.executable).absolute(), (
        f"The {KERNEL!r} kernel starts {command[0]}, not {sys.executable}; install "
        "ipykernel into this environment and remove the other kernel spec."
    )


@pytest.mark.parametrize("path", TUTORIALS, ids=_id)
def test_tutorial_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("SBI_FM_TUTORIAL_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(path, as_version=4)

    client = NotebookClient(
        notebook,
        kernel_name=KERNEL,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()


@pytest.mark.parametrize("path", _notebooks(), ids=_id)
def test_notebook_has_no_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    run = [
        index
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count)
    ]

    assert not run, (
        f"Cells {run} of {_id(path)} have outputs or execution counts; clear them "
        "(in Jupyter: Edit > Clear Outputs of All Cells) before committing."
    )
