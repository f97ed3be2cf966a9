"""The notebooks in notebooks/ execute without error on the venv's Python (nbclient), each within
two minutes, and print what they promise: a trained model whose accumulators hold, an exported
QONNX file that matches the Brevitas model, and a FINN build (or a plain statement that FINN is
not available here). Notebooks are committed without outputs; this test executes them."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from finn_flow import finn_available

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "brevitas-a2q-test"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    """A kernel spec that runs this interpreter (the venv's python), found through JUPYTER_PATH,
    so the notebooks never run on some other python3 kernel installed on the machine."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "brevitas-a2q tests", "language": "python"}))
    return root


def execute(name: str, kernel_dir: Path, tmp_path: Path, monkeypatch) -> str:
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        f"{name} is committed with outputs; clear them"
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=120, allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text.append(out.get("text", "") or out.get("data", {}).get("text/plain", ""))
    return "\n".join(text)


def number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in the notebook output:\n{text[-3000:]}"
    return float(match.group(1))


def test_quickstart(kernel_dir, tmp_path, monkeypatch):
    out = execute("quickstart.ipynb", kernel_dir, tmp_path, monkeypatch)
    assert number(r"test accuracy: ([\d.]+)", out) > 0.6
    assert "all targets hold: True" in out
    assert "every checked target holds" in out  # the report of the exported QONNX file
    assert number(r"max \|onnx - brevitas\|: ([\d.e+-]+)", out) < 1e-4
    assert number(r"overflow events: (\d+)", out) == 0


def test_finn_flow(kernel_dir, tmp_path, monkeypatch):
    out = execute("finn_flow.ipynb", kernel_dir, tmp_path, monkeypatch)
    ok, reason = finn_available()
    assert f"FINN available: {ok}" in out
    assert number(r"test accuracy: ([\d.]+)", out) > 0.6
    assert "every checked target holds" in out
    if ok:
        assert "FINN layers: 2; Targets checked: 2 of 2 layers; every checked width is within " \
            "its target." in out
    else:
        assert "FINN build SKIPPED" in out and reason.splitlines()[0] in out
