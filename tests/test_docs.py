"""Docs that stay true: docs/design.md's code map against the tree and against the import floors
(tests/test_layout.py), docs/settings.md's table against the settings table, and pyproject.toml against what
ktjax/ imports. All are read from files; nothing here starts JAX."""
from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_layout import FLOORS

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"


def code_map_section() -> str:
    text = DESIGN.read_text(encoding="utf-8")
    return text.split("\n## 9. Code map\n", 1)[1].split("\n## ", 1)[0]


def code_map_paths(section: str) -> list[str]:
    """The paths the map's code block lists: `ktjax/...` at the margin, and names indented under a folder."""
    block = section.split("```\n", 1)[1].split("```", 1)[0]
    paths, folder = [], None
    for line in block.splitlines():
        if line.startswith("ktjax/"):
            path = line.split()[0]
            folder = path if path.endswith("/") else None
            paths.append(path)
        elif line.startswith("  ") and not line.startswith("   "):
            assert folder, f"an indented entry with no folder above it: {line!r}"
            paths.append(folder + line.split()[0])
    return paths


def tree_entries() -> set[str]:
    """What the map must list: every module, each package as its folder (its __init__.py is the folder's line,
    except ktjax/__init__.py, the public face)."""
    entries = {"ktjax/__init__.py"}
    for path in (ROOT / "ktjax").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if "__pycache__" in rel:
            continue
        entries.add(rel.rsplit("/", 1)[0] + "/" if path.name == "__init__.py" and rel != "ktjax/__init__.py"
                    else rel)
    return entries


def test_code_map_lists_every_module_and_nothing_missing():
    listed = code_map_paths(code_map_section())
    assert len(listed) == len(set(listed)), sorted(p for p in listed if listed.count(p) > 1)
    unlisted = sorted(tree_entries() - set(listed))
    assert not unlisted, f"add these to docs/design.md's code map, one line saying each one's job: {unlisted}"
    missing = sorted(p for p in listed if not (ROOT / p).exists())
    assert not missing, f"docs/design.md's code map lists paths that do not exist: {missing}"


def test_code_map_parser_reads_folders_and_margin_entries():
    """The check is only as good as the parser: indented names join the folder above, a file resets it."""
    section = ("x\n```\nktjax/a/          pkg\n  b.py            job\n  c/d.cc          job\n"
               "ktjax/e.py        job\n```\n")
    assert code_map_paths(section) == ["ktjax/a/", "ktjax/a/b.py", "ktjax/a/c/d.cc", "ktjax/e.py"]


def test_code_map_floors_are_test_layouts():
    floors = []
    for line in code_map_section().splitlines():
        m = re.match(r"(\d+)\. (.*?): ", line)
        if m:
            assert int(m.group(1)) == len(floors), line
            floors.append(tuple(re.findall(r"`([\w.]+)`", m.group(2))))
    assert tuple(floors) == FLOORS


def test_settings_doc_table_is_generated_from_the_settings_table():
    spec = importlib.util.spec_from_file_location("settings_table", ROOT / "docs" / "settings_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    text = Path(table.SETTINGS_DOC).read_text(encoding="utf-8")
    assert table.replaced(text, table.render()) == text, "run python docs/settings_table.py"


# Import name -> distribution name, where they differ.
DISTRIBUTION = {"yaml": "pyyaml"}
# Modules whose imports belong to an extra rather than the core dependencies.
EXTRA_OF = {"ktjax/serve/": "serve", "ktjax/cli/serve.py": "serve", "ktjax/demo/train.py": "train"}


def third_party_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in ("ktjax", "__future__")}


def requirement_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_every_third_party_import_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = {requirement_name(r) for r in project["dependencies"]}
    extras = {k: {requirement_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    undeclared = []
    for path in sorted((ROOT / "ktjax").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        extra = next((e for prefix, e in EXTRA_OF.items() if rel.startswith(prefix)), None)
        allowed = core | extras.get(extra, set())
        for module in sorted(third_party_imports(path)):
            dist = DISTRIBUTION.get(module, module).lower().replace("_", "-")
            if dist not in allowed:
                undeclared.append(f"{rel} imports {module}: declare {dist} in pyproject.toml "
                                  f"({'the ' + extra + ' extra' if extra else 'dependencies'})")
            elif extra and dist not in core and dist not in extras["test"]:
                undeclared.append(f"{rel} imports {module}: the tests run it, so the test extra needs {dist}")
    assert not undeclared, "\n".join(undeclared)


def test_train_without_optax_names_the_extra():
    """optax is only the train extra's: without it, one message naming the extra and exit 2, no traceback."""
    hide_optax = ("import runpy, sys; sys.modules['optax'] = None; sys.argv = ['ktjax.train', '--out', 'unused']; "
                  "runpy.run_module('ktjax.train', run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", hide_optax], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "optax" in run.stderr and ".[train]" in run.stderr
    assert not os.path.exists(ROOT / "unused")
