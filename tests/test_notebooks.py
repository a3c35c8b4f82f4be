"""Both notebooks run top to bottom (small sizes) without errors."""
import os

import pytest

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")


@pytest.mark.parametrize("name", ["quickstart.ipynb", "long_context.ipynb"])
def test_notebook_runs(name, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    from ktjax.demo import DEMO_MODEL_DIR

    if not os.path.isfile(os.path.join(DEMO_MODEL_DIR, "config.json")):
        pytest.skip("the trained demo model is not in this checkout")
    monkeypatch.setenv("KTJAX_NOTEBOOK_SMALL", "1")
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
