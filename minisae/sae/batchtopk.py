"""BatchTopK SAE (Bussmann et al. 2024, arXiv 2412.06410) with AuxK, optionally Matryoshka
(Bussmann et al. 2025, arXiv 2503.17547): forward, hand-written backward.

Dimensions: B tokens in the batch, D = d_in, M = d_sae latents, N = floor(B * k) entries kept in
the batch, S Matryoshka prefixes m_1 < ... < m_S = M (S = 1: the plain loss).

    pi     = (x - b_dec) @ W_enc + b_enc           (as TopK)
    kept   = the N largest entries of pi over the whole batch (not k per token)
    z      = ReLU(pi) on the kept entries, 0 elsewhere
    xhat_j = z[:, :m_j] @ W_dec[:m_j] + b_dec      (one reconstruction per prefix; xhat = xhat_S)
    loss   = sum_j mean_b ||x_b - xhat_j,b||^2 + alpha * AuxK

Ties: when several entries equal the N-th largest value, they are kept in row-major order (earlier
tokens first, then lower latent index) until exactly N are kept. Gradient flows only through the
kept entries with pi > 0 (ReLU and selection are locally constant elsewhere). AuxK is TopK's,
computed per token on the dead latents against the full reconstruction's residual
(`minisae.sae.auxk`).

Inference: BatchTopK's output depends on the other tokens of the batch, so a trained SAE is used
as a JumpReLU with one global threshold theta for every latent: f = pi * H(pi - theta) * H(pi).
theta is a running average of the smallest kept positive activation of each training batch
(`update_threshold`); the release file is a JumpReLU file with that threshold.

`forward` + `backward` are the plain, dense reference; `forward_backward` / `loss_and_grads` take a
row-sparse path on NumPy when k is a small fraction of M (minisae/sae/batchtopk_fast.py); a test
holds the two equal.
Derivation: docs/derivations/batchtopk.md (and matryoshka.md for the prefixes).
"""

import math
import numbers

import numpy

from minisae.errors import InputError
from minisae.sae import auxk, batchtopk_fast, topk
from minisae.sae.common import (as_input, batch_topk_mask, check_params, check_prefixes, decode,
                                fire_counts, min_kept, prefix_decode, prefix_decoder_gradients,
                                prefix_squared_error, scalar, segments)
from minisae.xp import xp_of

ARCHITECTURE = "batchtopk"
PARAM_NAMES = topk.PARAM_NAMES  # W_enc, b_enc, W_dec, b_dec
THRESHOLD_RATE = 0.01  # the running threshold's averaging rate after its first 1/rate steps

__all__ = ["ARCHITECTURE", "PARAM_NAMES", "init", "encode", "decode", "forward", "backward",
           "forward_backward", "loss_and_grads", "batch_topk_mask", "update_threshold",
           "inference_params"]


def init(d_in, d_sae, *, seed=0, xp=numpy, dtype="float32", sample=None):
    """As TopK's: unit-norm He-uniform decoder rows, W_enc = W_dec^T, b_enc = 0, b_dec the
    geometric median of `sample` when one is given."""
    return topk.init(d_in, d_sae, seed=seed, xp=xp, dtype=dtype, sample=sample)


def n_kept(k, batch, n_latents):
    """N = floor(B * k): how many entries the batch keeps (k may be fractional, 0 < k <= M)."""
    if isinstance(k, bool) or not (isinstance(k, numbers.Real) and 0 < k <= n_latents):
        raise InputError(f"batchtopk: expected k a number in (0, {n_latents}], found {k!r}")
    n = int(math.floor(k * batch))
    if n < 1:
        raise InputError(f"batchtopk: k={k} keeps floor(B * k) = 0 entries of a batch of B={batch}")
    return n


def _check_hyper(params, x, k, aux_k, aux_coeff, dead_mask, prefixes):
    M = params["W_enc"].shape[1]
    if int(aux_k) != aux_k or int(aux_k) < 1:
        raise InputError(f"batchtopk: expected aux_k an integer >= 1, found {aux_k!r}")
    return (n_kept(k, x.shape[0], M), int(aux_k), float(aux_coeff),
            auxk.dead_indices(dead_mask, M, xp_of(x)), check_prefixes(prefixes, M, ARCHITECTURE))


def encode(params, x, *, k=None, threshold=None):
    """f (B, M): with `threshold` the inference JumpReLU, pi * H(pi - threshold) * H(pi);
    without it the training selection (BatchTopK over this batch, needs k)."""
    check_params(params, PARAM_NAMES, ARCHITECTURE)
    x = as_input(params, x, ARCHITECTURE)
    xp = xp_of(x)
    pi = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]  # (B, D) @ (D, M) -> (B, M)
    if threshold is not None:  # the inference JumpReLU, as jumprelu.encode computes it
        pi = xp.maximum(pi, 0.0)  # (B, M)
        return pi * (pi > pi.dtype.type(threshold))  # (B, M)
    if k is None:
        raise InputError("batchtopk.encode: give k (training selection) or threshold (inference)")
    kept = batch_topk_mask(pi, n_kept(k, x.shape[0], pi.shape[1]))  # (B, M)
    return xp.where(kept, xp.maximum(pi, 0.0), 0.0)  # (B, M)


def update_threshold(threshold, n_updates, min_kept, rate=THRESHOLD_RATE):
    """(threshold, n_updates) after one training batch whose smallest kept positive activation
    is min_kept (a float; NaN = no positive entry kept, no update):

        n <- n + 1;   theta <- theta + max(1/n, rate) * (min_kept - theta)

    i.e. the plain mean of the first 1/rate batches (no bias towards the initial value), then an
    exponential moving average with weight `rate` on the newest batch (SAELens' update, 0.01).
    Plain Python floats, so a checkpoint restores it exactly."""
    min_kept = float(min_kept)
    if not math.isfinite(min_kept):
        return float(threshold), int(n_updates)
    n = int(n_updates) + 1
    return float(threshold) + max(1.0 / n, float(rate)) * (min_kept - float(threshold)), n


def inference_params(params, threshold):
    """The JumpReLU (raw threshold) params that compute the inference encoder: threshold theta
    for every latent; use with jumprelu (pre_enc_bias=True)."""
    xp = xp_of(params["W_enc"])
    M, dtype = params["W_enc"].shape[1], params["W_enc"].dtype
    return {**{n: params[n] for n in PARAM_NAMES},
            "threshold": xp.full((M,), float(threshold), dtype=dtype)}  # (M,)


# ----------------------------------------------------------------------------------------------
# plain forward / backward


def forward(params, x, *, k, aux_k=512, aux_coeff=1.0 / 32, dead_mask=None, prefixes=None):
    """(out, cache): out has loss, mse (the full SAE's), matryoshka (sum over the inner
    prefixes, 0 without them), aux, l0, min_kept (0-d), f = z (B, M), xhat (B, D)."""
    check_params(params, PARAM_NAMES, ARCHITECTURE)
    x = as_input(params, x, ARCHITECTURE)
    xp = xp_of(x)
    B, dtype = x.shape[0], x.dtype
    n_keep, aux_k, aux_coeff, dead, prefixes = _check_hyper(params, x, k, aux_k, aux_coeff,
                                                            dead_mask, prefixes)
    x_c = x - params["b_dec"]  # (B, D)
    pi = x_c @ params["W_enc"] + params["b_enc"]  # (B, D) @ (D, M) -> (B, M)
    kept = batch_topk_mask(pi, n_keep)  # (B, M)
    passes = kept & (pi > 0.0)  # (B, M) kept and through the ReLU
    z = xp.where(passes, pi, 0.0)  # (B, M)
    xhats = prefix_decode(z, params["W_dec"], params["b_dec"], prefixes)  # S x (B, D)
    total, mse, errs = prefix_squared_error(x, xhats)  # mse: the full SAE's
    cache = {"x_c": x_c, "z": z, "passes": passes, "errs": errs, "prefixes": prefixes,
             "aux_coeff": aux_coeff, "aux": None}
    aux = 0.0
    if dead.shape[0] > 0:
        aux, cache["aux"] = auxk.forward(auxk.select(pi, dead, aux_k), errs[-1], params["W_dec"], dead)
    n_pos = xp.count_nonzero(z)  # kept entries through the ReLU
    out = {"loss": scalar(total + aux_coeff * aux, dtype, xp), "mse": scalar(mse, dtype, xp),
           "matryoshka": scalar(total - mse, dtype, xp), "aux": scalar(aux, dtype, xp),
           "l0": scalar(n_pos / B, dtype, xp), "min_kept": min_kept(z, n_pos, xp, dtype),
           "f": z, "xhat": xhats[-1]}
    return out, cache


def backward(params, cache):
    """True gradients of forward's loss, through the kept entries only."""
    xp = xp_of(cache["z"])
    W_enc, W_dec = params["W_enc"], params["W_dec"]
    x_c, z, passes, prefixes = cache["x_c"], cache["z"], cache["passes"], cache["prefixes"]
    # forward was: mse_j = sum_bd (x - xhat_j)^2 / B, xhat_j = z[:, :m_j] @ W_dec[:m_j] + b_dec;
    # segment s (latents [m_{s-1}, m_s)) is in prefixes s..S and gets G_s = sum_{j>=s} dxhat_j
    G = prefix_decoder_gradients(cache["errs"], prefixes)  # S x (B, D)
    dW_dec = xp.empty_like(W_dec)  # (M, D)
    dz = xp.empty_like(z)  # (B, M)
    for (s, e), G_s in zip(segments(prefixes), G):
        dW_dec[s:e] = z[:, s:e].T @ G_s  # (m, B) @ (B, D) -> (m, D)
        dz[:, s:e] = G_s @ W_dec[s:e].T  # (B, D) @ (D, m) -> (B, m)
    db_dec = G[0].sum(axis=0)  # (D,) b_dec is in every prefix
    # forward was: z = ReLU(pi) on the kept entries; only kept entries with pi > 0 pass gradient
    dpi = xp.where(passes, dz, 0.0)  # (B, M)
    if cache["aux"] is not None:  # forward was: loss = ... + alpha * aux
        dead = cache["aux"]["dead"]  # (Nd,)
        dW_dead, dpi_dead = auxk.backward(cache["aux"], W_dec, cache["aux_coeff"])
        dW_dec[dead] += dW_dead  # (Nd, D)
        dpi[:, dead] += dpi_dead  # (B, Nd)
    # forward was: pi = x_c @ W_enc + b_enc, x_c = x - b_dec
    dW_enc = x_c.T @ dpi  # (D, B) @ (B, M) -> (D, M)
    db_enc = dpi.sum(axis=0)  # (M,)
    db_dec = db_dec - W_enc @ db_enc  # (D, M) @ (M,) -> (D,)
    return {"W_enc": dW_enc, "b_enc": db_enc, "W_dec": dW_dec, "b_dec": db_dec}


def forward_backward(params, x, *, k, aux_k=512, aux_coeff=1.0 / 32, dead_mask=None,
                     prefixes=None, path="auto", dense_f=True):
    """(out, grads): forward's out and backward's grads in one call, plus out["fired"] (M,)
    int64. path: "dense", "sparse" (NumPy only) or "auto" (sparse on NumPy, batchtopk_fast, when
    k <= batchtopk_fast.SPARSE_MAX_DENSITY * M). The sparse path builds the dense out["f"] only when dense_f."""
    if path not in ("auto", "dense", "sparse"):
        raise InputError(f"batchtopk.forward_backward: path must be 'auto', 'dense' or 'sparse', "
                         f"found {path!r}")
    hyper = dict(k=k, aux_k=aux_k, aux_coeff=aux_coeff, dead_mask=dead_mask, prefixes=prefixes)
    xp = xp_of(params["W_enc"])
    if path == "sparse" and xp is not numpy:
        raise InputError("batchtopk.forward_backward: path='sparse' runs on NumPy arrays only; "
                         f"found {xp.__name__} arrays (use 'auto' or 'dense')")
    M = params["W_enc"].shape[1]
    if xp is numpy and (path == "sparse" or (path == "auto" and k <= batchtopk_fast.SPARSE_MAX_DENSITY * M)):
        check_params(params, PARAM_NAMES, ARCHITECTURE)
        x = as_input(params, x, ARCHITECTURE)
        return batchtopk_fast.forward_backward(params, x, *_check_hyper(params, x, k, aux_k, aux_coeff, dead_mask,
                                                                         prefixes), dense_f=dense_f)
    out, cache = forward(params, x, **hyper)
    out["fired"] = fire_counts(out["f"])  # (M,)
    return out, backward(params, cache)


def loss_and_grads(params, x, *, k, aux_k=512, aux_coeff=1.0 / 32, dead_mask=None, prefixes=None,
                   path="auto"):
    """(loss, grads) of `forward` / `backward`, through `forward_backward` (same paths)."""
    out, grads = forward_backward(params, x, k=k, aux_k=aux_k, aux_coeff=aux_coeff,
                                  dead_mask=dead_mask, prefixes=prefixes, path=path, dense_f=False)
    return out["loss"], grads
