"""The process-wide settings capfast runs ffcv under, made in one place: prepare_process().

Importing capfast changes nothing in the process. prepare_process() is called where work that reaches ffcv starts:
capfast.cli.main (every command, and every `capfast train` rank, which runs `python -m capfast`), the loader
(capfast.data.loader.CaptionLoader), every read of a beton (capfast.store.beton.check_beton), `capfast convert`'s
capfast.pack.convert.convert, and the test suite (tests/conftest.py). It must come before the process's first
ffcv import: importing any of ffcv starts numba's worker threads (ffcv.pipeline.compiler calls
numba.set_num_threads), which fixes the threading layer, and imports ffcv.fields.rgb_image.
"""

import os
import sys

from capfast.common import ffcv_import

THREADING_LAYER = "omp"


def prepare_process() -> None:
    """Sets, once per process (calling it again changes nothing):

    - numba's threading layer to OpenMP, unless NUMBA_THREADING_LAYER says otherwise. numba picks its TBB layer
      when libtbb is on the system (libopencv-dev pulls it in); TBB's workers can abort a process at interpreter
      exit ("terminate called without an active exception"), as a finished DDP rank in our tests did now and
      then. The environment variable also reaches the processes this one starts (torchrun ranks, convert's
      workers).
    - an import hook that makes importing ffcv 3-4 s cheaper (capfast.common.ffcv_import).
    - an unraisable-exception hook that hides numba 0.68's harmless KeyError from a dispatcher finalizer, which
      Python would print as "Exception ignored in ..." every time ffcv's compiled pipelines (a loader's) are
      garbage-collected; every other unraisable exception goes to the hook that was there before.
    """
    _use_threading_layer()
    ffcv_import.install()
    if not isinstance(sys.unraisablehook, _HideNumbaFinalizerNoise):
        sys.unraisablehook = _HideNumbaFinalizerNoise(sys.unraisablehook)


def _use_threading_layer() -> None:
    os.environ.setdefault("NUMBA_THREADING_LAYER", THREADING_LAYER)
    if "numba" in sys.modules:  # numba read the environment when it was imported
        sys.modules["numba"].config.THREADING_LAYER = os.environ["NUMBA_THREADING_LAYER"]


class _HideNumbaFinalizerNoise:
    def __init__(self, default):
        self.default = default

    def __call__(self, unraisable) -> None:
        if not _is_numba_finalizer_key_error(unraisable):
            self.default(unraisable)


def _is_numba_finalizer_key_error(unraisable) -> bool:
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (isinstance(unraisable.exc_value, KeyError) and tb is not None
            and tb.tb_frame.f_code.co_filename.endswith("numba/core/dispatcher.py"))
