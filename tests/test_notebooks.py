"""Both notebooks run top to bottom (small sizes; a cell that raises fails the run), print what their cells
are there to show, and draw every plot they show; the stored copies carry the outputs of a full run; no cell
imports from outside ktjax and its declared dependencies; the install cell installs the checkout it sits in, or
clones the repository where there is none (Colab), without the network here."""
import ast
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
NAMES = ["quickstart.ipynb", "long_context.ipynb"]
INSTALL_MARK = "def install_ktjax("
# What a cell may import besides the standard library: ktjax, its dependencies and the `notebooks` extra's.
IMPORTABLE = {"ktjax", "jax", "numpy", "matplotlib", "IPython"}


def _read(name):
    import nbformat

    return nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)


def _run(name, monkeypatch):
    from nbclient import NotebookClient

    from ktjax.demo import DEMO_MODEL_DIR

    if not os.path.isfile(os.path.join(DEMO_MODEL_DIR, "config.json")):
        pytest.skip("the trained demo model is not in this checkout")
    monkeypatch.setenv("KTJAX_NOTEBOOK_SMALL", "1")
    # The kernel imports the ktjax of this checkout, not whichever one pip installed (the kernel starts in
    # notebooks/, where `import ktjax` would find the installed package).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    nb = _read(name)
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
    retrieval = _printed(cells, "retrieval_hits(")
    for fmt in ("bf16", "int8", "int4"):
        row = re.search(rf"^\| {fmt} \| (.*) \|$", retrieval, re.M)
        # Chance is 1 in 90,000 a key: a format that retrieves none of its 8 has lost the context.
        assert row and max(map(int, row.group(1).split(" | "))) > 0, retrieval
    speeds = _printed(cells, "contexts = ")
    assert re.search(r"context 64: prefill \d+ tok/s, decode [\d.]+ tok/s", speeds)
    _assert_plots_drawn(cells)


@pytest.mark.parametrize("name", NAMES)
def test_stored_with_outputs(name):
    """A reader sees results before running anything: every code cell but the install (silent where ktjax is
    installed) ran, in order, in one session, without an error, and printed or drew something."""
    cells = [c for c in _read(name).cells if c.cell_type == "code"]
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1))
    for cell in cells:
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.source.splitlines()[0]
        assert cell.outputs or INSTALL_MARK in cell.source, cell.source.splitlines()[0]
    if name == "long_context.ipynb":
        _assert_plots_drawn(cells)


def _imported_roots(source: str) -> set[str]:
    tree = ast.parse(source)
    roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import from {node.module}"
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("name", NAMES)
def test_imports_only_ktjax_and_its_dependencies(name):
    for cell in (c for c in _read(name).cells if c.cell_type == "code"):
        assert "sys.path" not in cell.source and "PYTHONPATH" not in cell.source, cell.source.splitlines()[0]
        outside = _imported_roots(cell.source) - IMPORTABLE - set(sys.stdlib_module_names)
        assert not outside, (outside, cell.source.splitlines()[0])


def _install_cell(monkeypatch, tmp_path, *, gpu=False):
    """The install cell's install_ktjax, with subprocess.run recording its commands (no pip, git or network)."""
    import importlib.metadata
    import shutil
    import subprocess

    [source] = {c.source for name in NAMES for c in _read(name).cells if INSTALL_MARK in c.source}  # one copy
    commands = []

    def run(cmd, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 0 if gpu else 9)

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(shutil, "which", lambda exe: "/usr/bin/" + exe if gpu else None)
    monkeypatch.setattr(importlib.metadata, "packages_distributions", lambda: {})
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(source, namespace)  # defines install_ktjax (and calls it only where ktjax is not importable)
    commands.clear()
    return namespace["install_ktjax"], commands


def test_install_cell_installs_the_checkout_around_it(monkeypatch, tmp_path):
    (tmp_path / "ktjax").mkdir()
    (tmp_path / "ktjax" / "__init__.py").write_text("")
    (tmp_path / "notebooks").mkdir()
    install, commands = _install_cell(monkeypatch, tmp_path / "notebooks")
    install("")
    assert commands == [[sys.executable, "-m", "pip", "install", "-q", str(tmp_path)]]


def test_install_cell_clones_where_there_is_no_checkout(monkeypatch, tmp_path):
    install, commands = _install_cell(monkeypatch, tmp_path, gpu=True)
    with pytest.raises(RuntimeError, match="set KTJAX_GIT_URL"):
        install("")
    assert commands == []
    install("https://example.org/ktjax.git")
    clone = str(tmp_path / "ktjax-src")
    assert commands == [["git", "clone", "--depth", "1", "https://example.org/ktjax.git", clone],
                        ["nvidia-smi", "-L"],
                        [sys.executable, "-m", "pip", "install", "-q", clone + "[gpu]"]]


def test_install_cell_asks_for_a_restart_when_pip_replaces_an_imported_package(monkeypatch, tmp_path):
    import importlib.metadata
    import subprocess
    from types import SimpleNamespace

    import numpy  # noqa: F401  (imported by this session, as a kernel would have it)

    install, commands = _install_cell(monkeypatch, tmp_path)
    (tmp_path / "ktjax-src").mkdir()  # cloned by an earlier run of the cell
    installed = {"numpy": "2.0.0", "pyyaml-not-imported": "6.0"}

    def pip(cmd, **kwargs):
        commands.append(cmd)
        installed.update({"numpy": "2.1.0", "pyyaml-not-imported": "6.1"})
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", pip)
    monkeypatch.setattr(importlib.metadata, "packages_distributions",
                        lambda: {"numpy": ["numpy"], "not_imported_module": ["pyyaml-not-imported"]})
    monkeypatch.setattr(importlib.metadata, "distributions",
                        lambda: [SimpleNamespace(metadata={"Name": n}, version=v) for n, v in installed.items()])
    with pytest.raises(RuntimeError, match=r"pip replaced numpy, already imported by this session: restart"):
        install("https://example.org/ktjax.git")
    assert commands == [[sys.executable, "-m", "pip", "install", "-q", str(tmp_path / "ktjax-src")]]
    installed["numpy"] = "2.1.0"  # a run after the restart: nothing imported changes
    install("https://example.org/ktjax.git")
