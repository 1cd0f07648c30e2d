"""The Gated SAE's fast paths: the same math as minisae/sae/gated.py's `forward` +
`backward`, which stay the readable reference; tests hold these equal to them
(tests/test_sae_invariants.py: sparse ≡ plain; tests/test_fast_paths.py: fast dense ≡ plain, bitwise).

Dimensions: B tokens, D = d_in, M = d_sae latents, N open gates.

`forward_backward` computes the shared product pre = (x - b_dec) @ W_enc once, then
- the row-sparse path, when at most SPARSE_MAX_DENSITY of the B*M gates are open
  (pi_gate = pre + b_gate > 0): forward and backward touch only those N entries
  (minisae.sae.sparse's products; dW_dec on a second thread, minisae.threads);
- else (and always on CuPy) the dense path on that same pre, reusing its (B, M) buffers in place.
"""

import numpy

from minisae.sae.common import fire_counts, scalar, squared_error, squared_error_backward
from minisae.sae.sparse import (by_column, column_sums, entries_above, sampled_matmul,
                                sparse_fire_counts, sparse_matmul, sparse_t_matmul)
from minisae.threads import in_background
from minisae.xp import xp_of

SPARSE_MAX_DENSITY = 0.06  # the sparse path is taken up to this fraction of B*M gates open


def forward_backward(params, x, sparsity_coeff, *, path, dense_f):
    """(out, grads) of gated.forward / backward for checked x (B, D) and lambda `sparsity_coeff`.
    path: "dense", "sparse" (NumPy only) or "auto" (sparse on NumPy when few gates are open)."""
    x_c = x - params["b_dec"]  # (B, D)
    pre = x_c @ params["W_enc"]  # (B, D) @ (D, M) -> (B, M)
    if path == "dense" or xp_of(x) is not numpy:
        return _dense(params, x, x_c, pre, sparsity_coeff)
    limit = None if path == "sparse" else int(SPARSE_MAX_DENSITY * pre.size)
    gate = entries_above(pre, -params["b_gate"], limit)  # pi_gate = pre + b_gate > 0, exactly
    if gate is not None:  # None: too many open for the sparse path
        del pre  # (B, M): the sparse path needs only the open gates' entries
        return _sparse(params, x, x_c, gate, sparsity_coeff, dense_f)
    return _dense(params, x, x_c, pre, sparsity_coeff)


# ----------------------------------------------------------------------------------------------
# dense path on the shared product: gated.forward + backward, with df and the gate's
# gradient overwritten in place


def _dense(params, x, x_c, pre, sparsity_coeff):
    xp = xp_of(x)
    W_enc, W_dec, b_dec = params["W_enc"], params["W_dec"], params["b_dec"]
    B, dtype = x.shape[0], x.dtype
    scale = xp.exp(params["r_mag"])  # (M,)
    pi_gate = pre + params["b_gate"]  # (B, M)
    pi_mag = pre * scale + params["b_mag"]  # (B, M)
    gate = pi_gate > 0.0  # (B, M)
    f = gate * xp.maximum(pi_mag, 0.0)  # (B, M)
    xhat = f @ W_dec + b_dec  # (B, D)
    mse, err = squared_error(x, xhat)
    relu_gate = xp.maximum(pi_gate, 0.0)  # (B, M)
    l1 = relu_gate.sum() / B
    xhat_frozen = relu_gate @ W_dec + b_dec  # (B, D)
    aux, err_frozen = squared_error(x, xhat_frozen)
    # backward, as in gated.backward
    dxhat = squared_error_backward(err)  # (B, D)
    dW_dec = f.T @ dxhat  # (M, D)
    db_dec = dxhat.sum(axis=0)  # (D,)
    df = dxhat @ W_dec.T  # (B, M)
    dpi_mag = xp.multiply(df, gate & (pi_mag > 0.0), out=df)  # (B, M) in place
    dxhat_frozen = squared_error_backward(err_frozen)  # (B, D)
    drelu_gate = dxhat_frozen @ W_dec.T  # (B, M)
    drelu_gate += sparsity_coeff / B  # (B, M)
    dpi_gate = xp.multiply(drelu_gate, gate, out=drelu_gate)  # (B, M) in place
    db_gate = dpi_gate.sum(axis=0)  # (M,)
    db_mag = dpi_mag.sum(axis=0)  # (M,)
    dr_mag = (dpi_mag * pre).sum(axis=0) * scale  # (M,)
    dpre = xp.multiply(dpi_mag, scale, out=dpi_mag)  # (B, M) in place
    dpre += dpi_gate  # (B, M)
    dW_enc = x_c.T @ dpre  # (D, M)
    db_dec = db_dec - W_enc @ dpre.sum(axis=0)  # (D,)
    grads = {"W_enc": dW_enc, "b_gate": db_gate, "r_mag": dr_mag, "b_mag": db_mag,
             "W_dec": dW_dec, "b_dec": db_dec}
    out = {"loss": scalar(mse + sparsity_coeff * l1 + aux, dtype, xp),
           "mse": scalar(mse, dtype, xp), "l1": scalar(l1, dtype, xp),
           "aux": scalar(aux, dtype, xp),
           "l0": scalar(xp.count_nonzero(f) / B, dtype, xp), "f": f, "xhat": xhat,
           "fired": fire_counts(f)}
    return out, grads


# ----------------------------------------------------------------------------------------------
# sparse path (NumPy): the same math on the open gates only. Where a gate is shut, f,
# ReLU(pi_gate) and every gradient to pi_gate and pi_mag are zero: only the N open entries count.


def _sparse(params, x, x_c, gate, sparsity_coeff, dense_f):
    """gate = entries_above(pre, -b_gate): the N open gates of the batch, row-major."""
    W_enc, W_dec, b_dec = params["W_enc"], params["W_dec"], params["b_dec"]
    (B, M), dtype = (x.shape[0], W_enc.shape[1]), x.dtype
    scale = numpy.exp(params["r_mag"])  # (M,)
    rows, cols, rowptr, flat, pre_s = gate  # (N,) (N,) (B + 1,) (N,) (N,)
    relu_gate_s = pre_s + params["b_gate"][cols]  # (N,) = pi_gate > 0 on open gates
    pi_mag_s = pre_s * scale[cols] + params["b_mag"][cols]  # (N,)
    f_s = numpy.maximum(pi_mag_s, 0.0)  # (N,)
    xhat = sparse_matmul(rowptr, cols, f_s, W_dec) + b_dec  # (B, M) @ (M, D) -> (B, D)
    mse, err = squared_error(x, xhat)
    l1 = relu_gate_s.sum() / B
    xhat_frozen = sparse_matmul(rowptr, cols, relu_gate_s, W_dec) + b_dec  # (B, D)
    aux, err_frozen = squared_error(x, xhat_frozen)
    # backward, as in gated.backward
    dxhat = squared_error_backward(err)  # (B, D)
    dxhat_frozen = squared_error_backward(err_frozen)  # (B, D)
    # dW_dec needs only f and dxhat: computed on another thread while the sampled products run here
    grouped = by_column(rows, cols, B, M)  # the entries by latent, for both transposed products
    dW_dec = in_background(sparse_t_matmul, rows, cols, M, [(f_s, dxhat)], grouped=grouped)  # [(M, D)]
    df_s, dpi_gate_s = sampled_matmul(rowptr, cols, [dxhat, dxhat_frozen], W_dec)  # 2 x (N,)
    dpi_mag_s = df_s * (pi_mag_s > 0.0)  # (N,)
    dpi_gate_s += sparsity_coeff / B
    dpre_s = dpi_mag_s * scale[cols] + dpi_gate_s  # (N,)
    dW_enc = sparse_t_matmul(rows, cols, M, [(dpre_s, x_c)], transposed=(0,), grouped=grouped)[0]  # (D, M)
    db_dec = dxhat.sum(axis=0) - W_enc @ column_sums(cols, dpre_s, M, dtype)  # (D,)
    grads = {"W_enc": dW_enc,
             "b_gate": column_sums(cols, dpi_gate_s, M, dtype),
             "r_mag": column_sums(cols, dpi_mag_s * pre_s, M, dtype) * scale,
             "b_mag": column_sums(cols, dpi_mag_s, M, dtype), "W_dec": dW_dec.result()[0],
             "b_dec": db_dec}
    out = {"loss": scalar(mse + sparsity_coeff * l1 + aux, dtype, numpy),
           "mse": scalar(mse, dtype, numpy), "l1": scalar(l1, dtype, numpy),
           "aux": scalar(aux, dtype, numpy),
           "l0": scalar(numpy.count_nonzero(f_s) / B, dtype, numpy), "xhat": xhat,
           "fired": sparse_fire_counts(cols, f_s, M)}
    if dense_f:
        out["f"] = numpy.zeros((B, M), dtype=dtype)  # (B, M)
        out["f"].ravel()[flat] = f_s
    return out, grads
