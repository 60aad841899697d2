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
