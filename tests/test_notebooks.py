"""Both notebooks run top to bottom (small sizes; a cell that raises fails the run), print what their cells
are there to show, and draw every plot they show."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")


def _run(name, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    from ktjax.demo import DEMO_MODEL_DIR

    if not os.path.isfile(os.path.join(DEMO_MODEL_DIR, "config.json")):
        pytest.skip("the trained demo model is not in this checkout")
    monkeypatch.setenv("KTJAX_NOTEBOOK_SMALL", "1")
    # The kernel imports the ktjax of this checkout, not whichever one pip installed (the kernel starts in
    # notebooks/, where `import ktjax` would find the installed package).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}).execute()
    return [c for c in nb.cells if c.cell_type == "code"]


def _printed(cells, source_part: str) -> str:
    """What the one cell whose source holds `source_part` printed."""
    [cell] = [c for c in cells if source_part in c.source]
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def _assert_plots_drawn(cells):
    """A cell that shows a figure has an image among its outputs (a backend switched to Agg shows nothing)."""
    showing = [c for c in cells if "plt.show()" in c.source or "display(Image(" in c.source]
    assert showing
    for cell in showing:
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source.splitlines()[0]


def test_quickstart(monkeypatch):
    cells = _run("quickstart.ipynb", monkeypatch)
    generated = _printed(cells, "out = engine.generate(")
    assert generated.startswith("The for statement in Python") and len(generated) > 40
    assert "decode_tokens_per_s" in _printed(cells, "out.stats.items()")
    drift = re.search(r"max \|converted - original\| = (\S+)", _printed(cells, "convert(["))
    assert drift and float(drift.group(1)) <= 1e-4


def test_long_context(monkeypatch):
    cells = _run("long_context.ipynb", monkeypatch)
    sizes = _printed(cells, "bytes/token (all layers)")
    assert "DeepSeek-V3 {" in sizes and "DeepSeek-V2-Lite {" in sizes
    retrieval = _printed(cells, "ev.main(argv)")
    assert all(f"| {fmt} |" in retrieval for fmt in ("bf16", "int8", "int4"))
    speeds = _printed(cells, "contexts = ")
    assert re.search(r"context 64: prefill \d+ tok/s, decode [\d.]+ tok/s", speeds)
    _assert_plots_drawn(cells)
