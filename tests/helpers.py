"""Helpers the tests share: one closeness assertion, and the random problems, hypothesis settings
and finite differences of the SAE gradient tests."""

import numpy
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from tolerances import F32_ATOL, F32_RTOL, FD_ATOL, FD_RTOL, FD_STEP

from minisae.xp import asarray, to_numpy, xp_of


def assert_close(got, want, rtol=F32_RTOL, atol=F32_ATOL, what="", *, dtype=None, n_show=5):
    """Elementwise |got - want| <= atol + rtol |want| (NaN only where want is NaN), in float64;
    on failure the first mismatched pairs and the largest difference. dtype: got's, if given."""
    got = to_numpy(got)
    if dtype is not None:
        assert got.dtype == numpy.dtype(dtype), f"{what}: expected {numpy.dtype(dtype)}, found {got.dtype}"
    got = numpy.asarray(got, dtype=numpy.float64)
    want = numpy.asarray(to_numpy(want), dtype=numpy.float64)
    assert got.shape == want.shape, f"{what}: expected shape {want.shape}, found {got.shape}"
    diff = numpy.abs(got - want)
    bad = ~(diff <= atol + rtol * numpy.abs(want)) & ~(numpy.isnan(got) & numpy.isnan(want))
    if bad.any():
        lines = [f"{what}: {int(bad.sum())} of {want.size} entries differ "
                 f"(rtol {rtol:g}, atol {atol:g}); first pairs (got, want):"]
        for idx in list(zip(*numpy.nonzero(bad)))[:n_show]:
            idx = tuple(int(i) for i in idx)
            lines.append(f"  {idx}: {got[idx]: .15e} {want[idx]: .15e}")
        lines.append(f"  max |diff| {numpy.nanmax(numpy.where(bad, diff, 0.0)):.3e}")
        raise AssertionError("\n".join(lines))


# `xp` is a plain module-valued fixture: safe to share across hypothesis examples.
HSETTINGS = settings(suppress_health_check=list(settings.default.suppress_health_check)
                     + [HealthCheck.function_scoped_fixture])

shapes = st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 8))  # (B, D, M)
seeds = st.integers(0, 2**32 - 1)


# ----------------------------------------------------------------------------------------------
# problems (float64 on the host; moved to xp by `to_xp`)


def problem(variant, rng, B, D, M):
    """Random params and input x for `variant`, scaled so pre-activations are O(1)."""
    W_enc = rng.standard_normal((D, M)) / numpy.sqrt(D)  # (D, M)
    W_dec = 0.5 * rng.standard_normal((M, D))  # (M, D)
    x = rng.standard_normal((B, D))  # (B, D)
    b_dec = 0.3 * rng.standard_normal(D)  # (D,)
    if variant == "jumprelu":
        p = {"W_enc": W_enc, "b_enc": 0.3 * rng.standard_normal(M), "W_dec": W_dec, "b_dec": b_dec,
             "log_threshold": numpy.log(rng.uniform(0.05, 0.8, M))}
    elif variant == "gated":
        p = {"W_enc": W_enc, "b_gate": 0.3 * rng.standard_normal(M),
             "r_mag": 0.5 * rng.standard_normal(M), "b_mag": 0.3 * rng.standard_normal(M),
             "W_dec": W_dec, "b_dec": b_dec}
    else:
        p = {"W_enc": W_enc, "b_enc": 0.3 * rng.standard_normal(M), "W_dec": W_dec, "b_dec": b_dec}
    return p, x


def to_xp(params, xp, dtype="float64"):
    return {k: asarray(v, xp, dtype) for k, v in params.items()}


def host(params):
    return {k: to_numpy(v) for k, v in params.items()}


# ----------------------------------------------------------------------------------------------
# finite differences


def fd_check(loss_fn, params, grads, names, rng, label):
    """Central differences of loss_fn(params) against grads[name] . direction: every element of
    vectors, three random unit directions for matrices."""
    loss0 = loss_fn(params)
    atol = FD_ATOL * max(1.0, abs(loss0))  # FD rounding error grows with |loss| * eps / step
    for name in names:
        p = params[name]
        shape = tuple(p.shape)
        if len(shape) == 1:
            directions = list(numpy.eye(shape[0]))
        else:
            directions = [d / numpy.linalg.norm(d) for d in rng.standard_normal((3,) + shape)]
        g = to_numpy(grads[name])
        for direction in directions:
            step = asarray(FD_STEP * direction, xp_of(p), p.dtype)
            plus = loss_fn({**params, name: p + step})
            minus = loss_fn({**params, name: p - step})
            fd = (plus - minus) / (2.0 * FD_STEP)
            analytic = float((g * direction).sum())
            assert numpy.isclose(analytic, fd, rtol=FD_RTOL, atol=atol), (
                f"{label}: d loss / d {name} along {numpy.round(direction, 3).tolist()}: "
                f"backward {analytic:.10g}, finite differences {fd:.10g}")


def jumprelu_pre(p, x, pre_enc_bias):
    x_c = x - p["b_dec"] if pre_enc_bias else x  # (B, D)
    return x_c @ p["W_enc"] + p["b_enc"]  # (B, M)


# ---- mpiexec ------------------------------------------------------------------------------------

def mpiexec_or_skip():
    """(mpiexec, env) for running minisae under `mpiexec -n P` from a test: the mpiexec of the venv's
    `mpich` wheel (or on PATH), and an environment that imports this checkout with one BLAS thread
    per rank. Skips the test where mpi4py or mpiexec is missing (the dist extra)."""
    import os
    import shutil
    import sys
    from pathlib import Path

    import pytest

    pytest.importorskip("mpi4py")
    here = Path(sys.executable).parent / "mpiexec"
    exe = str(here) if here.exists() else shutil.which("mpiexec")
    if exe is None:
        pytest.skip("mpiexec not found (install the dist extra: pip install 'minisae[dist]')")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return exe, env
