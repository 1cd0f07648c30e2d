"""Hand-written SAE gradients against central finite differences (float64), and the JumpReLU
threshold pseudo-derivative against the ramp identity (below; the pseudo-derivative is
that of Rajamanoharan et al. 2024, arXiv 2407.14435).

Hypothesis draws the shapes (B <= 6, D <= 6, M <= 8), a seed for the values, and the
coefficients. Kinks are excluded with `assume(...)` margins (KINK_MARGIN, far above the change
one finite-difference step makes in any pre-activation) instead of loose tolerances. Vector
parameters are checked element by element, matrices along random directions. Where the loss has
a stop-gradient (Gated's frozen decoder, TopK's AuxK target) the finite differences are taken of
a test-side loss holding that piece at its value at the base point.
"""

import numpy
from helpers import HSETTINGS, fd_check, host, jumprelu_pre, problem, seeds, shapes, to_xp  # noqa: F401
from hypothesis import assume, given
from hypothesis import strategies as st
from tolerances import FD_ATOL, FD_RTOL, FD_STEP, KINK_MARGIN

from minisae.sae import gated, jumprelu, topk
from minisae.xp import asarray, to_numpy

# ----------------------------------------------------------------------------------------------
# JumpReLU


@HSETTINGS
@given(shape=shapes, seed=seeds, lam=st.floats(0.0, 2.0), pre_enc_bias=st.booleans(),
       bandwidth=st.floats(0.01, 1.0))
def test_jumprelu_true_gradients(xp, shape, seed, lam, pre_enc_bias, bandwidth):
    rng = numpy.random.default_rng(seed)
    p_host, x_host = problem("jumprelu", rng, *shape)
    pre = jumprelu_pre(p_host, x_host, pre_enc_bias)  # (B, M)
    theta = numpy.exp(p_host["log_threshold"])  # (M,)
    assume(numpy.all(numpy.abs(pre - theta) > KINK_MARGIN))  # the jump of f and the L0 step
    assume(numpy.all(numpy.abs(pre) > KINK_MARGIN))  # the ReLU
    params, x = to_xp(p_host, xp), asarray(x_host, xp, "float64")
    hyper = dict(sparsity_coeff=lam, bandwidth=bandwidth, pre_enc_bias=pre_enc_bias)

    def loss_fn(ps):
        return float(jumprelu.forward(ps, x, **hyper)[0]["loss"])

    out, cache = jumprelu.forward(params, x, **hyper)
    grads = jumprelu.backward(params, cache)
    # log_threshold's gradient is a pseudo-derivative: checked by the ramp test below
    fd_check(loss_fn, params, grads, ["W_enc", "b_enc", "W_dec", "b_dec"], rng, "jumprelu")


@HSETTINGS
@given(shape=shapes, seed=seeds, lam=st.floats(0.0, 2.0), pre_enc_bias=st.booleans(),
       bandwidth=st.floats(0.05, 1.0), offsets_seed=seeds)
def test_jumprelu_threshold_pseudo_derivative_ramp_identity(xp, shape, seed, lam, pre_enc_bias,
                                                             bandwidth, offsets_seed):
    """The ramp identity: replace H(pi - theta) by the ramp R = clip((pi - theta)/eps + 1/2, 0, 1),
    whose true theta-derivative is exactly -(1/eps) K((pi - theta)/eps). In the L0 term the step
    becomes R itself; in the JumpReLU term the jump at pi = theta has height theta, spread by
    the ramp: f(theta') = f + theta * (R(theta') - R(theta)), d f / d theta' = -(theta/eps) K.
    Finite differences of that ramp loss in theta must equal backward's pseudo-gradient
    (log_threshold's gradient divided by theta, the chain of theta = exp(log_threshold))."""
    rng = numpy.random.default_rng(seed)
    B, D, M = shape
    p_host, x_host = problem("jumprelu", rng, B, D, M)
    pi = numpy.maximum(jumprelu_pre(p_host, x_host, pre_enc_bias), 0.0)  # (B, M)
    # put one token of every latent inside its window (anywhere in it, edges included), so the
    # pseudo-derivative has work to do; latents whose token has pi = 0 keep a random theta
    off_rng = numpy.random.default_rng(offsets_seed)
    b_star = off_rng.integers(0, B, M)  # (M,)
    near = pi[b_star, numpy.arange(M)] + off_rng.uniform(-0.5, 0.5, M) * bandwidth  # (M,)
    theta = numpy.where(near > 0.01, near, numpy.exp(p_host["log_threshold"]))  # (M,)
    p_host["log_threshold"] = numpy.log(theta)
    theta = numpy.exp(p_host["log_threshold"])  # as the module will see it
    half = 0.5 * bandwidth
    assume(numpy.all(numpy.abs(pi - (theta - half)) > KINK_MARGIN))  # ramp corners
    assume(numpy.all(numpy.abs(pi - (theta + half)) > KINK_MARGIN))
    params, x = to_xp(p_host, xp), asarray(x_host, xp, "float64")
    hyper = dict(sparsity_coeff=lam, bandwidth=bandwidth, pre_enc_bias=pre_enc_bias)
    out, cache = jumprelu.forward(params, x, **hyper)
    grads = jumprelu.backward(params, cache)
    f = to_numpy(out["f"])  # (B, M)

    def ramp(th):
        return numpy.clip((pi - th) / bandwidth + 0.5, 0.0, 1.0)  # (B, M)

    def ramp_loss(th):
        f_ramp = f + theta * (ramp(th) - ramp(theta))  # (B, M)
        xhat = f_ramp @ p_host["W_dec"] + p_host["b_dec"]  # (B, D)
        return (((x_host - xhat) ** 2).sum() + lam * ramp(th).sum()) / B

    dtheta_fd = numpy.array([(ramp_loss(theta + FD_STEP * e) - ramp_loss(theta - FD_STEP * e))
                             / (2.0 * FD_STEP) for e in numpy.eye(M)])  # (M,)
    atol = FD_ATOL * max(1.0, abs(ramp_loss(theta)))
    dtheta = to_numpy(grads["log_threshold"]) / theta  # (M,)
    numpy.testing.assert_allclose(dtheta, dtheta_fd, rtol=FD_RTOL, atol=atol,
                                  err_msg="jumprelu: d loss / d theta, backward vs ramp FD")
    if xp is numpy:  # the sparse path of loss_and_grads gives the same pseudo-gradient
        _, g_sparse = jumprelu.loss_and_grads(params, x, path="sparse", **hyper)
        numpy.testing.assert_allclose(g_sparse["log_threshold"] / theta, dtheta_fd,
                                      rtol=FD_RTOL, atol=atol)


# ----------------------------------------------------------------------------------------------
# Gated


@HSETTINGS
@given(shape=shapes, seed=seeds, lam=st.floats(0.0, 2.0))
def test_gated_true_gradients(xp, shape, seed, lam):
    rng = numpy.random.default_rng(seed)
    p_host, x_host = problem("gated", rng, *shape)
    x_c = x_host - p_host["b_dec"]  # (B, D)
    pi_gate = x_c @ p_host["W_enc"] + p_host["b_gate"]  # (B, M)
    pi_mag = x_c @ (p_host["W_enc"] * numpy.exp(p_host["r_mag"])) + p_host["b_mag"]  # (B, M)
    assume(numpy.all(numpy.abs(pi_gate) > KINK_MARGIN))  # Heaviside gate and ReLU(pi_gate)
    assume(numpy.all(numpy.abs(pi_mag) > KINK_MARGIN))  # ReLU(pi_mag)
    params, x = to_xp(p_host, xp), asarray(x_host, xp, "float64")
    B = shape[0]
    W_dec0, b_dec0 = p_host["W_dec"], p_host["b_dec"]  # the auxiliary term's frozen decoder

    def aux_frozen(ps):
        ps = host(ps)
        g = numpy.maximum((x_host - ps["b_dec"]) @ ps["W_enc"] + ps["b_gate"], 0.0)  # (B, M)
        return float((((x_host - (g @ W_dec0 + b_dec0)) ** 2).sum()) / B)

    def loss_fn(ps):
        out = gated.forward(ps, x, sparsity_coeff=lam)[0]
        return float(out["mse"]) + lam * float(out["l1"]) + aux_frozen(ps)

    out, cache = gated.forward(params, x, sparsity_coeff=lam)
    assert numpy.isclose(float(out["aux"]), aux_frozen(params), rtol=1e-12, atol=0.0)
    assert numpy.isclose(float(out["loss"]), loss_fn(params), rtol=1e-12, atol=0.0)
    grads = gated.backward(params, cache)
    fd_check(loss_fn, params, grads, list(gated.PARAM_NAMES), rng, "gated")


# ----------------------------------------------------------------------------------------------
# TopK


def _topk_gap_ok(values, k):
    """True when the k-th largest of every row is KINK_MARGIN clear of the (k+1)-th."""
    if k >= values.shape[1]:
        return True
    s = -numpy.sort(-values, axis=1)  # (B, n) descending
    return bool(numpy.all(s[:, k - 1] - s[:, k] > KINK_MARGIN))


@HSETTINGS
@given(shape=shapes, seed=seeds, data=st.data(), aux_coeff=st.floats(0.0, 2.0))
def test_topk_true_gradients(xp, shape, seed, data, aux_coeff):
    B, D, M = shape
    k = data.draw(st.integers(1, M), label="k")
    aux_k = data.draw(st.integers(1, M), label="aux_k")
    dead_host = numpy.array(data.draw(st.lists(st.booleans(), min_size=M, max_size=M),
                                      label="dead_mask"))
    rng = numpy.random.default_rng(seed)
    p_host, x_host = problem("topk", rng, B, D, M)
    pi = (x_host - p_host["b_dec"]) @ p_host["W_enc"] + p_host["b_enc"]  # (B, M)
    assume(_topk_gap_ok(pi, k))
    assume(numpy.all(numpy.abs(pi) > KINK_MARGIN))  # ReLU after TopK
    dead = numpy.flatnonzero(dead_host)  # (Nd,)
    k_aux = min(aux_k, dead.size)
    if dead.size:
        assume(_topk_gap_ok(pi[:, dead], k_aux))
    params, x = to_xp(p_host, xp), asarray(x_host, xp, "float64")
    hyper = dict(k=k, aux_k=aux_k, aux_coeff=aux_coeff, dead_mask=asarray(dead_host, xp))
    out, cache = topk.forward(params, x, **hyper)
    e0 = x_host - to_numpy(out["xhat"])  # (B, D) the AuxK target, held fixed

    def aux_sg(ps):
        """mean_b sum_d (e0 - z_aux @ W_dec[dead])^2, written here with argsort."""
        if dead.size == 0:
            return 0.0
        ps = host(ps)
        pd = ((x_host - ps["b_dec"]) @ ps["W_enc"] + ps["b_enc"])[:, dead]  # (B, Nd)
        keep = numpy.argsort(-pd, axis=1)[:, :k_aux]  # (B, Ka)
        z_aux = numpy.zeros_like(pd)  # (B, Nd)
        numpy.put_along_axis(z_aux, keep, numpy.maximum(numpy.take_along_axis(pd, keep, 1), 0), 1)
        return float(((e0 - z_aux @ ps["W_dec"][dead]) ** 2).sum() / B)

    def loss_fn(ps):
        mse = float(topk.forward(ps, x, k=k)[0]["mse"])
        return mse + aux_coeff * aux_sg(ps)

    assert numpy.isclose(float(out["aux"]), aux_sg(params), rtol=1e-12, atol=1e-300)
    assert numpy.isclose(float(out["loss"]), loss_fn(params), rtol=1e-12, atol=0.0)
    grads = topk.backward(params, cache)
    fd_check(loss_fn, params, grads, list(topk.PARAM_NAMES), rng,
             f"topk k={k}, dead={dead.tolist()}")
