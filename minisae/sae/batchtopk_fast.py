"""The BatchTopK SAE's fast path (NumPy): the same math as minisae/sae/batchtopk.py's `forward` +
`backward`, which stay the readable reference, with z held as its N kept entries (row-major);
AuxK as on TopK's fast path (auxk.sparse_step); with Matryoshka prefixes each segment's entries
are handled in turn. minisae.sae.sparse's products; dW_dec on a second thread (minisae.threads).
A test holds it equal to the plain path (tests/test_sae_batchtopk.py).

Dimensions: B tokens, D = d_in, M = d_sae latents, N = floor(B * k) kept entries.
"""

import numpy

from minisae.sae import auxk
from minisae.sae.common import (batch_topk_mask, min_kept, prefix_decoder_gradients,
                                prefix_squared_error, scalar, sparse_prefix_decode,
                                sparse_prefix_decoder_grad, sparse_prefix_parts,
                                sparse_prefix_sampled)
from minisae.sae.sparse import (by_column, column_sums, sparse_fire_counts, sparse_from_mask,
                                sparse_t_matmul)
from minisae.threads import in_background

SPARSE_MAX_DENSITY = 0.04  # the sparse path is taken when k <= this fraction of M


def forward_backward(params, x, n_keep, aux_k, aux_coeff, dead, prefixes, *, dense_f):
    """(out, grads) of batchtopk.forward / backward for checked NumPy x (B, D) and options
    (n_keep = floor(B * k) entries kept; dead: the dead latents' indices (Nd,))."""
    W_enc, W_dec, b_dec = params["W_enc"], params["W_dec"], params["b_dec"]
    (B, D), M, dtype = x.shape, W_enc.shape[1], x.dtype
    x_c = x - b_dec  # (B, D)
    pi = x_c @ W_enc  # (B, D) @ (D, M) -> (B, M)
    pi += params["b_enc"]  # (B, M)
    rows, cols, rowptr, flat = sparse_from_mask(batch_topk_mask(pi, n_keep))  # (N,) ... (B + 1,)
    pi_s = pi.ravel()[flat]  # (N,)
    passes_s = pi_s > 0.0  # (N,)
    z_s = pi_s * passes_s  # (N,)
    parts = sparse_prefix_parts(rows, cols, rowptr, B, M, prefixes)  # per segment
    xhats = sparse_prefix_decode(parts, cols, z_s, W_dec, b_dec)  # S x (B, D)
    total, mse, errs = prefix_squared_error(x, xhats)  # mse: the full SAE's
    aux, aux_grads = 0.0, None
    if dead.shape[0] > 0:
        aux, aux_grads = auxk.sparse_step(pi, errs[-1], W_dec, x_c, dead, aux_k, aux_coeff)
    # backward, as in batchtopk.backward
    G = prefix_decoder_gradients(errs, prefixes)  # S x (B, D)
    # dW_dec needs only z and G: computed on another thread while the sampled product runs here
    grouped = by_column(rows, cols, B, M)  # the entries by latent, for both transposed products
    dW_dec = in_background(sparse_prefix_decoder_grad, parts, rows, cols, z_s, G, W_dec, grouped)  # (M, D)
    dpi_s = sparse_prefix_sampled(parts, cols, G, W_dec) * passes_s  # (N,)
    dW_enc_t = sparse_t_matmul(rows, cols, M, [(dpi_s, x_c)], grouped=grouped)[0]  # (M, D)
    dW_dec = dW_dec.result()  # (M, D)
    db_enc = column_sums(cols, dpi_s, M, dtype)  # (M,)
    if aux_grads is not None:  # forward was: loss = total + alpha * aux
        latents, dW_aux, dW_enc_aux, db_aux = aux_grads  # (U,), (U, D), (U, D), (U,)
        dW_dec[latents] += dW_aux  # (U, D)
        dW_enc_t[latents] += dW_enc_aux  # (U, D)
        db_enc[latents] += db_aux  # (U,)
    db_dec = G[0].sum(axis=0) - W_enc @ db_enc  # (D,)
    grads = {"W_enc": numpy.ascontiguousarray(dW_enc_t.T), "b_enc": db_enc, "W_dec": dW_dec,
             "b_dec": db_dec}
    n_pos = numpy.count_nonzero(z_s)  # kept entries through the ReLU
    out = {"loss": scalar(total + aux_coeff * aux, dtype, numpy), "mse": scalar(mse, dtype, numpy),
           "matryoshka": scalar(total - mse, dtype, numpy), "aux": scalar(aux, dtype, numpy),
           "l0": scalar(n_pos / B, dtype, numpy), "min_kept": min_kept(z_s, n_pos, numpy, dtype),
           "xhat": xhats[-1],
           "fired": sparse_fire_counts(cols, z_s, M)}
    if dense_f:
        out["f"] = numpy.zeros((B, M), dtype=dtype)  # (B, M)
        out["f"].ravel()[flat] = z_s
    return out, grads
