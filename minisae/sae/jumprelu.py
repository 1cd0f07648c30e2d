"""JumpReLU SAE (Rajamanoharan et al. 2024, arXiv 2407.14435): forward, hand-written backward.

Dimensions: B tokens in the batch, D = d_in, M = d_sae latents, N stored entries (sparse path).

    x_c  = x - b_dec                  (pre-encoder bias; option pre_enc_bias, on by default)
    pi   = ReLU(x_c @ W_enc + b_enc)  (the paper's pseudo-code keeps this ReLU)
    f    = pi * H(pi - theta)         (JumpReLU; H(u) = 1 if u > 0 else 0, strict)
    xhat = f @ W_dec + b_dec
    loss = mean_b [ sum_d (x - xhat)^2 + lambda * sum_i H(pi_i - theta_i) ]

theta = exp(log_threshold) > 0; log_threshold is the trained parameter. The loss is piecewise
constant in theta, so theta learns from *pseudo*-derivatives (a kernel-density estimate of the
derivative of the expected loss); everything else gets its true gradient, and the L0 term
trains theta only. The derivation, line by line, is docs/derivations/jumprelu.md.

`forward` + `backward` are the plain, dense reference. `forward_backward` and `loss_and_grads`
run the same math on a row-sparse path on NumPy when few latents fire
(`_forward_backward_sparse`, at the bottom); a test holds the two equal.
"""

import math

import numpy

from minisae.sae.common import (as_input, check_params, column_sums, decode, fire_counts,
                                init_dictionary, sampled_matmul, scalar, sparse_fire_counts,
                                sparse_from_mask, sparse_matmul, sparse_t_matmul, squared_error,
                                squared_error_backward)
from minisae.xp import xp_of

ARCHITECTURE = "jumprelu"
PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "log_threshold")
THRESHOLD_INIT = 0.001  # theta at init (Gemma Scope recipe)
SPARSE_MAX_DENSITY = 0.025  # the sparse path is taken up to this fraction of B*M entries stored

__all__ = ["ARCHITECTURE", "PARAM_NAMES", "init", "encode", "decode", "forward", "backward",
           "forward_backward", "loss_and_grads", "dtheta_ste", "kernel_window"]


def init(d_in, d_sae, *, seed=0, xp=numpy, dtype="float32"):
    """Unit-norm He-uniform decoder rows, W_enc = W_dec^T, b_enc = b_dec = 0, theta = 0.001."""
    p = init_dictionary(d_in, d_sae, seed=seed, xp=xp, dtype=dtype)
    return {
        "W_enc": p["W_enc"],                                                   # (D, M)
        "b_enc": xp.zeros((d_sae,), dtype=dtype),                              # (M,)
        "W_dec": p["W_dec"],                                                   # (M, D)
        "b_dec": p["b_dec"],                                                   # (D,)
        "log_threshold": xp.full((d_sae,), math.log(THRESHOLD_INIT), dtype=dtype),  # (M,)
    }


def _check_hyper(sparsity_coeff, bandwidth):
    if not float(sparsity_coeff) >= 0.0:
        raise ValueError(f"jumprelu: expected sparsity_coeff >= 0, found {sparsity_coeff!r}")
    if not float(bandwidth) > 0.0:
        raise ValueError(f"jumprelu: expected bandwidth > 0, found {bandwidth!r}")


def _encoder_pre(params, x, pre_enc_bias):
    """x_c (B, D) and pre = x_c @ W_enc + b_enc (B, M), a fresh array later steps may overwrite."""
    x_c = x - params["b_dec"] if pre_enc_bias else x  # (B, D)
    pre = x_c @ params["W_enc"]  # (B, D) @ (D, M) -> (B, M)
    pre += params["b_enc"]  # (B, M)
    return x_c, pre


def encode(params, x, *, pre_enc_bias=True, sparsity_coeff=None, bandwidth=None):
    """f (B, M) for inputs x (B, D). sparsity_coeff and bandwidth are accepted and unused."""
    check_params(params, PARAM_NAMES, ARCHITECTURE)
    x = as_input(params, x, ARCHITECTURE)
    xp = xp_of(x)
    _, pre = _encoder_pre(params, x, pre_enc_bias)
    pi = xp.maximum(pre, 0.0, out=pre)  # (B, M)
    theta = xp.exp(params["log_threshold"])  # (M,)
    return pi * (pi > theta)  # (B, M)


# ----------------------------------------------------------------------------------------------
# plain forward / backward


def forward(params, x, *, sparsity_coeff, bandwidth=0.001, pre_enc_bias=True):
    """(out, cache): out has loss, mse, l0 (0-d), f (B, M), xhat (B, D)."""
    check_params(params, PARAM_NAMES, ARCHITECTURE)
    _check_hyper(sparsity_coeff, bandwidth)
    x = as_input(params, x, ARCHITECTURE)
    x_c, pre = _encoder_pre(params, x, pre_enc_bias)
    return _forward_from_pre(params, x, x_c, pre, float(sparsity_coeff), float(bandwidth),
                             bool(pre_enc_bias))


def _forward_from_pre(params, x, x_c, pre, sparsity_coeff, bandwidth, pre_enc_bias):
    xp = xp_of(x)
    B, dtype = x.shape[0], x.dtype
    pi = xp.maximum(pre, 0.0, out=pre)  # (B, M) ReLU, in place
    theta = xp.exp(params["log_threshold"])  # (M,)
    active = pi > theta  # (B, M) H(pi - theta), strict
    f = pi * active  # (B, M)
    xhat = f @ params["W_dec"] + params["b_dec"]  # (B, M) @ (M, D) -> (B, D)
    mse, err = squared_error(x, xhat)
    l0 = scalar(xp.count_nonzero(active) / B, dtype, xp)  # mean_b sum_i H(pi - theta)
    mse = scalar(mse, dtype, xp)
    loss = scalar(mse + sparsity_coeff * l0, dtype, xp)
    out = {"loss": loss, "mse": mse, "l0": l0, "f": f, "xhat": xhat}
    cache = {"x_c": x_c, "pi": pi, "theta": theta, "active": active, "f": f, "err": err,
             "sparsity_coeff": sparsity_coeff, "bandwidth": bandwidth, "pre_enc_bias": pre_enc_bias}
    return out, cache


def kernel_window(pi, theta, bandwidth):
    """K((pi - theta)/eps) as a boolean: the rectangle kernel, 1 on the open interval
    (-1/2, 1/2), i.e. theta - eps/2 < pi < theta + eps/2."""
    half = 0.5 * bandwidth
    return (pi > theta - half) & (pi < theta + half)


def dtheta_ste(window_df_sum, window_count, theta, sparsity_coeff, bandwidth, batch):
    """Pseudo-derivative of the loss in theta: *not the derivative of the forward* (which is 0
    almost everywhere in theta), but a kernel-density estimate of the derivative of the
    expected loss. Per entry, with K the rectangle kernel and eps the bandwidth,

        d JumpReLU_theta(pi) / d theta := -(theta / eps) K((pi - theta) / eps)
        d H(pi - theta)      / d theta := -(1 / eps)     K((pi - theta) / eps)

    so dL/dtheta_i = -(1/eps) * [theta_i * sum_b K_bi dL/df_bi + (lambda/B) * sum_b K_bi].
    Takes the two column sums (M,) and returns dL/dtheta (M,).
    """
    return (theta * window_df_sum + (sparsity_coeff / batch) * window_count) * (-1.0 / bandwidth)


def backward(params, cache):
    """Gradients of forward's loss: true ones for W_enc, b_enc, W_dec, b_dec; for log_threshold
    the pseudo-derivative of `dtheta_ste` (chained through theta = exp(log_threshold))."""
    xp = xp_of(cache["f"])
    W_enc, W_dec = params["W_enc"], params["W_dec"]
    x_c, pi, theta, active, f = (cache[k] for k in ("x_c", "pi", "theta", "active", "f"))
    B = f.shape[0]
    # forward was: loss = mse + lambda * l0, mse = sum_bd (x - xhat)^2 / B
    dxhat = squared_error_backward(cache["err"])  # (B, D)
    # forward was: xhat = f @ W_dec + b_dec
    dW_dec = f.T @ dxhat  # (M, B) @ (B, D) -> (M, D)
    db_dec = dxhat.sum(axis=0)  # (D,)
    df = dxhat @ W_dec.T  # (B, D) @ (D, M) -> (B, M)
    # forward was: f = pi * H(pi - theta), l0 = mean_b sum_i H(pi - theta); the theta part
    window = kernel_window(pi, theta, cache["bandwidth"])  # (B, M)
    dtheta = dtheta_ste(xp.where(window, df, 0.0).sum(axis=0),  # (M,)
                        window.sum(axis=0, dtype=theta.dtype),  # (M,)
                        theta, cache["sparsity_coeff"], cache["bandwidth"], B)
    # ... and the pi part: d f/d pi = H(pi - theta); the L0 step passes nothing to pi
    dpi = xp.multiply(df, active, out=df)  # (B, M)
    # forward was: pi = ReLU(pre); where H(pi - theta) = 1, pre = pi > theta > 0, so ReLU' = 1
    dpre = dpi  # (B, M)
    # forward was: pre = x_c @ W_enc + b_enc
    dW_enc = x_c.T @ dpre  # (D, B) @ (B, M) -> (D, M)
    db_enc = dpre.sum(axis=0)  # (M,)
    if cache["pre_enc_bias"]:
        # forward was: x_c = x - b_dec; sum_b d x_c = (sum_b dpre) @ W_enc^T
        db_dec = db_dec - W_enc @ db_enc  # (D, M) @ (M,) -> (D,)
    # forward was: theta = exp(log_threshold)
    dlog_threshold = theta * dtheta  # (M,)
    return {"W_enc": dW_enc, "b_enc": db_enc, "W_dec": dW_dec, "b_dec": db_dec,
            "log_threshold": dlog_threshold}


def forward_backward(params, x, *, sparsity_coeff, bandwidth=0.001, pre_enc_bias=True,
                     path="auto", dense_f=True):
    """(out, grads): forward's out and backward's grads in one call. path: "dense" (forward
    then backward), "sparse" (NumPy only), or "auto": sparse on NumPy when at most
    SPARSE_MAX_DENSITY of the batch's entries are active or in the kernel window, else dense.
    The sparse path builds the dense out["f"] (one (B, M) scatter) only when dense_f is true.
    out also has "fired" (M,) int64: on how many of the batch's tokens each latent fired."""
    if path not in ("auto", "dense", "sparse"):
        raise ValueError(f"jumprelu.forward_backward: path must be 'auto', 'dense' or 'sparse', "
                         f"found {path!r}")
    check_params(params, PARAM_NAMES, ARCHITECTURE)
    _check_hyper(sparsity_coeff, bandwidth)
    x = as_input(params, x, ARCHITECTURE)
    xp = xp_of(x)
    if path == "sparse" and xp is not numpy:
        raise ValueError("jumprelu.forward_backward: path='sparse' runs on NumPy arrays only; "
                         f"found {xp.__name__} arrays (use 'auto' or 'dense')")
    hyper = (float(sparsity_coeff), float(bandwidth), bool(pre_enc_bias))
    x_c, pre = _encoder_pre(params, x, pre_enc_bias)
    if xp is numpy and path != "dense":
        stored = _stored_mask(pre, numpy.exp(params["log_threshold"]), hyper[1])  # (B, M)
        if path == "sparse" or numpy.count_nonzero(stored) <= SPARSE_MAX_DENSITY * stored.size:
            return _forward_backward_sparse(params, x, x_c, pre, stored, *hyper, dense_f)
    out, cache = _forward_from_pre(params, x, x_c, pre, *hyper)
    out["fired"] = fire_counts(out["f"])  # (M,)
    return out, backward(params, cache)


def loss_and_grads(params, x, *, sparsity_coeff, bandwidth=0.001, pre_enc_bias=True, path="auto"):
    """(loss, grads) of `forward` / `backward`, through `forward_backward` (same paths)."""
    out, grads = forward_backward(params, x, sparsity_coeff=sparsity_coeff, bandwidth=bandwidth,
                                  pre_enc_bias=pre_enc_bias, path=path, dense_f=False)
    return out["loss"], grads


# ----------------------------------------------------------------------------------------------
# sparse path (NumPy): the same math, touching only the entries that are active or in the window


def _stored_mask(pre, theta, bandwidth):
    """(B, M) True where pi = ReLU(pre) is active or in the kernel window, i.e. pi > theta - eps/2.
    Where theta - eps/2 >= 0 that is pre > theta - eps/2; where it is < 0, every entry."""
    lo = theta - 0.5 * bandwidth  # (M,)
    return pre > numpy.where(lo < 0.0, -numpy.inf, lo).astype(pre.dtype)  # (B, M)


def _forward_backward_sparse(params, x, x_c, pre, stored, sparsity_coeff, bandwidth, pre_enc_bias,
                             dense_f):
    W_enc, W_dec, b_dec = params["W_enc"], params["W_dec"], params["b_dec"]
    (B, M), dtype = pre.shape, x.dtype
    theta = numpy.exp(params["log_threshold"])  # (M,)
    # forward, on the N stored entries (row-major): pi, H(pi - theta), f
    rows, cols, rowptr, flat = sparse_from_mask(stored)  # (N,) (N,) (B + 1,) (N,)
    pi_s = numpy.maximum(pre.ravel()[flat], 0.0)  # (N,)
    theta_s = theta[cols]  # (N,)
    active_s = pi_s > theta_s  # (N,)
    f_s = pi_s * active_s  # (N,)
    xhat = sparse_matmul(rowptr, cols, f_s, W_dec) + b_dec  # (B, M) @ (M, D) -> (B, D)
    mse, err = squared_error(x, xhat)
    l0 = scalar(numpy.count_nonzero(active_s) / B, dtype, numpy)
    loss = scalar(mse + sparsity_coeff * l0, dtype, numpy)
    # backward, as in `backward`; entries outside the stored set have df * H = 0 and K = 0
    dxhat = squared_error_backward(err)  # (B, D)
    df_s = sampled_matmul(rowptr, cols, dxhat, W_dec)  # (N,) = (dxhat @ W_dec.T)[rows, cols]
    window_s = kernel_window(pi_s, theta_s, bandwidth)  # (N,)
    dtheta = dtheta_ste(column_sums(cols, df_s * window_s, M, dtype),  # (M,)
                        column_sums(cols, window_s, M, dtype),  # (M,)
                        theta, sparsity_coeff, bandwidth, B)
    dpre_s = df_s * active_s  # (N,)
    dW_dec, dW_enc_t = sparse_t_matmul(rows, cols, M, [(f_s, dxhat), (dpre_s, x_c)])  # (M, D) x2
    db_enc = column_sums(cols, dpre_s, M, dtype)  # (M,)
    db_dec = dxhat.sum(axis=0)  # (D,)
    if pre_enc_bias:
        db_dec = db_dec - W_enc @ db_enc  # (D, M) @ (M,) -> (D,)
    grads = {"W_enc": numpy.ascontiguousarray(dW_enc_t.T), "b_enc": db_enc, "W_dec": dW_dec,
             "b_dec": db_dec, "log_threshold": theta * dtheta}
    out = {"loss": loss, "mse": scalar(mse, dtype, numpy), "l0": l0, "xhat": xhat,
           "fired": sparse_fire_counts(cols, f_s, M)}
    if dense_f:
        out["f"] = numpy.zeros((B, M), dtype=dtype)  # (B, M)
        out["f"].ravel()[flat] = f_s
    return out, grads
