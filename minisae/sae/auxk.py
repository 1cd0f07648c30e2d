"""AuxK (Gao et al. 2024, arXiv 2406.04093, Sec. A.2): the auxiliary loss TopK and BatchTopK SAEs
(minisae/sae/topk.py, batchtopk.py) and the latent-sharded step (minisae/dist/sharded.py) add to
revive dead latents.

Dimensions: B tokens, D = d_in, M latents, Nd dead latents, Ka = k' = min(aux_k, Nd).

    z_aux = ReLU(TopK_k'(pi restricted to the dead latents))   (`select`)
    ehat  = z_aux @ W_dec[dead]                                 (no bias)
    aux   = mean_b sum_d (e - ehat)^2,  e = sg(x - xhat)        (`forward`)

e is the main reconstruction's residual, a constant for the gradient (stop-gradient): aux trains
the dead latents' encoder columns and decoder rows only (`backward`). The caller adds
alpha * aux to its loss (alpha = aux_coeff, 1/32 in the paper). `sparse_step` is the same math on
the NumPy row-sparse path, for the few dead latents that are positive.
"""

import numpy

from minisae.sae.common import scatter_rows, squared_error, squared_error_backward, top_k
from minisae.sae.sparse import (by_column, column_sums, sampled_matmul, sparse_from_mask,
                                sparse_matmul, sparse_t_matmul)
from minisae.xp import xp_of

SPARSE_MAX_DENSITY = 0.04  # sparse_step holds z_aux as entries up to this fraction of B*Nd

__all__ = ["dead_indices", "relu_top_k", "select", "forward", "backward", "sparse_step"]


def dead_indices(dead_mask, M, xp):
    """The indices (Nd,) of the dead latents: dead_mask a bool array (M,), or None (none dead)."""
    if dead_mask is None:
        return xp.zeros((0,), dtype=xp.int64)
    dead_mask = xp.asarray(dead_mask)
    if dead_mask.shape != (M,) or dead_mask.dtype != bool:
        raise ValueError(f"auxk dead_mask: expected a bool array of shape ({M},), found "
                         f"{dead_mask.dtype} {tuple(dead_mask.shape)}")
    return xp.flatnonzero(dead_mask)  # (Nd,)


def relu_top_k(a, k):
    """(B, M): ReLU of the top-k entries of each row of a (B, M) (`common.top_k`'s rule) at their
    columns, zeros elsewhere; NaN counts as -inf. The same as scattering max(vals, 0) at idx.

    A row with at most k positive entries keeps all of them, and its other kept entries are
    <= 0, so its result is max(a, 0) whatever the ties: no selection is needed. Only rows with
    more than k positive entries are selected. (AuxK's dead latents are rarely positive.)"""
    xp = xp_of(a)
    positive = a > 0.0  # (B, M); NaN is not positive
    out = xp.where(positive, a, a.dtype.type(0))  # (B, M)
    crowded = xp.flatnonzero(xp.count_nonzero(positive, axis=1) > k)  # (R,) rows to select in
    if crowded.size:
        idx, vals = top_k(a[crowded], k)  # (R, K), (R, K)
        out[crowded] = scatter_rows(xp.maximum(vals, 0.0), idx, a.shape[1])
    return out


def select(pi, dead, aux_k):
    """z_aux (B, Nd) = ReLU(TopK_k'(pi[:, dead])), k' = min(aux_k, #dead)."""
    pi_dead = xp_of(pi).take(pi, dead, axis=1)  # (B, Nd) = pi[:, dead], C-ordered (faster than
    # pi[:, dead], whose result is laid out by columns)
    return relu_top_k(pi_dead, min(aux_k, dead.shape[0]))  # (B, Nd)


def forward(z_aux, err, W_dec, dead):
    """AuxK: z_aux (B, Nd) = `select`, the top-k' of the dead latents, reconstruct the
    (constant) residual err = x - xhat. Returns aux = mean_b sum_d (err - ehat)^2 and the cache
    `backward` needs."""
    ehat = z_aux @ W_dec[dead]  # (B, Nd) @ (Nd, D) -> (B, D), no bias
    aux, err_aux = squared_error(err, ehat)
    return aux, {"dead": dead, "z_aux": z_aux, "err_aux": err_aux}


def backward(aux_cache, W_dec, aux_coeff):
    """(dW_dec rows of the dead latents (Nd, D), dpi on the dead columns (B, Nd)) of
    alpha * aux; the target err is a constant (stop-gradient), so xhat gets nothing."""
    xp = xp_of(W_dec)
    dead, z_aux = aux_cache["dead"], aux_cache["z_aux"]
    # forward was: aux = sum_bd (err - ehat)^2 / B, ehat = z_aux @ W_dec[dead]
    dehat = squared_error_backward(aux_cache["err_aux"], aux_coeff)  # (B, D)
    dW_dead = z_aux.T @ dehat  # (Nd, B) @ (B, D) -> (Nd, D)
    dz_aux = dehat @ W_dec[dead].T  # (B, D) @ (D, Nd) -> (B, Nd)
    # forward was: z_aux = ReLU(TopK_k'(pi[:, dead])); only the kept positive entries, which
    # are exactly the entries where z_aux > 0, pass gradient
    return dW_dead, xp.where(z_aux > 0.0, dz_aux, dz_aux.dtype.type(0))  # (Nd, D), (B, Nd)


# ----------------------------------------------------------------------------------------------
# fast path (NumPy): z_aux held as its entries when few are positive


def sparse_step(pi, err, W_dec, x_c, dead, aux_k, aux_coeff):
    """AuxK's loss and gradients on the sparse path (NumPy): (aux, (latents (U,), dW_dec rows
    (U, D), dW_enc rows (U, D) = its columns transposed, db_enc (U,))) to add at those latents.
    The same math as `forward` + `backward`. z_aux has an entry only where a kept
    dead latent is positive; with at most SPARSE_MAX_DENSITY * B * Nd of them they are held as
    entries and only the latents that have one (U of them) get gradient rows; else it is dense."""
    B, Nd = pi.shape[0], dead.shape[0]
    z_aux = select(pi, dead, aux_k)  # (B, Nd)
    if numpy.count_nonzero(z_aux) > SPARSE_MAX_DENSITY * B * Nd:  # dense products, dead columns
        aux, cache = forward(z_aux, err, W_dec, dead)
        dW_dead, dpi_dead = backward(cache, W_dec, aux_coeff)  # (Nd, D), (B, Nd)
        return aux, (dead, dW_dead, dpi_dead.T @ x_c, dpi_dead.sum(axis=0))
    rows, j, rowptr, flat = sparse_from_mask(z_aux > 0.0)  # (Na,) token, position in the dead list
    used, col = numpy.unique(j, return_inverse=True)  # (U,) positions that occur; (Na,) into used
    latent_ids = dead[used]  # (U,) global latent indices, ascending
    vals = z_aux.ravel()[flat]  # (Na,) all > 0
    ehat = sparse_matmul(rowptr, latent_ids[col], vals, W_dec)  # (B, Nd) @ (Nd, D) -> (B, D), no bias
    aux, err_aux = squared_error(err, ehat)
    # backward, as in `backward`: every stored entry is a kept positive one
    dehat = squared_error_backward(err_aux, aux_coeff)  # (B, D)
    grouped = by_column(rows, col, B, used.shape[0])
    daux = sampled_matmul(rowptr, latent_ids[col], dehat, W_dec)  # (Na,) = (dehat @ W_dec[dead].T) there
    dW_dead, dW_enc_rows = sparse_t_matmul(rows, col, used.shape[0], [(vals, dehat), (daux, x_c)],
                                           grouped=grouped)  # (U, D) each
    return aux, (latent_ids, dW_dead, dW_enc_rows, column_sums(col, daux, used.shape[0], pi.dtype))
