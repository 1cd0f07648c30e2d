"""The fast paths' dense routes (JumpReLU, Gated) equal the plain forward + backward bit for bit:
when too many entries fire for the row-sparse path, forward_backward(path="auto") on NumPy runs the same
operations as the readable reference, sharing the encoder's product (the sparse ≡ plain checks,
to rounding, are in test_sae_invariants.py and test_sae_recipes.py)."""

import numpy
import pytest

from minisae.sae import gated, gated_fast, jumprelu, jumprelu_fast

B, D, M = 24, 8, 40


def dense_problem(seed, raw):
    params = jumprelu.init(D, M, seed=seed, dtype="float32", threshold_param="raw" if raw else "log")
    x = numpy.random.default_rng(seed).standard_normal((B, D), dtype=numpy.float32)
    return params, x


@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.parametrize("hyper", [
    dict(sparsity_coeff=0.01),
    dict(sparsity_coeff=0.01, pre_enc_bias=False, bandwidth=0.5),
    dict(sparsity_coeff=0.01, penalty="quadratic", target_l0=5.0, freq_coeff=2.0, freq_target=0.05),
    dict(sparsity_coeff=0.01, prefixes=(8, 24)),
])
def test_jumprelu_fast_dense_route_equals_plain_bit_for_bit(raw, hyper):
    params, x = dense_problem(3, raw)
    out_p, cache = jumprelu.forward(params, x, **hyper)
    grads_p = jumprelu.backward(params, cache)
    assert numpy.count_nonzero(out_p["f"]) > jumprelu_fast.SPARSE_MAX_DENSITY * B * M  # the dense route
    out_f, grads_f = jumprelu.forward_backward(params, x, **hyper)  # path="auto"
    for k in out_p:
        assert out_f[k].tobytes() == out_p[k].tobytes(), k
    assert list(grads_f) == list(grads_p)
    for k in grads_p:
        assert grads_f[k].tobytes() == grads_p[k].tobytes(), k


@pytest.mark.parametrize("seed", [0, 1])
def test_gated_fast_dense_route_equals_plain_bit_for_bit(seed):
    params = gated.init(D, M, seed=seed, dtype="float32")
    params["b_gate"] = numpy.full(M, 0.5, numpy.float32)  # most gates open: the dense route
    params["r_mag"] = numpy.random.default_rng(seed).standard_normal(M, dtype=numpy.float32) * 0.3
    x = numpy.random.default_rng(seed).standard_normal((B, D), dtype=numpy.float32)
    out_p, cache = gated.forward(params, x, sparsity_coeff=0.01)
    grads_p = gated.backward(params, cache)
    assert numpy.count_nonzero(cache["gate"]) > gated_fast.SPARSE_MAX_DENSITY * B * M
    out_f, grads_f = gated.forward_backward(params, x, sparsity_coeff=0.01)  # path="auto"
    for k in out_p:
        assert out_f[k].tobytes() == out_p[k].tobytes(), k
    for k in grads_p:
        assert grads_f[k].tobytes() == grads_p[k].tobytes(), k
