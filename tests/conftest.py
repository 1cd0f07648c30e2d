"""Shared test fixtures: the `xp` array module (NumPy always, CuPy when a GPU is present) and
hypothesis profiles ("ci": fast and derandomised, the default; "thorough": many more examples).

    HYPOTHESIS_PROFILE=thorough python -m pytest
"""

import os

import numpy
import pytest
from hypothesis import HealthCheck, settings

from minisae.xp import cupy_available, get_xp

settings.register_profile(
    "ci",
    max_examples=25,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=500,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_BACKENDS = [
    pytest.param("numpy", id="numpy"),
    pytest.param("cupy", id="cupy", marks=pytest.mark.gpu),
]


@pytest.fixture(params=_BACKENDS)
def xp(request):
    """The array module under test; the CuPy case skips cleanly without CuPy and a device."""
    if request.param == "cupy" and not cupy_available():
        pytest.skip("CuPy with a CUDA device is not available")
    return get_xp(request.param)


@pytest.fixture
def np_xp():
    return numpy
