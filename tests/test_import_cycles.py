"""tools/check_import_cycles.py on packages planted in a temporary folder: every cycle is found, with the lines that
make it, and a package without one passes."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "check_import_cycles.py"


def plant(root: Path, modules: dict[str, str]) -> None:
    """Writes package `planted` under `root`: {module name: source}."""
    package = root / "planted"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, source in modules.items():
        (package / f"{name}.py").write_text(source)


def run_tool(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), "planted"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)})


def test_a_cycle_through_a_function_level_import_fails_the_check(tmp_path):
    plant(tmp_path, {"a": "def f():\n    from planted import b\n", "b": "import planted.a\n"})
    result = run_tool(tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        "import cycle: planted.a -> planted.b -> planted.a",
        "  planted.a l.2: from planted import b",
        "  planted.b l.1: import planted.a",
        "1 import cycle(s) among 3 modules of planted",
    ]


def test_a_package_without_cycles_passes(tmp_path):
    plant(tmp_path, {"a": "from planted import b, c\n", "b": "from planted import c\n", "c": ""})
    result = run_tool(tmp_path)
    assert (result.returncode, result.stdout) == (0, "no import cycles among 4 modules\n"), result.stderr


def test_each_cycle_is_one_chain_through_every_module_of_it(tmp_path):
    """A triangle, a hub that two modules import back, and a module that only imports into a cycle."""
    imports = {"a": "b", "b": "c", "c": "a", "hub": "d, e", "d": "hub", "e": "hub", "outside": "a"}
    plant(tmp_path, {name: f"from planted import {targets}\n" for name, targets in imports.items()})
    code = (f"import json, sys; sys.path[:0] = [{str(TOOL.parent)!r}, {str(tmp_path)!r}]; "
            "from check_import_cycles import cycles; print(json.dumps(cycles('planted')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads(result.stdout)) == [
        ["planted.a", "planted.b", "planted.c", "planted.a"],
        ["planted.d", "planted.hub", "planted.e", "planted.hub", "planted.d"],
    ]


def test_components_of_a_long_cycle_without_recursion():
    """Tarjan's algorithm on 5,000 modules in one cycle, and each module alone on its own: no recursion limit."""
    tool = _load_tool()
    ring = {f"m{i}": {f"m{(i + 1) % 5000}"} for i in range(5000)}
    assert tool._strongly_connected(ring) == [sorted(ring)]
    chain = {f"m{i}": {f"m{i + 1}"} if i < 4999 else set() for i in range(5000)}
    assert len(tool._strongly_connected(chain)) == 5000


def _load_tool():
    spec = importlib.util.spec_from_file_location("check_import_cycles", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
