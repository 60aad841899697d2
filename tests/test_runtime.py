"""capfast.common.runtime.prepare_process(): what it sets, that a second call changes nothing, and that a loader
built without the `capfast` command runs ffcv's numba code on the OpenMP threading layer."""

import sys
from types import SimpleNamespace

from test_packaging import env_without_threading_layer, run_python

from capfast.common.runtime import _HideNumbaFinalizerNoise


def test_prepare_process_sets_each_setting_once():
    code = ("import os, sys; from capfast.common.runtime import prepare_process; prepare_process(); "
            "h = sys.unraisablehook; m = list(sys.meta_path); prepare_process(); "
            "assert sys.unraisablehook is h and sys.meta_path == m; "
            "print(os.environ['NUMBA_THREADING_LAYER'], type(h).__name__, type(m[0]).__name__)")
    assert run_python(code, env_without_threading_layer()).split() == ["omp", "_HideNumbaFinalizerNoise",
                                                                       "_PlainImageModes"]


def test_a_threading_layer_the_user_chose_is_kept():
    code = ("import os; from capfast.common.runtime import prepare_process; prepare_process(); "
            "print(os.environ['NUMBA_THREADING_LAYER'])")
    assert run_python(code, {**env_without_threading_layer(), "NUMBA_THREADING_LAYER": "workqueue"}) == "workqueue\n"


def test_a_loader_built_without_the_cli_runs_numba_on_openmp(converted):
    """The loader is where ffcv's parallel stage runs; numba fixes its threading layer when ffcv is first imported."""
    code = ("import sys, numba; from capfast.data import LoaderOptions, build_loader; "
            "from capfast.common.normalization import IMAGENET; "
            f"build_loader({str(converted / 'val.beton')!r}, LoaderOptions(batch_size=4, workers=2), train=False, "
            "normalization=IMAGENET); "
            "print(numba.threading_layer(), type(sys.unraisablehook).__name__)")
    assert run_python(code, env_without_threading_layer()).split() == ["omp", "_HideNumbaFinalizerNoise"]


def test_only_numbas_finalizer_key_error_is_hidden():
    seen = []
    hook = _HideNumbaFinalizerNoise(seen.append)
    from_numba, from_elsewhere = (_unraisable(KeyError(1), "/site-packages/numba/core/dispatcher.py"),
                                  _unraisable(KeyError(2), "/site-packages/mylib/cache.py"))
    other_error = _unraisable(ValueError(3), "/site-packages/numba/core/dispatcher.py")
    for unraisable in (from_numba, from_elsewhere, other_error):
        hook(unraisable)
    assert seen == [from_elsewhere, other_error]


def _unraisable(error: Exception, filename: str) -> SimpleNamespace:
    """What Python hands sys.unraisablehook for `error` raised by code in `filename`."""
    try:
        exec(compile("raise error", filename, "exec"), {"error": error})
    except Exception:
        traceback = sys.exc_info()[2]
    return SimpleNamespace(exc_value=error, exc_traceback=traceback, exc_type=type(error), object=None,
                           err_msg=None)
