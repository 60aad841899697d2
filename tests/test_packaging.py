"""pyproject.toml installs every package, with converters/ as capfast.converters (not a top-level package)."""

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


def test_ffcv_imports_without_compiling_a_numba_dict():
    """capfast.common.ffcv_import: ffcv's IMAGE_MODES is a plain dict (numba would compile its typed Dict, ~3.6 s a
    process), with ffcv's values, and numba.typed.Dict is numba's own again afterwards."""
    import subprocess
    import sys

    code = ("import capfast, numba.typed, ffcv.loader, ffcv.fields.rgb_image as m; "
            "print(type(m.IMAGE_MODES).__name__, sorted(m.IMAGE_MODES.items()), numba.typed.Dict is dict)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.split("\n")[0] == "dict [('jpg', 0), ('raw', 1)] False"
