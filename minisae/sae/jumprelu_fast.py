"""JumpReLU's fast paths: the same math as minisae/sae/jumprelu.py's `forward` +
`backward`, which stay the readable reference; tests hold these equal to them
(tests/test_sae_invariants.py, test_sae_recipes.py: sparse ≡ plain; fast dense ≡ plain, bitwise).

Dimensions: B tokens, D = d_in, M = d_sae latents, N stored entries.

`forward_backward` computes the encoder's product pre = x_c @ W_enc + b_enc once, then
- the row-sparse path, when at most SPARSE_MAX_DENSITY of the B*M entries are active or in the
  kernel window (pi > theta - eps/2): forward and backward touch only those N entries
  (minisae.sae.sparse's products; dW_dec on a second thread, minisae.threads);
- else (and always on CuPy) the dense path on that same pre, with the backward's df reused in
  place for dpre.
The SAELens options (penalty="tanh", pre_act_coeff, ste_to_input) are not here:
jumprelu.forward_backward runs them through the plain path.
"""

import numpy

from minisae.sae.common import (fire_counts, prefix_decode, prefix_decoder_gradients,
                                prefix_squared_error, scalar, segments, sparse_prefix_decode,
                                sparse_prefix_decoder_grad, sparse_prefix_parts,
                                sparse_prefix_sampled)
from minisae.sae.penalties import (dtheta_ste, frequency_penalty, kernel_da_sum, kernel_window,
                                   sparsity_penalty)
from minisae.sae.sparse import (by_column, column_sums, entries_above, sparse_fire_counts,
                                sparse_t_matmul)
from minisae.threads import in_background
from minisae.xp import xp_of

SPARSE_MAX_DENSITY = 0.06  # the sparse path is taken up to this fraction of B*M entries stored


def forward_backward(params, x, h, theta, raw, *, path, dense_f):
    """(out, grads) of jumprelu.forward / backward for checked x (B, D) and options h
    (jumprelu.Hyper, without the SAELens options); theta (M,) the threshold, raw True when the
    params hold `threshold` itself. path: "dense", "sparse" (NumPy only) or "auto" (sparse on
    NumPy when few entries are stored)."""
    x_c = x - params["b_dec"] if h.pre_enc_bias else x  # (B, D)
    pre = x_c @ params["W_enc"]  # (B, D) @ (D, M) -> (B, M)
    pre += params["b_enc"]  # (B, M)
    if path == "dense" or xp_of(x) is not numpy:
        return _dense(params, x, x_c, pre, h, theta, raw)
    limit = None if path == "sparse" else int(SPARSE_MAX_DENSITY * pre.size)
    stored = entries_above(pre, _stored_from(theta, h.bandwidth, pre.dtype), limit)  # None: too many
    if stored is not None:
        del pre  # (B, M): the sparse path needs only the stored entries
        return _sparse(params, x, x_c, stored, h, theta, raw, dense_f)
    return _dense(params, x, x_c, pre, h, theta, raw)


# ----------------------------------------------------------------------------------------------
# dense path on the shared product: jumprelu.forward + backward without the SAELens options,
# overwriting pre and df in place


def _dense(params, x, x_c, pre, h, theta, raw):
    xp = xp_of(x)
    W_enc, W_dec = params["W_enc"], params["W_dec"]
    (B, M), dtype = pre.shape, x.dtype
    pi = xp.maximum(pre, 0.0, out=pre)  # (B, M) ReLU, in place
    active = pi > theta  # (B, M)
    f = pi * active  # (B, M)
    xhats = prefix_decode(f, W_dec, params["b_dec"], h.prefixes)  # S x (B, D)
    total, mse, errs = prefix_squared_error(x, xhats)
    l0_b = active.sum(axis=1, dtype=dtype)  # (B,)
    sparsity, da_b = sparsity_penalty(l0_b, h, xp)  # (B,)
    freq, da_i = 0.0, None
    if h.freq_coeff > 0.0:
        freq, da_i = frequency_penalty(active.sum(axis=0, dtype=dtype), h, B)  # (M,)
    # backward, as in jumprelu.backward
    G = prefix_decoder_gradients(errs, h.prefixes)  # S x (B, D)
    dW_dec = xp.empty_like(W_dec)  # (M, D)
    df = xp.empty_like(f)  # (B, M)
    for (s, e), G_s in zip(segments(h.prefixes), G):
        dW_dec[s:e] = f[:, s:e].T @ G_s  # (m, B) @ (B, D) -> (m, D)
        df[:, s:e] = G_s @ W_dec[s:e].T  # (B, D) @ (D, m) -> (B, m)
    db_dec = G[0].sum(axis=0)  # (D,)
    window = kernel_window(pi, theta, h.bandwidth)  # (B, M)
    dtheta = dtheta_ste(xp.where(window, df, 0.0).sum(axis=0), kernel_da_sum(window, da_b, da_i, theta.dtype),
                        theta, h.bandwidth)  # (M,)
    dpre = xp.multiply(df, active, out=df)  # (B, M) in place
    dW_enc = x_c.T @ dpre  # (D, B) @ (B, M) -> (D, M)
    db_enc = dpre.sum(axis=0)  # (M,)
    if h.pre_enc_bias:
        db_dec = db_dec - W_enc @ db_enc  # (D, M) @ (M,) -> (D,)
    grads = {"W_enc": dW_enc, "b_enc": db_enc, "W_dec": dW_dec, "b_dec": db_dec}
    grads["threshold" if raw else "log_threshold"] = dtheta if raw else theta * dtheta
    out = {"loss": scalar(total + sparsity + freq, dtype, xp), "mse": scalar(mse, dtype, xp),
           "matryoshka": scalar(total - mse, dtype, xp), "l0": scalar(l0_b.sum() / B, dtype, xp),
           "sparsity": scalar(sparsity, dtype, xp), "freq": scalar(freq, dtype, xp),
           "pre_act": scalar(0.0, dtype, xp), "f": f, "xhat": xhats[-1], "fired": fire_counts(f)}
    return out, grads


# ----------------------------------------------------------------------------------------------
# sparse path: the same math, touching only the entries that are active or in the window


def _stored_from(theta, bandwidth, dtype):
    """lo (M,): the stored entries are those with pre > lo, where pi = ReLU(pre) is active or in
    the kernel window, i.e. pi > theta - eps/2. Where theta - eps/2 >= 0 that is
    pre > theta - eps/2; where it is < 0, every entry (lo = -inf)."""
    lo = theta - 0.5 * bandwidth  # (M,)
    return numpy.where(lo < 0.0, -numpy.inf, lo).astype(dtype)  # (M,)


def _sparse(params, x, x_c, stored, h, theta, raw, dense_f):
    """stored = entries_above(pre, lo): the N stored entries of the batch, row-major."""
    W_enc, W_dec, b_dec = params["W_enc"], params["W_dec"], params["b_dec"]
    (B, M), dtype = (x.shape[0], W_enc.shape[1]), x.dtype
    # forward, on the N stored entries (row-major): pi, a = H(pi - theta), f
    rows, cols, rowptr, flat, pre_s = stored  # (N,) (N,) (B + 1,) (N,) (N,)
    pi_s = numpy.maximum(pre_s, 0.0)  # (N,)
    theta_s = theta[cols]  # (N,)
    active_s = pi_s > theta_s  # (N,)
    f_s = pi_s * active_s  # (N,)
    parts = sparse_prefix_parts(rows, cols, rowptr, B, M, h.prefixes)  # per segment
    xhats = sparse_prefix_decode(parts, cols, f_s, W_dec, b_dec)  # S x (B, D)
    total, mse, errs = prefix_squared_error(x, xhats)  # mse: the full SAE's
    l0_b = numpy.bincount(rows[active_s], minlength=B).astype(dtype)  # (B,)
    sparsity, da_b = sparsity_penalty(l0_b, h, numpy)  # (B,)
    freq, da_i = 0.0, None
    if h.freq_coeff > 0.0:
        freq, da_i = frequency_penalty(column_sums(cols, active_s, M, dtype), h, B)  # (M,)
    # backward, as in `backward`; entries outside the stored set have df * a = 0 and K = 0
    G = prefix_decoder_gradients(errs, h.prefixes)  # S x (B, D)
    # dW_dec needs only f and G: computed on another thread while the sampled product runs here
    grouped = by_column(rows, cols, B, M)  # the entries by latent, for both transposed products
    dW_dec = in_background(sparse_prefix_decoder_grad, parts, rows, cols, f_s, G, W_dec, grouped)  # (M, D)
    df_s = sparse_prefix_sampled(parts, cols, G, W_dec)  # (N,) = (G @ W_dec.T)[rows, cols]
    window_s = kernel_window(pi_s, theta_s, h.bandwidth)  # (N,)
    window_da = column_sums(cols, numpy.where(window_s, da_b[rows], 0.0), M, dtype)  # (M,)
    if da_i is not None:
        window_da += da_i * column_sums(cols, window_s, M, dtype)  # (M,)
    dtheta = dtheta_ste(column_sums(cols, df_s * window_s, M, dtype), window_da, theta, h.bandwidth)
    dpre_s = df_s * active_s  # (N,)
    dW_enc = sparse_t_matmul(rows, cols, M, [(dpre_s, x_c)], transposed=(0,), grouped=grouped)[0]  # (D, M)
    db_enc = column_sums(cols, dpre_s, M, dtype)  # (M,)
    db_dec = G[0].sum(axis=0)  # (D,)
    if h.pre_enc_bias:
        db_dec = db_dec - W_enc @ db_enc  # (D, M) @ (M,) -> (D,)
    grads = {"W_enc": dW_enc, "b_enc": db_enc, "W_dec": dW_dec.result(), "b_dec": db_dec}
    grads["threshold" if raw else "log_threshold"] = dtheta if raw else theta * dtheta
    out = {"loss": scalar(total + sparsity + freq, dtype, numpy), "mse": scalar(mse, dtype, numpy),
           "matryoshka": scalar(total - mse, dtype, numpy), "l0": scalar(l0_b.sum() / B, dtype, numpy),
           "sparsity": scalar(sparsity, dtype, numpy), "freq": scalar(freq, dtype, numpy),
           "pre_act": scalar(0.0, dtype, numpy), "xhat": xhats[-1],
           "fired": sparse_fire_counts(cols, f_s, M)}
    if dense_f:
        out["f"] = numpy.zeros((B, M), dtype=dtype)  # (B, M)
        out["f"].ravel()[flat] = f_s
    return out, grads
