"""The direction of imports (README, "Layout"): the command line may import everything;
flows and dashboards import models, connectors and the engine; models and connectors import
the engine; the engine imports none of them (a stage that needs a model takes it as an
argument). Read from the source, imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "flows", "dashboards", "models", "connectors", "dataengine")
# What each package must not import.
FORBIDDEN = {
    "dataengine": {"models", "connectors", "flows", "dashboards", "cli"},
    "models": {"connectors", "flows", "dashboards", "cli"},
    "connectors": {"models", "flows", "dashboards", "cli"},
    "flows": {"dashboards", "cli"},
    "dashboards": {"flows", "cli"},
}


def imported_packages(path: Path) -> set[tuple[int, str]]:
    """(line, top-level package) of every absolute import in a file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {(node.lineno, a.name.split(".")[0]) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add((node.lineno, node.module.split(".")[0]))
    return out


def test_the_finder_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef g():\n    from models.clip import load_clip\n    import flows.loop as x\n"
                 "from . import y\n")
    assert imported_packages(f) == {(1, "os"), (4, "models"), (5, "flows")}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_a_layer_above_it(package):
    bad = [f"{p.relative_to(ROOT)}:{line} imports {mod}"
           for p in sorted((ROOT / package).rglob("*.py"))
           for line, mod in sorted(imported_packages(p)) if mod in FORBIDDEN[package]]
    assert not bad, "\n".join(bad)
