"""notebooks/evaluate.ipynb and notebooks/compare.ipynb run end to end on the tiny synthetic set
(``tiny_eval_set``)."""
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "evaluate.ipynb"
COMPARE = REPO / "notebooks" / "compare.ipynb"


def _kernel_python() -> str:
    """The interpreter that kernel ``python3`` starts. jupyter_client replaces an argv[0] of
    ``python`` / ``python3`` by the current interpreter (``sys.executable``), as in ipykernel's
    own kernelspec; anything else must be this interpreter too, or the project would not import."""
    from jupyter_client.kernelspec import KernelSpecManager

    argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
    if argv0 in {"python", f"python{sys.version_info[0]}", "python%i.%i" % sys.version_info[:2]}:
        return sys.executable
    return argv0


def _run(path: Path) -> list:
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs


def _images(outputs) -> list:
    return [o for o in outputs if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]


def _text(outputs) -> str:
    parts = [o.get("text", "") for o in outputs if o.output_type == "stream"]
    parts += [o.data.get("text/markdown", "") + o.data.get("text/plain", "") + o.data.get("text/html", "")
              for o in outputs if o.output_type in ("display_data", "execute_result")]
    return "".join(parts)


@pytest.mark.parametrize("path", [NOTEBOOK, COMPARE], ids=["evaluate", "compare"])
def test_notebook_is_saved_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.cells[0].cell_type == "markdown" and "synthetic" in nb.cells[0].source.lower()
    assert "not clinical performance" in nb.cells[0].source
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_kernel_is_this_python():
    python = _kernel_python()
    assert os.path.exists(python) and os.path.samefile(python, sys.executable), (
        f"kernel 'python3' runs {python}, not {sys.executable}; "
        f"register this one with `{sys.executable} -m ipykernel install --sys-prefix`")


def test_notebook_runs_on_tiny_set(tiny_eval_set, monkeypatch):
    s = tiny_eval_set
    monkeypatch.setenv("VCF_PREDICTIONS", s["predictions"])
    monkeypatch.setenv("VCF_MANIFEST", s["manifest"])
    monkeypatch.setenv("VCF_VERTEBRAE", s["vertebrae"])
    monkeypatch.setenv("VCF_INFER_DIR", s["infer_dir"])
    monkeypatch.setenv("VCF_N_BOOT", "100")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # an Agg backend would swallow the figures
    outputs = _run(NOTEBOOK)
    assert len(_images(outputs)) >= 5  # ROC/PR, by grade, by level, confusions, reliability, galleries
    text = _text(outputs)
    assert s["predictions"] in text  # the parameters came from the environment
    assert "100 resamples" in text and "high_specificity" in text and "ECE" in text
    assert "2 image(s) with an unknown fracture label" in text


def test_compare_notebook_runs_on_tiny_set(tiny_eval_set, monkeypatch, tmp_path):
    import pandas as pd

    s = tiny_eval_set
    pred = pd.read_csv(s["predictions"])
    pred["p_fracture"] = (1 - pred["p_fracture"]).where(pred["name"] == "img_07", pred["p_fracture"])  # perturbed copy
    other = tmp_path / "predictions_b.csv"
    pred.to_csv(other, index=False)
    monkeypatch.setenv("VCF_PREDICTIONS_A", s["predictions"])
    monkeypatch.setenv("VCF_PREDICTIONS_B", str(other))
    monkeypatch.setenv("VCF_MANIFEST", s["manifest"])
    monkeypatch.setenv("VCF_LABEL_A", "model-alpha")
    monkeypatch.setenv("VCF_LABEL_B", "model-beta")
    monkeypatch.setenv("VCF_N_BOOT", "100")
    monkeypatch.delenv("MPLBACKEND", raising=False)
    outputs = _run(COMPARE)
    assert len(_images(outputs)) >= 2  # ROC curves, scatter
    text = _text(outputs)
    assert s["predictions"] in text and str(other) in text
    assert "model-alpha" in text and "model-beta" in text
    assert "DeLong" in text and "paired patient bootstrap" in text
    assert "unknown fracture label and are left out" in text
