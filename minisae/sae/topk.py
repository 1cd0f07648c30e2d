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

The AuxK term (minisae/sae/auxk.py, shared with BatchTopK) is zero when no latent is dead
(dead_mask None or all False). TopK and ReLU pass gradient only through the kept entries; among
entries tied at the k-th value the lowest columns are kept (`minisae.sae.common.top_k`, exact,
without partitioning whole rows).
The derivation, line by line, is docs/derivations/topk.md.

`forward` + `backward` are the plain, dense reference. `forward_backward` and `loss_and_grads`
run the same math on a row-sparse path on NumPy when k is a small fraction of M
(minisae/sae/topk_fast.py); a test holds the two equal.
"""

import numpy

from minisae.sae import auxk, topk_fast
from minisae.sae.common import (as_input, check_params, decode, fire_counts, geometric_median,
                                init_dictionary, scalar, scatter_rows, squared_error,
                                squared_error_backward, top_k)
from minisae.xp import xp_of

ARCHITECTURE = "topk"
PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")

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


def encode(params, x, *, k):
    """z (B, M) for inputs x (B, D)."""
    check_params(params, PARAM_NAMES, ARCHITECTURE)
    x = as_input(params, x, ARCHITECTURE)
    xp = xp_of(x)
    k = _check_k(k, params["W_enc"].shape[1], "k")
    pi = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]  # (B, D) @ (D, M) -> (B, M)
    idx, vals = topk_rows(pi, k)  # (B, K), (B, K)
    return scatter_rows(xp.maximum(vals, 0.0), idx, pi.shape[1])  # (B, M)


def _check_hyper(params, k, aux_k, aux_coeff, dead_mask, xp):
    M = params["W_enc"].shape[1]
    if int(aux_k) != aux_k or int(aux_k) < 1:
        raise ValueError(f"topk: expected aux_k an integer >= 1, found {aux_k!r}")
    return _check_k(k, M, "k"), int(aux_k), float(aux_coeff), auxk.dead_indices(dead_mask, M, xp)


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
    z = scatter_rows(xp.maximum(vals, 0.0), idx, M)  # (B, M)
    xhat = z @ params["W_dec"] + params["b_dec"]  # (B, M) @ (M, D) -> (B, D)
    mse, err = squared_error(x, xhat)
    cache = {"x_c": x_c, "z": z, "idx": idx, "vals": vals, "err": err, "aux_coeff": aux_coeff,
             "aux": None}
    aux = 0.0  # zero when no latent is dead
    if dead.shape[0] > 0:
        aux, cache["aux"] = auxk.forward(auxk.select(pi, dead, aux_k), err, params["W_dec"], dead)
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
    dpi = scatter_rows(dvals, idx, M)  # (B, M)
    if cache["aux"] is not None:  # forward was: loss = mse + alpha * aux
        dead = cache["aux"]["dead"]  # (Nd,) distinct indices
        dW_dead, dpi_dead = auxk.backward(cache["aux"], W_dec, cache["aux_coeff"])
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
    topk_fast.SPARSE_MAX_DENSITY * M (topk_fast). The sparse path builds the dense out["f"] only
    when dense_f.
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
    if xp is numpy and (path == "sparse" or (path == "auto" and k <= topk_fast.SPARSE_MAX_DENSITY * M)):
        check_params(params, PARAM_NAMES, ARCHITECTURE)
        x = as_input(params, x, ARCHITECTURE)
        return topk_fast.forward_backward(params, x, *_check_hyper(params, k, aux_k, aux_coeff, dead_mask, numpy),
                                          dense_f=dense_f)
    out, cache = forward(params, x, **hyper)
    out["fired"] = fire_counts(out["f"])  # (M,)
    return out, backward(params, cache)


def loss_and_grads(params, x, *, k, aux_k=512, aux_coeff=1.0 / 32, dead_mask=None, path="auto"):
    """(loss, grads) of `forward` / `backward`, through `forward_backward` (same paths)."""
    out, grads = forward_backward(params, x, k=k, aux_k=aux_k, aux_coeff=aux_coeff,
                                  dead_mask=dead_mask, path=path, dense_f=False)
    return out["loss"], grads
