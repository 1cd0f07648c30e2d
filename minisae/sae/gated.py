"""Gated SAE (Rajamanoharan et al. 2024, arXiv 2404.16014): forward, hand-written backward.

Dimensions: B tokens in the batch, D = d_in, M = d_sae latents.

    x_c     = x - b_dec
    pi_gate = x_c @ W_enc + b_gate                      (W_enc is the paper's W_gate)
    pi_mag  = x_c @ (W_enc * exp(r_mag)) + b_mag        (weight sharing, per column)
    f       = H(pi_gate) * ReLU(pi_mag)                 (H strict: 1 if u > 0 else 0)
    xhat    = f @ W_dec + b_dec
    loss    = mean_b [ sum_d (x - xhat)^2 + lambda * sum_i ReLU(pi_gate)_i
                       + sum_d (x - xhat_frozen)^2 ]
    xhat_frozen = ReLU(pi_gate) @ sg(W_dec) + sg(b_dec)

sg = stop-gradient: the auxiliary term trains the encoder side only. The Heaviside gate passes no
gradient, so b_gate learns from the L1 and auxiliary terms only. Decoder rows are kept at unit
norm by the optimiser (minisae.training.optim), so the L1 term carries no norm weight.
Both pre-activations share one product: x_c @ (W_enc * s) = (x_c @ W_enc) * s, s = exp(r_mag).
The derivation, line by line, is docs/derivations/gated.md.

`forward` + `backward` are the plain, dense reference, read top to bottom. `forward_backward` and
`loss_and_grads` run the same math through minisae/sae/gated_fast.py (on NumPy a row-sparse path
when few gates are open, else the dense one reusing its buffers); tests hold them equal.
"""

import numpy

from minisae.sae import gated_fast
from minisae.sae.common import (as_input, check_params, decode, init_dictionary, scalar, squared_error,
                                squared_error_backward)
from minisae.xp import xp_of

ARCHITECTURE = "gated"
PARAM_NAMES = ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec")

__all__ = ["ARCHITECTURE", "PARAM_NAMES", "init", "encode", "decode", "forward", "backward",
           "forward_backward", "loss_and_grads"]


def init(d_in, d_sae, *, seed=0, xp=numpy, dtype="float32"):
    """Unit-norm He-uniform decoder rows, W_enc = W_dec^T, r_mag = b_gate = b_mag = b_dec = 0."""
    p = init_dictionary(d_in, d_sae, seed=seed, xp=xp, dtype=dtype)
    return {
        "W_enc": p["W_enc"],                        # (D, M)
        "b_gate": xp.zeros((d_sae,), dtype=dtype),  # (M,)
        "r_mag": xp.zeros((d_sae,), dtype=dtype),   # (M,)
        "b_mag": xp.zeros((d_sae,), dtype=dtype),   # (M,)
        "W_dec": p["W_dec"],                        # (M, D)
        "b_dec": p["b_dec"],                        # (D,)
    }


def encode(params, x):
    """f (B, M) for inputs x (B, D)."""
    check_params(params, PARAM_NAMES, ARCHITECTURE)
    x = as_input(params, x, ARCHITECTURE)
    xp = xp_of(x)
    x_c = x - params["b_dec"]  # (B, D)
    pre = x_c @ params["W_enc"]  # (B, D) @ (D, M) -> (B, M), shared by both pre-activations
    pi_gate = pre + params["b_gate"]  # (B, M)
    pi_mag = pre * xp.exp(params["r_mag"]) + params["b_mag"]  # (B, M) = x_c @ (W_enc * exp(r_mag)) + b_mag
    return (pi_gate > 0.0) * xp.maximum(pi_mag, 0.0)  # (B, M)


def check_hyper(sparsity_coeff):
    """lambda as a float, checked >= 0."""
    if not float(sparsity_coeff) >= 0.0:
        raise ValueError(f"gated: expected sparsity_coeff >= 0, found {sparsity_coeff!r}")
    return float(sparsity_coeff)


# ----------------------------------------------------------------------------------------------
# plain forward / backward


def forward(params, x, *, sparsity_coeff):
    """(out, cache): out has loss, mse, l1, aux, l0 (0-d), f (B, M), xhat (B, D)."""
    check_params(params, PARAM_NAMES, ARCHITECTURE)
    sparsity_coeff = check_hyper(sparsity_coeff)
    x = as_input(params, x, ARCHITECTURE)
    xp = xp_of(x)
    B, dtype = x.shape[0], x.dtype
    W_dec, b_dec = params["W_dec"], params["b_dec"]
    x_c = x - b_dec  # (B, D)
    pre = x_c @ params["W_enc"]  # (B, D) @ (D, M) -> (B, M), shared by both pre-activations
    scale = xp.exp(params["r_mag"])  # (M,)
    pi_gate = pre + params["b_gate"]  # (B, M)
    pi_mag = pre * scale + params["b_mag"]  # (B, M) = x_c @ (W_enc * scale) + b_mag
    gate = pi_gate > 0.0  # (B, M) H(pi_gate)
    f = gate * xp.maximum(pi_mag, 0.0)  # (B, M)
    xhat = f @ W_dec + b_dec  # (B, M) @ (M, D) -> (B, D)
    mse, err = squared_error(x, xhat)
    relu_gate = xp.maximum(pi_gate, 0.0)  # (B, M)
    l1 = relu_gate.sum() / B  # mean_b sum_i ReLU(pi_gate)
    xhat_frozen = relu_gate @ W_dec + b_dec  # (B, M) @ (M, D) -> (B, D); W_dec, b_dec held fixed
    aux, err_frozen = squared_error(x, xhat_frozen)
    out = {"loss": scalar(mse + sparsity_coeff * l1 + aux, dtype, xp),
           "mse": scalar(mse, dtype, xp), "l1": scalar(l1, dtype, xp),
           "aux": scalar(aux, dtype, xp),
           "l0": scalar(xp.count_nonzero(f) / B, dtype, xp), "f": f, "xhat": xhat}
    cache = {"x_c": x_c, "pre": pre, "scale": scale, "gate": gate, "pi_mag": pi_mag, "f": f,
             "err": err, "err_frozen": err_frozen, "sparsity_coeff": sparsity_coeff}
    return out, cache


def backward(params, cache):
    """True gradients of forward's loss (the Heaviside gate contributes none), with the
    auxiliary term's decoder held fixed."""
    xp = xp_of(cache["f"])
    W_enc, W_dec = params["W_enc"], params["W_dec"]
    x_c, pre, scale, gate, f = (cache[k] for k in ("x_c", "pre", "scale", "gate", "f"))
    B = f.shape[0]
    # forward was: mse = sum_bd (x - xhat)^2 / B, xhat = f @ W_dec + b_dec
    dxhat = squared_error_backward(cache["err"])  # (B, D)
    dW_dec = f.T @ dxhat  # (M, B) @ (B, D) -> (M, D)
    db_dec = dxhat.sum(axis=0)  # (D,)
    df = dxhat @ W_dec.T  # (B, D) @ (D, M) -> (B, M)
    # forward was: f = H(pi_gate) * ReLU(pi_mag); H passes nothing, so only pi_mag gets df
    dpi_mag = df * (gate & (cache["pi_mag"] > 0.0))  # (B, M)
    # forward was: aux = sum_bd (x - xhat_frozen)^2 / B,
    #              xhat_frozen = ReLU(pi_gate) @ sg(W_dec) + sg(b_dec)
    dxhat_frozen = squared_error_backward(cache["err_frozen"])  # (B, D); nothing to W_dec, b_dec
    drelu_gate = dxhat_frozen @ W_dec.T  # (B, D) @ (D, M) -> (B, M)
    # forward was: l1 = sum_bi ReLU(pi_gate) / B, weighted by lambda in the loss
    drelu_gate = drelu_gate + cache["sparsity_coeff"] / B  # (B, M)
    # forward was: relu_gate = ReLU(pi_gate); ReLU'(pi_gate) = H(pi_gate) = gate
    dpi_gate = drelu_gate * gate  # (B, M)
    db_gate = dpi_gate.sum(axis=0)  # (M,)
    # forward was: pi_mag = pre * scale + b_mag, scale = exp(r_mag)
    db_mag = dpi_mag.sum(axis=0)  # (M,)
    dr_mag = (dpi_mag * pre).sum(axis=0) * scale  # (M,) d scale / d r_mag = scale
    # forward was: pi_gate = pre + b_gate, and pre = x_c @ W_enc feeds both paths
    dpre = dpi_mag * scale + dpi_gate  # (B, M)
    dW_enc = x_c.T @ dpre  # (D, B) @ (B, M) -> (D, M)
    # forward was: x_c = x - b_dec; sum_b d x_c = (sum_b dpre) @ W_enc^T
    db_dec = db_dec - W_enc @ dpre.sum(axis=0)  # (D, M) @ (M,) -> (D,)
    return {"W_enc": dW_enc, "b_gate": db_gate, "r_mag": dr_mag, "b_mag": db_mag,
            "W_dec": dW_dec, "b_dec": db_dec}


def forward_backward(params, x, *, sparsity_coeff, path="auto", dense_f=True):
    """(out, grads): forward's out and backward's grads in one call, through gated_fast. path:
    "dense", "sparse" (NumPy only), or "auto": sparse on NumPy when at most
    gated_fast.SPARSE_MAX_DENSITY of the batch's gates are open, else dense. The sparse path
    builds the dense out["f"] (one (B, M) scatter) only when dense_f is true. out also has
    "fired" (M,) int64: on how many of the batch's tokens each latent fired."""
    if path not in ("auto", "dense", "sparse"):
        raise ValueError(f"gated.forward_backward: path must be 'auto', 'dense' or 'sparse', "
                         f"found {path!r}")
    check_params(params, PARAM_NAMES, ARCHITECTURE)
    x = as_input(params, x, ARCHITECTURE)
    xp = xp_of(x)
    if path == "sparse" and xp is not numpy:
        raise ValueError("gated.forward_backward: path='sparse' runs on NumPy arrays only; "
                         f"found {xp.__name__} arrays (use 'auto' or 'dense')")
    return gated_fast.forward_backward(params, x, check_hyper(sparsity_coeff), path=path, dense_f=dense_f)


def loss_and_grads(params, x, *, sparsity_coeff, path="auto"):
    """(loss, grads) of `forward` / `backward`, through `forward_backward` (same paths)."""
    out, grads = forward_backward(params, x, sparsity_coeff=sparsity_coeff, path=path,
                                  dense_f=False)
    return out["loss"], grads
