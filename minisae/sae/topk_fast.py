"""The TopK SAE's fast path (NumPy): the same math as minisae/sae/topk.py's `forward` + `backward`,
which stay the readable reference, with z held as its k kept entries per row (N = B * K) and
AuxK's z_aux held as its entries too when it has few (auxk.sparse_step; dead latents are rarely
positive). minisae.sae.sparse's products; dW_dec on a second thread (minisae.threads). A test
holds it equal to the plain path (tests/test_sae_invariants.py).

Dimensions: B tokens, D = d_in, M = d_sae latents, K = k, N = B * K kept entries.
"""

import numpy

from minisae.sae import auxk
from minisae.sae.common import scalar, scatter_rows, squared_error, squared_error_backward, top_k
from minisae.sae.sparse import (by_column, column_sums, sampled_matmul, sparse_fire_counts,
                                sparse_matmul, sparse_t_matmul)
from minisae.threads import in_background

SPARSE_MAX_DENSITY = 0.04  # the sparse path is taken when k <= this fraction of M


def forward_backward(params, x, k, aux_k, aux_coeff, dead, *, dense_f):
    """(out, grads) of topk.forward / backward for checked NumPy x (B, D) and options
    (dead: the dead latents' indices (Nd,), auxk.dead_indices)."""
    W_enc, W_dec, b_dec = params["W_enc"], params["W_dec"], params["b_dec"]
    (B, D), M, dtype = x.shape, W_enc.shape[1], x.dtype
    x_c = x - b_dec  # (B, D)
    pi = x_c @ W_enc  # (B, D) @ (D, M) -> (B, M)
    pi += params["b_enc"]  # (B, M)
    idx, vals = top_k(pi, k)  # (B, K), (B, K)
    rows = numpy.repeat(numpy.arange(B), k)  # (N,) with N = B * K, row-major
    cols, rowptr = idx.ravel(), numpy.arange(B + 1) * k  # (N,), (B + 1,)
    z_s = numpy.maximum(vals, 0.0).ravel()  # (N,)
    xhat = sparse_matmul(rowptr, cols, z_s, W_dec) + b_dec  # (B, M) @ (M, D) -> (B, D)
    mse, err = squared_error(x, xhat)
    aux, aux_grads = 0.0, None
    if dead.shape[0] > 0:
        aux, aux_grads = auxk.sparse_step(pi, err, W_dec, x_c, dead, aux_k, aux_coeff)
    del pi  # (B, M): the backward does not need it (peak memory)
    loss = scalar(mse + aux_coeff * aux, dtype, numpy)
    # backward, as in topk.backward
    dxhat = squared_error_backward(err)  # (B, D)
    # dW_dec needs only z and dxhat: computed on another thread while the sampled product runs here
    grouped = by_column(rows, cols, B, M)  # the entries by latent, for both transposed products
    dW_dec = in_background(sparse_t_matmul, rows, cols, M, [(z_s, dxhat)], grouped=grouped)  # [(M, D)]
    dpi_s = sampled_matmul(rowptr, cols, dxhat, W_dec) * (vals.ravel() > 0.0)  # (N,)
    dW_enc = sparse_t_matmul(rows, cols, M, [(dpi_s, x_c)], transposed=(0,), grouped=grouped)[0]  # (D, M)
    dW_dec = dW_dec.result()[0]  # (M, D)
    db_enc = column_sums(cols, dpi_s, M, dtype)  # (M,)
    if aux_grads is not None:  # forward was: loss = mse + alpha * aux
        latents, dW_aux, dW_enc_aux, db_aux = aux_grads  # (U,), (U, D), (U, D), (U,)
        dW_dec[latents] += dW_aux  # (U, D)
        dW_enc[:, latents] += dW_enc_aux.T  # (D, U)
        db_enc[latents] += db_aux  # (U,)
    db_dec = dxhat.sum(axis=0) - W_enc @ db_enc  # (D,)
    grads = {"W_enc": dW_enc, "b_enc": db_enc, "W_dec": dW_dec, "b_dec": db_dec}
    out = {"loss": loss, "mse": scalar(mse, dtype, numpy), "aux": scalar(aux, dtype, numpy),
           "l0": scalar(numpy.count_nonzero(z_s) / B, dtype, numpy), "xhat": xhat,
           "fired": sparse_fire_counts(cols, z_s, M)}
    if dense_f:
        out["f"] = scatter_rows(numpy.maximum(vals, 0.0), idx, M)  # (B, M)
    return out, grads
