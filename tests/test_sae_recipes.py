"""The 2025-26 JumpReLU options: Gemma Scope 2's quadratic L0 penalty, minisae's frequency penalty
and raw (untransformed) thresholds.

- true gradients against float64 central differences (hypothesis, kinks excluded by `assume`);
- the theta pseudo-derivative of every penalty against the ramp identity: with the step
  H(pi - theta) replaced by the ramp R = clip((pi - theta)/eps + 1/2, 0, 1), whose true
  theta-derivative is exactly -(1/eps) K, the pseudo-gradient equals the true gradient of the
  ramp loss. As in test_sae_gradients, the ramp enters as a displacement from the base point
  (f + theta (R(theta') - R(theta)), L0_b + sum_i (R(theta') - R(theta)), ...), so that the
  penalties' derivatives are taken at the counts the forward actually sees;
- invariants (the quadratic penalty is zero, and passes nothing, at L0_b = L0*; "l0" is the
  paper's loss; raw and log thresholds give the same loss and chain-related gradients);
- the sparse path equals the plain one for every option.
"""

import numpy
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from minisae.sae import common, jumprelu
from minisae.xp import asarray, to_numpy
from helpers import HSETTINGS, assert_close, fd_check, jumprelu_pre, problem, seeds, shapes, to_xp
from test_sae_invariants import assert_paths_agree
from tolerances import FD_ATOL, FD_RTOL, FD_STEP, GOLDEN64_ATOL, KINK_MARGIN, XP64_RTOL

options = st.fixed_dictionaries({
    "penalty": st.sampled_from(["l0", "quadratic"]),
    "target_l0": st.floats(0.5, 6.0),
    "freq_coeff": st.sampled_from([0.0, 0.7]),
    "freq_target": st.floats(0.0, 0.9),
})


def raw_params(p_host):
    """The same SAE with theta trained raw: log_threshold -> threshold."""
    p = {k: v for k, v in p_host.items() if k != "log_threshold"}
    p["threshold"] = numpy.exp(p_host["log_threshold"])
    return p


def freq_kinks_clear(pi, theta, freq_target):
    """True when no latent's firing fraction sits on the kink of max(p - target, 0)."""
    p = (pi > theta).mean(axis=0)  # (M,)
    return bool(numpy.all(numpy.abs(p - freq_target) > KINK_MARGIN))


@HSETTINGS
@given(shape=shapes, seed=seeds, lam=st.floats(0.0, 2.0), opts=options, raw=st.booleans(),
       bandwidth=st.floats(0.01, 1.0))
def test_recipe_true_gradients(xp, shape, seed, lam, opts, raw, bandwidth):
    rng = numpy.random.default_rng(seed)
    p_host, x_host = problem("jumprelu", rng, *shape)
    pre = jumprelu_pre(p_host, x_host, True)  # (B, M)
    theta = numpy.exp(p_host["log_threshold"])  # (M,)
    assume(numpy.all(numpy.abs(pre - theta) > KINK_MARGIN))
    assume(numpy.all(numpy.abs(pre) > KINK_MARGIN))
    if raw:
        p_host = raw_params(p_host)
    params, x = to_xp(p_host, xp), asarray(x_host, xp, "float64")
    hyper = dict(sparsity_coeff=lam, bandwidth=bandwidth, **opts)

    def loss_fn(ps):
        return float(jumprelu.forward(ps, x, **hyper)[0]["loss"])

    out, cache = jumprelu.forward(params, x, **hyper)
    grads = jumprelu.backward(params, cache)
    assert set(grads) == set(p_host)
    fd_check(loss_fn, params, grads, ["W_enc", "b_enc", "W_dec", "b_dec"], rng,
             f"jumprelu {opts}, raw={raw}")


@HSETTINGS
@given(shape=shapes, seed=seeds, lam=st.floats(0.0, 2.0), opts=options, raw=st.booleans(),
       bandwidth=st.floats(0.05, 1.0), offsets_seed=seeds)
def test_recipe_threshold_pseudo_derivative_ramp_identity(xp, shape, seed, lam, opts, raw,
                                                          bandwidth, offsets_seed):
    rng = numpy.random.default_rng(seed)
    B, D, M = shape
    p_host, x_host = problem("jumprelu", rng, B, D, M)
    pi = numpy.maximum(jumprelu_pre(p_host, x_host, True), 0.0)  # (B, M)
    off_rng = numpy.random.default_rng(offsets_seed)
    b_star = off_rng.integers(0, B, M)  # (M,) one token of each latent inside its window
    near = pi[b_star, numpy.arange(M)] + off_rng.uniform(-0.5, 0.5, M) * bandwidth  # (M,)
    theta = numpy.where(near > 0.01, near, numpy.exp(p_host["log_threshold"]))  # (M,)
    p_host["log_threshold"] = numpy.log(theta)
    theta = numpy.exp(p_host["log_threshold"])
    half = 0.5 * bandwidth
    assume(numpy.all(numpy.abs(pi - (theta - half)) > KINK_MARGIN))
    assume(numpy.all(numpy.abs(pi - (theta + half)) > KINK_MARGIN))
    assume(opts["freq_coeff"] == 0.0 or freq_kinks_clear(pi, theta, opts["freq_target"]))
    if raw:
        p_host = raw_params(p_host)
    params, x = to_xp(p_host, xp), asarray(x_host, xp, "float64")
    hyper = dict(sparsity_coeff=lam, bandwidth=bandwidth, **opts)
    out, cache = jumprelu.forward(params, x, **hyper)
    grads = jumprelu.backward(params, cache)
    f = to_numpy(out["f"])  # (B, M)
    l0_b = (pi > theta).sum(axis=1)  # (B,)
    p_i = (pi > theta).mean(axis=0)  # (M,)

    def ramp(th):
        return numpy.clip((pi - th) / bandwidth + 0.5, 0.0, 1.0)  # (B, M)

    def ramp_loss(th):
        moved = ramp(th) - ramp(theta)  # (B, M), zero at th = theta
        xhat = (f + theta * moved) @ p_host["W_dec"] + p_host["b_dec"]  # (B, D)
        l0 = l0_b + moved.sum(axis=1)  # (B,)
        if opts["penalty"] == "l0":
            pen = lam * l0.mean()
        else:
            L = opts["target_l0"]
            pen = (lam * 2.0 / L * (l0 - L) ** 2).mean()
        over = numpy.maximum(p_i + moved.mean(axis=0) - opts["freq_target"], 0.0)  # (M,)
        return ((x_host - xhat) ** 2).sum() / B + pen + opts["freq_coeff"] * (over ** 2).sum()

    assert numpy.isclose(ramp_loss(theta), float(out["loss"]), rtol=1e-12, atol=1e-12)
    dtheta_fd = numpy.array([(ramp_loss(theta + FD_STEP * e) - ramp_loss(theta - FD_STEP * e))
                             / (2.0 * FD_STEP) for e in numpy.eye(M)])  # (M,)
    atol = FD_ATOL * max(1.0, abs(ramp_loss(theta)))
    dtheta = to_numpy(grads["threshold"]) if raw else to_numpy(grads["log_threshold"]) / theta
    numpy.testing.assert_allclose(dtheta, dtheta_fd, rtol=FD_RTOL, atol=atol,
                                  err_msg=f"d loss / d theta, backward vs ramp FD ({opts})")
    if xp is numpy:
        _, g_sparse = jumprelu.loss_and_grads(params, x, path="sparse", **hyper)
        d_sparse = g_sparse["threshold"] if raw else g_sparse["log_threshold"] / theta
        numpy.testing.assert_allclose(d_sparse, dtheta_fd, rtol=FD_RTOL, atol=atol)


def test_quadratic_penalty_is_zero_and_passes_nothing_at_the_target(xp):
    """Every token a copy of one: all have the same L0_b; with L0* = that count the quadratic
    term is 0 and theta's pseudo-gradient is the reconstruction part alone (lambda = 0)."""
    rng = numpy.random.default_rng(5)
    p_host, x_host = problem("jumprelu", rng, 1, 6, 12)
    x_host = numpy.repeat(x_host, 7, axis=0)  # (7, 6) identical tokens
    pi = numpy.maximum(jumprelu_pre(p_host, x_host, True), 0.0)
    theta = numpy.exp(p_host["log_threshold"])
    count = int((pi[0] > theta).sum())
    assert count >= 1
    params, x = to_xp(p_host, xp), asarray(x_host, xp, "float64")
    base = dict(bandwidth=0.5)
    out, cache = jumprelu.forward(params, x, sparsity_coeff=3.0, penalty="quadratic",
                                  target_l0=count, **base)
    assert float(out["sparsity"]) == 0.0 and float(out["loss"]) == float(out["mse"])
    assert numpy.all(to_numpy(cache["da_b"]) == 0.0)
    g = jumprelu.backward(params, cache)
    ref_out, ref_cache = jumprelu.forward(params, x, sparsity_coeff=0.0, **base)
    ref = jumprelu.backward(params, ref_cache)
    for k in g:
        assert_close(g[k], ref[k], XP64_RTOL, GOLDEN64_ATOL, k)
    # one active latent more or less per token: the penalty is lambda * (2/L0*) per token
    for target in (count - 1, count + 1):
        if target > 0:
            o, _ = jumprelu.forward(params, x, sparsity_coeff=3.0, penalty="quadratic",
                                    target_l0=target, **base)
            assert numpy.isclose(float(o["sparsity"]), 3.0 * 2.0 / target, rtol=1e-14)


def test_raw_and_log_thresholds_agree(xp):
    rng = numpy.random.default_rng(9)
    p_host, x_host = problem("jumprelu", rng, 20, 5, 16)
    x = asarray(x_host, xp, "float64")
    hyper = dict(sparsity_coeff=0.4, bandwidth=0.4, penalty="quadratic", target_l0=3.0,
                 freq_coeff=0.5, freq_target=0.2)
    lo, glog = jumprelu.loss_and_grads(to_xp(p_host, xp), x, **hyper)
    lr, graw = jumprelu.loss_and_grads(to_xp(raw_params(p_host), xp), x, **hyper)
    assert float(lo) == float(lr)
    theta = numpy.exp(p_host["log_threshold"])
    assert_close(graw["threshold"] * theta, glog["log_threshold"], XP64_RTOL, GOLDEN64_ATOL,
                 "d/d log theta = theta d/d theta")
    assert numpy.count_nonzero(to_numpy(graw["threshold"])) > 0


def test_init_threshold_param(xp):
    p = jumprelu.init(4, 9, xp=xp, threshold_param="raw", threshold_init=0.01)
    assert tuple(p) == jumprelu.PARAM_NAMES_RAW
    assert numpy.all(to_numpy(p["threshold"]) == numpy.float32(0.01))
    q = jumprelu.init(4, 9, xp=xp)
    assert tuple(q) == jumprelu.PARAM_NAMES
    numpy.testing.assert_array_equal(to_numpy(p["W_dec"]), to_numpy(q["W_dec"]))
    with pytest.raises(ValueError, match="threshold_param"):
        jumprelu.init(4, 9, threshold_param="exp")
    x = xp.zeros((2, 4), dtype="float32")
    with pytest.raises(ValueError, match="target_l0"):
        jumprelu.forward(p, x, sparsity_coeff=1.0, penalty="quadratic")
    with pytest.raises(ValueError, match="penalty must be"):
        jumprelu.forward(p, x, sparsity_coeff=1.0, penalty="l1")
    with pytest.raises(TypeError, match="the options are"):
        jumprelu.forward(p, x, sparsity_coeff=1.0, target=3)


@HSETTINGS
@given(B=st.integers(1, 24), D=st.integers(1, 8), M=st.integers(1, 40), seed=seeds,
       density=st.floats(0.0, 0.5), lam=st.floats(0.0, 1.0), opts=options, raw=st.booleans())
def test_recipe_sparse_path_equals_plain(B, D, M, seed, density, lam, opts, raw):
    rng = numpy.random.default_rng(seed)
    p, x = problem("jumprelu", rng, B, D, M)
    pi = numpy.maximum(x @ p["W_enc"] - p["b_dec"] @ p["W_enc"] + p["b_enc"], 0.0)  # (B, M)
    bandwidth = 0.2
    theta = numpy.quantile(pi, 1.0 - density, axis=0) + rng.uniform(-0.3, 0.3, M) * bandwidth
    theta = numpy.where(rng.random(M) < 0.15, 0.3 * bandwidth, numpy.maximum(theta, 1e-3))
    p["log_threshold"] = numpy.log(theta)
    if raw:
        p = raw_params(p)
    hyper = dict(sparsity_coeff=lam, bandwidth=bandwidth, **opts)
    assert_paths_agree(jumprelu, p, x, hyper)


@HSETTINGS
@given(shape=shapes, seed=seeds, data=st.data(), lam=st.floats(0.0, 2.0), opts=options,
       raw=st.booleans(), bandwidth=st.floats(0.05, 1.0), offsets_seed=seeds)
def test_matryoshka_jumprelu_gradients_and_ramp_identity(xp, shape, seed, data, lam, opts, raw,
                                                          bandwidth, offsets_seed):
    """Matryoshka over nested prefixes: true gradients by finite differences, and the theta
    pseudo-gradient against the ramp identity (the jump's height theta enters every prefix
    reconstruction that contains the latent)."""
    B, D, M = shape
    inner = sorted(set(data.draw(st.lists(st.integers(1, M), min_size=1, max_size=3), label="sizes")))
    prefixes = tuple(inner)
    sizes = common.check_prefixes(prefixes, M, "test")
    rng = numpy.random.default_rng(seed)
    p_host, x_host = problem("jumprelu", rng, B, D, M)
    pi = numpy.maximum(jumprelu_pre(p_host, x_host, True), 0.0)  # (B, M)
    off_rng = numpy.random.default_rng(offsets_seed)
    b_star = off_rng.integers(0, B, M)
    near = pi[b_star, numpy.arange(M)] + off_rng.uniform(-0.5, 0.5, M) * bandwidth  # (M,)
    theta = numpy.where(near > 0.01, near, numpy.exp(p_host["log_threshold"]))  # (M,)
    p_host["log_threshold"] = numpy.log(theta)
    theta = numpy.exp(p_host["log_threshold"])
    half = 0.5 * bandwidth
    for edge in (theta - half, theta + half):
        assume(numpy.all(numpy.abs(pi - edge) > KINK_MARGIN))
    pre = jumprelu_pre(p_host, x_host, True)
    kinks_clear = numpy.all(numpy.abs(pre - theta) > KINK_MARGIN) and numpy.all(numpy.abs(pre) > KINK_MARGIN)
    assume(opts["freq_coeff"] == 0.0 or freq_kinks_clear(pi, theta, opts["freq_target"]))
    if raw:
        p_host = raw_params(p_host)
    params, x = to_xp(p_host, xp), asarray(x_host, xp, "float64")
    hyper = dict(sparsity_coeff=lam, bandwidth=bandwidth, prefixes=prefixes, **opts)
    out, cache = jumprelu.forward(params, x, **hyper)
    grads = jumprelu.backward(params, cache)
    f = to_numpy(out["f"])
    W, b = p_host["W_dec"], p_host["b_dec"]

    def recon(fm):
        return sum(((x_host - (fm[:, :m] @ W[:m] + b)) ** 2).sum() / B for m in sizes)

    assert numpy.isclose(float(out["loss"]) - float(out["sparsity"]) - float(out["freq"]), recon(f),
                         rtol=1e-12, atol=1e-12)
    if kinks_clear:
        def loss_fn(ps):
            return float(jumprelu.forward(ps, x, **hyper)[0]["loss"])
        fd_check(loss_fn, params, grads, ["W_enc", "b_enc", "W_dec", "b_dec"], rng,
                 f"matryoshka {prefixes}")
    # theta: the reconstruction part of the ramp identity (the penalties' parts are tested above)
    l0_b, p_i = (pi > theta).sum(axis=1), (pi > theta).mean(axis=0)

    def ramp(th):
        return numpy.clip((pi - th) / bandwidth + 0.5, 0.0, 1.0)

    def ramp_loss(th):
        moved = ramp(th) - ramp(theta)
        l0 = l0_b + moved.sum(axis=1)
        pen = lam * l0.mean() if opts["penalty"] == "l0" else \
            (lam * 2.0 / opts["target_l0"] * (l0 - opts["target_l0"]) ** 2).mean()
        over = numpy.maximum(p_i + moved.mean(axis=0) - opts["freq_target"], 0.0)
        return recon(f + theta * moved) + pen + opts["freq_coeff"] * (over ** 2).sum()

    dtheta_fd = numpy.array([(ramp_loss(theta + FD_STEP * e) - ramp_loss(theta - FD_STEP * e))
                             / (2.0 * FD_STEP) for e in numpy.eye(M)])
    dtheta = to_numpy(grads["threshold"]) if raw else to_numpy(grads["log_threshold"]) / theta
    numpy.testing.assert_allclose(dtheta, dtheta_fd, rtol=FD_RTOL,
                                  atol=FD_ATOL * max(1.0, abs(ramp_loss(theta))))
    if xp is numpy:
        assert_paths_agree(jumprelu, p_host, x_host, hyper)


def test_matryoshka_jumprelu_single_prefix_is_the_plain_loss(xp):
    rng = numpy.random.default_rng(8)
    p_host, x_host = problem("jumprelu", rng, 12, 5, 10)
    params, x = to_xp(p_host, xp), asarray(x_host, xp, "float64")
    hyper = dict(sparsity_coeff=0.3, bandwidth=0.5, penalty="quadratic", target_l0=2.0)
    paths = ["dense"] + (["sparse"] if xp is numpy else [])
    for path in paths:
        plain = jumprelu.loss_and_grads(params, x, path=path, **hyper)
        one = jumprelu.loss_and_grads(params, x, path=path, prefixes=(10,), **hyper)
        assert float(one[0]) == float(plain[0])
        for k in plain[1]:
            numpy.testing.assert_array_equal(to_numpy(one[1][k]), to_numpy(plain[1][k]))
    with pytest.raises(ValueError, match="prefixes"):
        jumprelu.forward(params, x, prefixes=(4, 3), **hyper)


# ----------------------------------------------------------------------------------------------
# SAELens' options: tanh penalty, pre-activation loss on dead latents, STE to the input


@HSETTINGS
@given(shape=shapes, seed=seeds, lam=st.floats(0.0, 2.0), tanh=st.booleans(),
       pre_act=st.sampled_from([0.0, 0.8]), ste=st.booleans(), raw=st.booleans(),
       bandwidth=st.floats(0.05, 1.0), offsets_seed=seeds, dead_seed=seeds)
def test_saelens_options_against_the_ramp_surrogate(xp, shape, seed, lam, tanh, pre_act, ste, raw,
                                                    bandwidth, offsets_seed, dead_seed):
    """Every step replaced by its ramp, displaced from the base point: in theta (the threshold's
    pseudo-derivative) and, with ste_to_input, in pi (the straight-through gradient to the input).
    The surrogate's true gradients, by finite differences, must equal backward's for every
    parameter; the tanh and pre-activation terms are smooth and enter as they are."""
    B, D, M = shape
    rng = numpy.random.default_rng(seed)
    p_host, x_host = problem("jumprelu", rng, B, D, M)
    pre0 = jumprelu_pre(p_host, x_host, True)  # (B, M)
    pi0 = numpy.maximum(pre0, 0.0)
    off_rng = numpy.random.default_rng(offsets_seed)
    near = pi0[off_rng.integers(0, B, M), numpy.arange(M)] + off_rng.uniform(-0.5, 0.5, M) * bandwidth
    theta = numpy.where(near > 0.01, near, numpy.exp(p_host["log_threshold"]))  # (M,)
    p_host["log_threshold"] = numpy.log(theta)
    theta = numpy.exp(p_host["log_threshold"])
    half = 0.5 * bandwidth
    for edge in (theta - half, theta + half):
        assume(numpy.all(numpy.abs(pi0 - edge) > KINK_MARGIN))
    assume(numpy.all(numpy.abs(pre0) > KINK_MARGIN) and numpy.all(numpy.abs(pre0 - theta) > KINK_MARGIN))
    dead = numpy.random.default_rng(dead_seed).random(M) < 0.5  # (M,)
    if raw:
        p_host = raw_params(p_host)
    params, x = to_xp(p_host, xp), asarray(x_host, xp, "float64")
    hyper = dict(sparsity_coeff=lam, bandwidth=bandwidth, penalty="tanh" if tanh else "l0", tanh_scale=1.7,
                 pre_act_coeff=pre_act, dead_mask=asarray(dead, xp), ste_to_input=ste)
    out, cache = jumprelu.forward(params, x, **hyper)
    grads = jumprelu.backward(params, cache)
    a0 = (pi0 > theta).astype(float)  # (B, M)

    def ramp(u):
        return numpy.clip(u / bandwidth + 0.5, 0.0, 1.0)

    def surrogate(ps):
        ps = {k: to_numpy(v) for k, v in ps.items()}
        th = ps["threshold"] if raw else numpy.exp(ps["log_threshold"])  # (M,)
        pre = (x_host - ps["b_dec"]) @ ps["W_enc"] + ps["b_enc"]  # (B, M)
        pi = numpy.maximum(pre, 0.0)
        # the step moved by the ramp in theta always, and in pi only with ste_to_input
        pi_step = pi if ste else pi0
        moved = ramp(pi_step - th) - ramp(pi0 - theta)  # (B, M), 0 at the base point
        f = pi * a0 + theta * moved  # (B, M): the jump of height theta spread by the ramp
        xhat = f @ ps["W_dec"] + ps["b_dec"]
        norms = numpy.linalg.norm(ps["W_dec"], axis=1)  # (M,)
        loss = ((x_host - xhat) ** 2).sum() / B
        if tanh:
            loss += lam * numpy.tanh(1.7 * f * norms).sum() / B
        else:
            loss += lam * (a0 + moved).sum() / B
        if pre_act:
            loss += pre_act * (numpy.maximum(th - pre, 0.0)[:, dead] * norms[dead]).sum() / B
        return float(loss)

    assert numpy.isclose(surrogate(params), float(out["loss"]), rtol=1e-12, atol=1e-12)
    names = list(p_host)
    fd_check(surrogate, params, grads, names, rng, f"tanh={tanh} pre_act={pre_act} ste={ste} raw={raw}")
    if xp is numpy:  # auto falls back to the dense path; sparse is refused
        _, g_auto = jumprelu.loss_and_grads(params, x, **hyper)
        for k in names:
            numpy.testing.assert_array_equal(g_auto[k], grads[k])
        if tanh or pre_act or ste:
            with pytest.raises(ValueError, match="dense path only"):
                jumprelu.loss_and_grads(params, x, path="sparse", **hyper)
