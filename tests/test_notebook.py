"""demo.ipynb runs top to bottom (in a real kernel) on a tiny trained-model directory, and is kept clean."""

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "demo.ipynb"


@pytest.fixture(scope="module")
def python3_kernel():
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user"], check=True, capture_output=True)
    return "python3"


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    first = code[0].source
    assert 'MODEL_DIR = os.environ.get("DEMO_MODEL_DIR", "outputs/default")' in first
    assert 'DATASET = os.environ.get("DEMO_DATASET", "synthetic")' in first


def test_notebook_runs_on_a_tiny_model(python3_kernel, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    from tests.test_evaluation import make_tiny_model_dir

    model_dir = make_tiny_model_dir(tmp_path / "run")
    # The kernel inherits these: the tiny model, 40 generated 32x32 scenes (a 4-image test split).
    for name, value in {"DEMO_MODEL_DIR": str(model_dir), "DEMO_DATASET": "synthetic", "DEMO_NUM_IMAGES": "40",
                        "DEMO_IMAGE_SIZE": "32", "DUALENCODER_CACHE": str(tmp_path / "cache"),
                        "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}.items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name=python3_kernel,
                   resources={"metadata": {"path": str(REPO)}}).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    pictures = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(pictures) >= 5  # two searches, the caption ranking, t-SNE, training curves
    text = "".join(output.get("text", "") for output in outputs)
    assert "4 images, 20 captions" in text and "gap" in text
