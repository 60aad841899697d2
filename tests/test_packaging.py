"""pyproject.toml installs every package, with converters/ as capfast.converters (not a top-level package)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_installed_under_capfast():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {"capfast.converters": "converters"}
    folders = {"capfast": ROOT / "capfast", "capfast.converters": ROOT / "converters"}
    expected = {f"{name}.{'.'.join(init.parent.relative_to(folder).parts)}".rstrip(".")
                for name, folder in folders.items() for init in folder.rglob("__init__.py")}
    assert sorted(config["packages"]) == sorted(expected)


def test_converters_import_under_capfast():
    import capfast.converters
    from capfast.converters import read_coco

    assert Path(capfast.converters.__file__).parent == ROOT / "converters" and callable(read_coco)


def test_importing_capfast_changes_nothing_process_wide():
    """The settings of capfast.common.runtime wait for prepare_process(): importing the package, or the module that
    holds ffcv's operations, sets no environment variable, installs no import hook and keeps Python's
    unraisable-exception hook."""
    code = ("import os, sys; h = sys.unraisablehook; m = list(sys.meta_path); import capfast, capfast.data.ffcv_ops; "
            "assert 'NUMBA_THREADING_LAYER' not in os.environ and sys.unraisablehook is h and sys.meta_path == m")
    run_python(code, env_without_threading_layer())


def test_ffcv_imports_without_compiling_a_numba_dict():
    """capfast.common.ffcv_import: ffcv's IMAGE_MODES is a plain dict (numba would compile its typed Dict, ~3.6 s a
    process), with ffcv's values, and numba.typed.Dict is numba's own again afterwards."""
    code = ("from capfast.common.runtime import prepare_process; prepare_process(); "
            "import numba.typed, ffcv.loader, ffcv.fields.rgb_image as m; "
            "print(type(m.IMAGE_MODES).__name__, sorted(m.IMAGE_MODES.items()), numba.typed.Dict is dict)")
    assert run_python(code).split("\n")[0] == "dict [('jpg', 0), ('raw', 1)] False"


def env_without_threading_layer() -> dict:
    return {name: value for name, value in os.environ.items() if name != "NUMBA_THREADING_LAYER"}


def run_python(code: str, env: dict | None = None) -> str:
    """stdout of `python -c code` run from the checkout; stderr in the message when it fails."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
