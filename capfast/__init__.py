"""capfast: fast image-captioning training on MS-COCO."""

import os
import sys

__version__ = "0.1.0"


def _load_converters_from_source_checkout() -> None:
    """capfast.converters lives in the top-level converters/ folder, which pyproject.toml's package-dir installs
    inside the package. Run from a source checkout (PYTHONPATH=., no install) the package has no such folder:
    load it from the checkout so that `import capfast.converters` works the same way there."""
    import importlib.util

    package_dir = os.path.dirname(os.path.abspath(__file__))
    folder = os.path.join(os.path.dirname(package_dir), "converters")
    installed = os.path.isdir(os.path.join(package_dir, "converters"))
    if installed or not os.path.isfile(os.path.join(folder, "__init__.py")):
        return
    spec = importlib.util.spec_from_file_location(f"{__name__}.converters", os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    globals()["converters"] = module  # what the import system does for a submodule it loads itself


_load_converters_from_source_checkout()
