"""The array module (NumPy or CuPy), chosen once at an entry point and passed down as `xp`.

This is the only module of minisae that imports CuPy. Everything else receives `xp` as an
argument (or reads it off an array with `xp_of`) and calls `xp.matmul`, `xp.exp`, ... on it.
Random numbers are always drawn on the host with NumPy and then moved, so a CPU run and a GPU
run with the same seed start from identical values.
"""

import numpy

from minisae.errors import DependencyError, InputError

_cupy = None
_cupy_error = None


def _import_cupy():
    global _cupy, _cupy_error
    if _cupy is None and _cupy_error is None:
        try:
            import cupy

            cupy.cuda.runtime.getDeviceCount()  # raises without a driver or a device
            _cupy = cupy
        except Exception as e:  # ImportError, CUDARuntimeError, ...
            _cupy_error = e
    return _cupy


def cupy_available():
    """True when CuPy imports and sees at least one CUDA device."""
    return _import_cupy() is not None


def get_xp(name="numpy"):
    """Return the array module for `name` ("numpy", "cupy", "cpu", "gpu", or a module)."""
    if not isinstance(name, str):
        return name
    key = name.lower()
    if key in ("numpy", "np", "cpu"):
        return numpy
    if key in ("cupy", "cp", "gpu", "cuda"):
        cp = _import_cupy()
        if cp is None:
            raise DependencyError(
                f"array backend {name!r} asked for, but CuPy is not usable here ({_cupy_error}); "
                "install the GPU extra (pip install 'minisae[gpu]') on a machine with a CUDA device, "
                "or use the 'numpy' backend"
            )
        return cp
    raise InputError(f"unknown array backend {name!r}: expected 'numpy' or 'cupy'")


def _is_cupy_array(array):
    # Checked by the type's module, so arrays from a CuPy imported elsewhere are recognised too.
    return type(array).__module__.split(".")[0] == "cupy"


def xp_of(array):
    """The module that owns `array`: cupy for CuPy arrays, numpy for everything else."""
    if _is_cupy_array(array):
        return _import_cupy() or __import__("cupy")
    return numpy


def to_numpy(array):
    """A NumPy copy (or view) of a NumPy or CuPy array."""
    if _is_cupy_array(array):
        return array.get()
    return numpy.asarray(array)


def asarray(array, xp, dtype=None):
    """Move a host or device array to module `xp`, optionally casting it."""
    if xp is numpy:
        return numpy.asarray(to_numpy(array), dtype=dtype)
    return xp.asarray(array, dtype=dtype)


def synchronize(xp):
    """Wait for queued GPU work (a no-op on NumPy); benchmarks call it before reading clocks."""
    if xp is not numpy:
        xp.cuda.Device().synchronize()
