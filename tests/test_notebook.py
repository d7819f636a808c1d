"""demo.ipynb runs top to bottom (in a real kernel) on a tiny trained-model directory, and is saved with the outputs
of a real run."""

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


def test_notebook_is_committed_with_the_outputs_of_a_real_run():
    """People browsing the repository see what it does: the notebook is saved as run on the default job's model
    (`outputs/default`), every code cell executed in order, with its pictures and the retrieval table."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    outputs = [output for cell in code for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert sum("image/png" in output.get("data", {}) for output in outputs) >= 5
    markdown = "".join(output.get("data", {}).get("text/markdown", "") for output in outputs)
    assert "| outputs/default |" in markdown and "RSUM" in markdown
    first = code[0].source
    assert 'MODEL_DIR = os.environ.get("DEMO_MODEL_DIR", "outputs/default")' in first
    assert 'DATASET = os.environ.get("DEMO_DATASET", "synthetic")' in first
    assert "AutoModel.from_pretrained(MODEL_DIR, trust_remote_code=True)" in code[1].source
    assert "dualencoder.apps" in code[-1].source  # it ends by searching a folder of photos


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
    assert "4 new, 0 changed" in text  # the split's 4 images stood in for a photo folder, indexed and searched
