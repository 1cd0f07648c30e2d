"""TopK SAE with AuxK (Gao et al. 2024, arXiv 2406.04093): forward, hand-written backward.

Dimensions: B tokens in the batch, D = d_in, M = d_sae latents, K = k kept per token,
Nd dead latents, Ka = k' = min(aux_k, Nd) kept per token among the dead ones.

    pi    = (x - b_dec) @ W_enc + b_enc          (b_dec is the paper's b_pre)
    z     = ReLU(TopK_k(pi))                     (keep the k largest per row, zero the rest)
    xhat  = z @ W_dec + b_dec
    e     = sg(x - xhat)                         (AuxK target, a constant for the gradient)
    z_aux = ReLU(TopK_k'(pi restricted to the dead latents))
    ehat  = z_aux @ W_dec[dead]                  (no bias)
    loss  = mean_b sum_d (x - xhat)^2 + alpha * mean_b sum_d (e - ehat)^2

The AuxK term is zero when no latent is dead (dead_mask None or all False). TopK and ReLU pass
gradient only through the kept entries; among entries tied at the k-th value the lowest
columns are kept (`minisae.sae.common.top_k`, exact, without partitioning whole rows).
The derivation, line by line, is docs/derivations/topk.md.

`forward` + `backward` are the plain, dense reference. `forward_backward` and `loss_and_grads`
run the same math on a row-sparse path on NumPy when k is a small fraction of M
(`_forward_backward_sparse`, at the bottom); a test holds the two equal.
"""

import numpy

from minisae.sae.common import (as_input, check_params, decode, fire_counts, geometric_median,
                                init_dictionary, scalar, squared_error, squared_error_backward,
                                top_k)
from minisae.sae.sparse import (by_column, column_sums, sampled_matmul, sparse_fire_counts,
                                sparse_from_mask, sparse_matmul, sparse_t_matmul)
from minisae.threads import in_background
from minisae.xp import xp_of

ARCHITECTURE = "topk"
PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
SPARSE_MAX_DENSITY = 0.04  # the sparse path is taken when k <= this fraction of M

__all__ = ["ARCHITECTURE", "PARAM_NAMES", "init", "encode", "decode", "forward", "backward",
           "forward_backward", "loss_and_grads", "topk_rows"]


def init(d_in, d_sae, *, seed=0, xp=numpy, dtype="float32", sample=None):
    """Unit-norm He-uniform decoder rows, W_enc = W_dec^T, b_enc = 0; b_dec = the geometric
    median of `sample` (B, D) when one is given (the paper's init), else 0."""
    p = init_dictionary(d_in, d_sae, seed=seed, xp=xp, dtype=dtype)
    b_dec = p["b_dec"]  # (D,)
    if sample is not None:
        sample = xp.asarray(sample, dtype="float64")  # (B, D)
        if sample.ndim != 2 or sample.shape[1] != d_in:
            raise ValueError(f"topk.init: expected sample of shape (B, {d_in}), "
                             f"found {tuple(sample.shape)}")
        b_dec = xp.asarray(geometric_median(sample, xp=xp), dtype=dtype)  # (D,)
    return {"W_enc": p["W_enc"], "b_enc": xp.zeros((d_sae,), dtype=dtype),  # (D, M), (M,)
            "W_dec": p["W_dec"], "b_dec": b_dec}                           # (M, D), (D,)


def _check_k(k, n, what):
    if int(k) != k or not 1 <= int(k) <= n:
        raise ValueError(f"topk: expected {what} an integer in [1, {n}], found {k!r}")
    return int(k)


def topk_rows(pi, k):
    """(idx, vals): column indices (B, K) and values (B, K) of the k largest entries of each row
    of pi (B, M), ties to the lowest columns, columns ascending (`common.top_k`)."""
    return top_k(pi, k)  # (B, K), (B, K)


def _scatter_rows(values, idx, n_cols):
    """Dense (B, n_cols) with values (B, K) at columns idx (B, K) of each row, zeros elsewhere."""
    xp = xp_of(values)
    out = xp.zeros((values.shape[0], n_cols), dtype=values.dtype)  # (B, n_cols)
    out[xp.arange(values.shape[0])[:, None], idx] = values
    return out


def _dead_indices(dead_mask, M, xp):
    if dead_mask is None:
        return xp.zeros((0,), dtype=xp.int64)
    dead_mask = xp.asarray(dead_mask)
    if dead_mask.shape != (M,) or dead_mask.dtype != bool:
        raise ValueError(f"topk dead_mask: expected a bool array of shape ({M},), found "
                         f"{dead_mask.dtype} {tuple(dead_mask.shape)}")
    return xp.flatnonzero(dead_mask)  # (Nd,)


def encode(params, x, *, k):
    """z (B, M) for inputs x (B, D)."""
    check_params(params, PARAM_NAMES, ARCHITECTURE)
    x = as_input(params, x, ARCHITECTURE)
    xp = xp_of(x)
    k = _check_k(k, params["W_enc"].shape[1], "k")
    pi = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]  # (B, D) @ (D, M) -> (B, M)
    idx, vals = topk_rows(pi, k)  # (B, K), (B, K)
    return _scatter_rows(xp.maximum(vals, 0.0), idx, pi.shape[1])  # (B, M)


def _check_hyper(params, k, aux_k, aux_coeff, dead_mask, xp):
    M = params["W_enc"].shape[1]
    if int(aux_k) != aux_k or int(aux_k) < 1:
        raise ValueError(f"topk: expected aux_k an integer >= 1, found {aux_k!r}")
    return _check_k(k, M, "k"), int(aux_k), float(aux_coeff), _dead_indices(dead_mask, M, xp)


def relu_top_k(a, k):
    """(B, M): ReLU of the top-k entries of each row of a (B, M) (`topk_rows`' rule) at their
    columns, zeros elsewhere; NaN counts as -inf. The same as scattering max(vals, 0) at idx.

    A row with at most k positive entries keeps all of them, and its other kept entries are
    <= 0, so its result is max(a, 0) whatever the ties: no selection is needed. Only rows with
    more than k positive entries are selected. (AuxK's dead latents are rarely positive.)"""
    xp = xp_of(a)
    positive = a > 0.0  # (B, M); NaN is not positive
    out = xp.where(positive, a, a.dtype.type(0))  # (B, M)
    crowded = xp.flatnonzero(xp.count_nonzero(positive, axis=1) > k)  # (R,) rows to select in
    if crowded.size:
        idx, vals = topk_rows(a[crowded], k)  # (R, K), (R, K)
        out[crowded] = _scatter_rows(xp.maximum(vals, 0.0), idx, a.shape[1])
    return out


def _auxk_latents(pi, dead, aux_k):
    """z_aux (B, Nd) = ReLU(TopK_k'(pi[:, dead])), k' = min(aux_k, #dead)."""
    pi_dead = xp_of(pi).take(pi, dead, axis=1)  # (B, Nd) = pi[:, dead], C-ordered (faster than
    # pi[:, dead], whose result is laid out by columns)
    return relu_top_k(pi_dead, min(aux_k, dead.shape[0]))  # (B, Nd)


def _auxk_forward(z_aux, err, W_dec, dead):
    """AuxK: z_aux (B, Nd) = `_auxk_latents`, the top-k' of the dead latents, reconstruct the
    (constant) residual err = x - xhat. Returns aux = mean_b sum_d (err - ehat)^2 and the cache
    `_auxk_backward` needs."""
    ehat = z_aux @ W_dec[dead]  # (B, Nd) @ (Nd, D) -> (B, D), no bias
    aux, err_aux = squared_error(err, ehat)
    return aux, {"dead": dead, "z_aux": z_aux, "err_aux": err_aux}


def _auxk_backward(aux_cache, W_dec, aux_coeff):
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


def forward(params, x, *, k, aux_k=512, aux_coeff=1.0 / 32, dead_mask=None):
    """(out, cache): out has loss, mse, aux, l0 (0-d), f = z (B, M), xhat (B, D)."""
    check_params(params, PARAM_NAMES, ARCHITECTURE)
    x = as_input(params, x, ARCHITECTURE)
    xp = xp_of(x)
    (B, D), M, dtype = x.shape, params["W_enc"].shape[1], x.dtype
    k, aux_k, aux_coeff, dead = _check_hyper(params, k, aux_k, aux_coeff, dead_mask, xp)
    x_c = x - params["b_dec"]  # (B, D)
    pi = x_c @ params["W_enc"] + params["b_enc"]  # (B, D) @ (D, M) -> (B, M)
    idx, vals = topk_rows(pi, k)  # (B, K), (B, K)
    z = _scatter_rows(xp.maximum(vals, 0.0), idx, M)  # (B, M)
    xhat = z @ params["W_dec"] + params["b_dec"]  # (B, M) @ (M, D) -> (B, D)
    mse, err = squared_error(x, xhat)
    cache = {"x_c": x_c, "z": z, "idx": idx, "vals": vals, "err": err, "aux_coeff": aux_coeff,
             "aux": None}
    aux = 0.0  # zero when no latent is dead
    if dead.shape[0] > 0:
        aux, cache["aux"] = _auxk_forward(_auxk_latents(pi, dead, aux_k), err, params["W_dec"], dead)
    out = {"loss": scalar(mse + aux_coeff * aux, dtype, xp), "mse": scalar(mse, dtype, xp),
           "aux": scalar(aux, dtype, xp), "l0": scalar(xp.count_nonzero(z) / B, dtype, xp),
           "f": z, "xhat": xhat}
    return out, cache


def backward(params, cache):
    """True gradients of forward's loss, through the kept entries only."""
    xp = xp_of(cache["z"])
    W_enc, W_dec = params["W_enc"], params["W_dec"]
    x_c, z, idx, vals = (cache[k] for k in ("x_c", "z", "idx", "vals"))
    M = z.shape[1]
    # forward was: mse = sum_bd (x - xhat)^2 / B, xhat = z @ W_dec + b_dec
    dxhat = squared_error_backward(cache["err"])  # (B, D)
    dW_dec = z.T @ dxhat  # (M, B) @ (B, D) -> (M, D)
    db_dec = dxhat.sum(axis=0)  # (D,)
    dz = dxhat @ W_dec.T  # (B, D) @ (D, M) -> (B, M)
    # forward was: z = ReLU(TopK_k(pi)); only kept entries with a positive value pass gradient
    dvals = xp.take_along_axis(dz, idx, axis=1) * (vals > 0.0)  # (B, K)
    dpi = _scatter_rows(dvals, idx, M)  # (B, M)
    if cache["aux"] is not None:  # forward was: loss = mse + alpha * aux
        dead = cache["aux"]["dead"]  # (Nd,) distinct indices
        dW_dead, dpi_dead = _auxk_backward(cache["aux"], W_dec, cache["aux_coeff"])
        dW_dec[dead] += dW_dead  # (Nd, D)
        dpi[:, dead] += dpi_dead  # (B, Nd)
    # forward was: pi = x_c @ W_enc + b_enc
    dW_enc = x_c.T @ dpi  # (D, B) @ (B, M) -> (D, M)
    db_enc = dpi.sum(axis=0)  # (M,)
    # forward was: x_c = x - b_dec; sum_b d x_c = (sum_b dpi) @ W_enc^T
    db_dec = db_dec - W_enc @ db_enc  # (D, M) @ (M,) -> (D,)
    return {"W_enc": dW_enc, "b_enc": db_enc, "W_dec": dW_dec, "b_dec": db_dec}


def forward_backward(params, x, *, k, aux_k=512, aux_coeff=1.0 / 32, dead_mask=None,
                     path="auto", dense_f=True):
    """(out, grads): forward's out and backward's grads in one call. path: "dense" (forward
    then backward), "sparse" (NumPy only), or "auto": sparse on NumPy when k <=
    SPARSE_MAX_DENSITY * M. The sparse path builds the dense out["f"] only when dense_f.
    out also has "fired" (M,) int64: on how many of the batch's tokens each latent fired."""
    if path not in ("auto", "dense", "sparse"):
        raise ValueError(f"topk.forward_backward: path must be 'auto', 'dense' or 'sparse', "
                         f"found {path!r}")
    hyper = dict(k=k, aux_k=aux_k, aux_coeff=aux_coeff, dead_mask=dead_mask)
    xp = xp_of(params["W_enc"])
    if path == "sparse" and xp is not numpy:
        raise ValueError("topk.forward_backward: path='sparse' runs on NumPy arrays only; "
                         f"found {xp.__name__} arrays (use 'auto' or 'dense')")
    M = params["W_enc"].shape[1]
    if xp is numpy and (path == "sparse" or (path == "auto" and k <= SPARSE_MAX_DENSITY * M)):
        return _forward_backward_sparse(params, x, dense_f=dense_f, **hyper)
    out, cache = forward(params, x, **hyper)
    out["fired"] = fire_counts(out["f"])  # (M,)
    return out, backward(params, cache)


def loss_and_grads(params, x, *, k, aux_k=512, aux_coeff=1.0 / 32, dead_mask=None, path="auto"):
    """(loss, grads) of `forward` / `backward`, through `forward_backward` (same paths)."""
    out, grads = forward_backward(params, x, k=k, aux_k=aux_k, aux_coeff=aux_coeff,
                                  dead_mask=dead_mask, path=path, dense_f=False)
    return out["loss"], grads


# ----------------------------------------------------------------------------------------------
# sparse path (NumPy): the same math with z held as its k kept entries per row; AuxK's z_aux
# held as its entries too when it has few (dead latents are rarely positive)


def _auxk_step(pi, err, W_dec, x_c, dead, aux_k, aux_coeff):
    """AuxK's loss and gradients on the sparse path (NumPy): (aux, (latents (U,), dW_dec rows
    (U, D), dW_enc rows (U, D) = its columns transposed, db_enc (U,))) to add at those latents.
    The same math as `_auxk_forward` + `_auxk_backward`. z_aux has an entry only where a kept
    dead latent is positive; with at most SPARSE_MAX_DENSITY * B * Nd of them they are held as
    entries and only the latents that have one (U of them) get gradient rows; else it is dense."""
    B, Nd = pi.shape[0], dead.shape[0]
    z_aux = _auxk_latents(pi, dead, aux_k)  # (B, Nd)
    if numpy.count_nonzero(z_aux) > SPARSE_MAX_DENSITY * B * Nd:  # dense products, dead columns
        aux, cache = _auxk_forward(z_aux, err, W_dec, dead)
        dW_dead, dpi_dead = _auxk_backward(cache, W_dec, aux_coeff)  # (Nd, D), (B, Nd)
        return aux, (dead, dW_dead, dpi_dead.T @ x_c, dpi_dead.sum(axis=0))
    rows, j, rowptr, flat = sparse_from_mask(z_aux > 0.0)  # (Na,) token, position in the dead list
    used, col = numpy.unique(j, return_inverse=True)  # (U,) positions that occur; (Na,) into used
    latents = dead[used]  # (U,) global latent indices, ascending
    vals = z_aux.ravel()[flat]  # (Na,) all > 0
    ehat = sparse_matmul(rowptr, latents[col], vals, W_dec)  # (B, Nd) @ (Nd, D) -> (B, D), no bias
    aux, err_aux = squared_error(err, ehat)
    # backward, as in `_auxk_backward`: every stored entry is a kept positive one
    dehat = squared_error_backward(err_aux, aux_coeff)  # (B, D)
    grouped = by_column(rows, col, B, used.shape[0])
    daux = sampled_matmul(rowptr, latents[col], dehat, W_dec)  # (Na,) = (dehat @ W_dec[dead].T) there
    dW_dead, dW_enc_rows = sparse_t_matmul(rows, col, used.shape[0], [(vals, dehat), (daux, x_c)],
                                           grouped=grouped)  # (U, D) each
    return aux, (latents, dW_dead, dW_enc_rows, column_sums(col, daux, used.shape[0], pi.dtype))


def _forward_backward_sparse(params, x, *, k, aux_k, aux_coeff, dead_mask, dense_f):
    check_params(params, PARAM_NAMES, ARCHITECTURE)
    x = as_input(params, x, ARCHITECTURE)
    k, aux_k, aux_coeff, dead = _check_hyper(params, k, aux_k, aux_coeff, dead_mask, numpy)
    W_enc, W_dec, b_dec = params["W_enc"], params["W_dec"], params["b_dec"]
    (B, D), M, dtype = x.shape, W_enc.shape[1], x.dtype
    x_c = x - b_dec  # (B, D)
    pi = x_c @ W_enc  # (B, D) @ (D, M) -> (B, M)
    pi += params["b_enc"]  # (B, M)
    idx, vals = topk_rows(pi, k)  # (B, K), (B, K)
    rows = numpy.repeat(numpy.arange(B), k)  # (N,) with N = B * K, row-major
    cols, rowptr = idx.ravel(), numpy.arange(B + 1) * k  # (N,), (B + 1,)
    z_s = numpy.maximum(vals, 0.0).ravel()  # (N,)
    xhat = sparse_matmul(rowptr, cols, z_s, W_dec) + b_dec  # (B, M) @ (M, D) -> (B, D)
    mse, err = squared_error(x, xhat)
    aux, aux_grads = 0.0, None
    if dead.shape[0] > 0:
        aux, aux_grads = _auxk_step(pi, err, W_dec, x_c, dead, aux_k, aux_coeff)
    del pi  # (B, M): the backward does not need it (peak memory)
    loss = scalar(mse + aux_coeff * aux, dtype, numpy)
    # backward, as in `backward`
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
        out["f"] = _scatter_rows(numpy.maximum(vals, 0.0), idx, M)  # (B, M)
    return out, grads
