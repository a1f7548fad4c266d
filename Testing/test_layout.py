"""Layout of DeepRegisterLib: the runtime library does not load the development tools.

``DeepRegisterLib.tools`` (the benchmark, its report and the offscreen slice views for screenshots and
tests) is not installed with the Slicer extension and must not be imported by what the extension or the
``deepregister`` command loads at start-up: the registration engine, the module's logic, the CLI at
import time and the Slicer module script. The CLI imports the tools only inside ``deepregister benchmark``.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "DeepRegister" / "DeepRegisterLib"
TOOLS = ("benchmark", "benchmark_report", "sliceviews")

# Imports the runtime modules in a fresh interpreter; prints the DeepRegisterLib.tools modules loaded and
# the environment variables added, removed or changed by the imports.
_PROBE = """
import importlib, json, os, sys
before = dict(os.environ)
for name in sys.argv[1:]:
    importlib.import_module(name)
after = dict(os.environ)
changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
tools = sorted(m for m in sys.modules if m == "DeepRegisterLib.tools" or m.startswith("DeepRegisterLib.tools."))
print("PROBE", json.dumps({"tools": tools, "changed": changed}))
"""


def probe(*modules: str, path: Path | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("VTK_DEFAULT_OPENGL_WINDOW", None)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), str(ROOT / "DeepRegister")])
    done = subprocess.run([sys.executable, "-c", _PROBE, *modules], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")][-1]
    return json.loads(line[len("PROBE "):])


def test_tools_are_a_subpackage_and_gone_from_the_runtime_folder() -> None:
    assert (LIB / "tools" / "__init__.py").is_file()
    for name in TOOLS:
        assert (LIB / "tools" / f"{name}.py").is_file()
        assert not (LIB / f"{name}.py").exists(), f"DeepRegisterLib/{name}.py is a tool: it lives in tools/"


def test_cli_and_logic_import_no_tool_and_change_no_environment() -> None:
    pytest.importorskip("vtk")  # logic needs VTK (Slicer's, or the slicer-core test dependency)
    result = probe("DeepRegisterLib.cli", "DeepRegisterLib.logic")
    assert result == {"tools": [], "changed": []}


def test_the_probe_sees_a_module_level_tool_import(tmp_path: Path) -> None:
    """A cli that imports the benchmark at module level fails the check above (run on a patched copy)."""
    copy = tmp_path / "DeepRegisterLib"
    copy.mkdir()
    for source in LIB.glob("*.py"):
        (copy / source.name).write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    (copy / "tools").symlink_to(LIB / "tools", target_is_directory=True)
    cli = (copy / "cli.py").read_text(encoding="utf-8")
    cli, count = re.subn(r"^(from \.options import .*)$", r"\1\nfrom .tools.benchmark import run",
                         cli, count=1, flags=re.MULTILINE)
    assert count == 1
    (copy / "cli.py").write_text(cli, encoding="utf-8")
    result = probe("DeepRegisterLib.cli", path=tmp_path)
    assert "DeepRegisterLib.tools.benchmark" in result["tools"]


def test_importing_the_slice_views_changes_no_environment() -> None:
    pytest.importorskip("slicer")
    assert probe("DeepRegisterLib.tools.sliceviews")["changed"] == []


def _module_level_imports(path: Path) -> set[str]:
    """Modules imported outside functions (relative ones as written, e.g. '.tools.benchmark')."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                names.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = "." * child.level + (child.module or "")
                names.add(base)
                names.update(f"{base.rstrip('.')}.{alias.name}" if child.module else base + alias.name
                             for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return names


def _names_a_tool(name: str) -> bool:
    parts = name.lstrip(".").split(".")
    if parts and parts[0] == "DeepRegisterLib":
        parts = parts[1:]
    return bool(parts) and (parts[0] == "tools" or parts[0] in TOOLS)


@pytest.mark.parametrize("path", [*sorted(LIB.glob("*.py")), ROOT / "DeepRegister" / "DeepRegister.py"],
                         ids=lambda p: p.name)
def test_no_runtime_module_imports_a_tool_at_module_level(path: Path) -> None:
    """What the Slicer extension installs (DeepRegister.py, DeepRegisterLib/*.py) loads no tool on import."""
    assert not [name for name in _module_level_imports(path) if _names_a_tool(name)]


def test_the_extension_installs_no_tool() -> None:
    """The scripted module's MODULE_PYTHON_SCRIPTS: the module script and a non-recursive glob of
    DeepRegisterLib/*.py, which leaves out DeepRegisterLib/tools/."""
    text = (ROOT / "DeepRegister" / "CMakeLists.txt").read_text(encoding="utf-8")
    pattern = r"file\((GLOB\w*)\s+DEEPREGISTERLIB_SCRIPTS\s+RELATIVE\s+\S+\s+CONFIGURE_DEPENDS\s+(\S+)\)"
    globs = re.findall(pattern, text)
    assert globs == [("GLOB", "${CMAKE_CURRENT_SOURCE_DIR}/DeepRegisterLib/*.py")]
    scripts = re.search(r"set\(MODULE_PYTHON_SCRIPTS([^)]*)\)", text).group(1).split()
    assert scripts == ["${MODULE_NAME}.py", "${DEEPREGISTERLIB_SCRIPTS}"]
    installed = {path.name for path in LIB.glob("*.py")}  # what the glob matches
    assert installed and not installed & {f"{name}.py" for name in TOOLS}
