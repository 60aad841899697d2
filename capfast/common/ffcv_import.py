"""Makes importing ffcv 3-4 s cheaper in every process that does.

ffcv.fields.rgb_image builds a numba typed Dict at import time, IMAGE_MODES = {'jpg': 0, 'raw': 1}, and numba
compiles its dictionary type for it on the spot (~3.6 s of ffcv's ~7 s import here; numba does not cache it). ffcv
only ever reads that dict from Python (to pick the int it bakes into its compiled code, or to write a record's
mode), so a plain dict does the same job. install() puts a finder on sys.meta_path that, when that one module is
first imported, runs it with numba.typed.Dict bound to dict, then restores numba's own. capfast.common.runtime's
prepare_process() installs it.
"""

import importlib.abc
import importlib.util
import sys

MODULE = "ffcv.fields.rgb_image"


class _PlainImageModes(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        sys.meta_path.remove(self)  # once, and so that the find_spec below finds the real module
        spec = importlib.util.find_spec(name)
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            import numba.typed

            typed_dict = numba.typed.Dict
            numba.typed.Dict = dict
            try:
                run_module(module)
            finally:
                numba.typed.Dict = typed_dict

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if MODULE not in sys.modules and not any(isinstance(f, _PlainImageModes) for f in sys.meta_path):
        sys.meta_path.insert(0, _PlainImageModes())
