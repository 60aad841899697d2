"""capfast: fast image-captioning training on MS-COCO."""

import os
import sys

# numba picks its TBB threading layer when libtbb is on the system (libopencv-dev pulls it in); TBB's workers
# can abort a process at interpreter exit ("terminate called without an active exception"), as a finished DDP
# rank in our tests did now and then. Set before any ffcv code runs, hence at the package's first import.
os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")
if "numba" in sys.modules:
    sys.modules["numba"].config.THREADING_LAYER = os.environ["NUMBA_THREADING_LAYER"]

__version__ = "0.1.0"
