"""How capfast installs and what importing it does. converters/ is packaged as capfast.converters through the
capfast/converters link (a top-level `converters` would clash with an unrelated PyPI project)."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_package_folder_as_files_and_nothing_outside_capfast(tmp_path):
    """A real wheel, built by setuptools from a copy of the sources (the build writes beside them)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("capfast", "converters"):
        shutil.copytree(ROOT / folder, source / folder, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    code = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=source)
    assert result.returncode == 0, result.stderr[-3000:]
    with zipfile.ZipFile(tmp_path / result.stdout.split()[-1]) as wheel:
        names = wheel.namelist()
        packaged = {str(Path(name).parent).replace("/", ".") for name in names if name.endswith("/__init__.py")}
        assert packaged == package_folders(ROOT / "capfast")
        assert all(name.split("/")[0] == "capfast" or ".dist-info/" in name for name in names)
        for module in (ROOT / "converters").glob("*.py"):  # the files themselves, not a link
            assert wheel.read(f"capfast/converters/{module.name}") == module.read_bytes()


def package_folders(package: Path) -> set[str]:
    """The dotted names of `package` and of every folder below it with an __init__.py, through links."""
    return {".".join(Path(folder).relative_to(package.parent).parts)
            for folder, _, files in os.walk(package, followlinks=True) if "__init__.py" in files}


def test_converters_resolve_to_the_checkouts_folder_without_an_install():
    """With only the checkout on sys.path (-I -S: no site-packages, so no installed capfast)."""
    code = ("import importlib.util, sys; sys.path.insert(0, sys.argv[1]); "
            "print(importlib.util.find_spec('capfast.converters').origin)")
    origin = run_python(code, flags=("-I", "-S"), args=(str(ROOT),)).strip()
    assert Path(origin).resolve() == ROOT / "converters" / "__init__.py"
    assert "capfast.converters" in package_folders(ROOT / "capfast")


def test_converters_import_under_capfast():
    import capfast.converters
    from capfast.converters import read_coco

    assert Path(capfast.converters.__file__).resolve().parent == ROOT / "converters" and callable(read_coco)


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


def run_python(code: str, env: dict | None = None, flags=(), args=()) -> str:
    """stdout of `python FLAGS -c code ARGS` run from the checkout; stderr in the message when it fails."""
    command = [sys.executable, *flags, "-c", code, *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
