"""JumpReLU SAE (Rajamanoharan et al. 2024, arXiv 2407.14435): forward, hand-written backward.

Dimensions: B tokens in the batch, D = d_in, M = d_sae latents, N stored entries (sparse path).

    x_c  = x - b_dec                  (pre-encoder bias; option pre_enc_bias, on by default)
    pi   = ReLU(x_c @ W_enc + b_enc)  (the paper's pseudo-code keeps this ReLU)
    a    = H(pi - theta)              (H(u) = 1 if u > 0 else 0, strict); L0_b = sum_i a_bi
    f    = pi * a                     (JumpReLU)
    xhat = f @ W_dec + b_dec
    loss = mean_b [ sum_d (x - xhat)^2 + P(L0_b) ] + F(latent frequencies)

SAELens' options, named divergences from the paper (minisae/sae/penalties.py; dense path only):
penalty="tanh" (lambda * sum_i tanh(c f_bi ||d_i||), c = tanh_scale, in place of P), pre_act_coeff
(coeff * sum_{i dead} relu(theta_i - pre_bi) ||d_i|| on the latents of dead_mask) and ste_to_input
(the threshold's pseudo-derivative also passed, negated, to pi, hence to the encoder).

With Matryoshka prefixes m_1 < ... < m_S = M (option `prefixes`, Bussmann et al. 2025, arXiv
2503.17547) the squared error is summed over the reconstructions from the nested prefixes,
xhat_j = f[:, :m_j] @ W_dec[:m_j] + b_dec (docs/derivations/matryoshka.md).

P, the sparsity penalty (option `penalty`):
    "l0"         P = lambda * L0_b                                    (the paper; the default)
    "quadratic"  P = lambda * (2 / L0*) * (L0_b - L0*)^2, L0* = target_l0  (Gemma Scope 2, Eq. 5)
F, the frequency penalty (minisae's own design; off unless freq_coeff > 0), with p_i = mean_b a_bi
the fraction of the batch on which latent i fires:
    F = freq_coeff * sum_i max(p_i - freq_target, 0)^2

theta = exp(log_threshold) > 0 (the paper), or theta itself when the params hold `threshold`
instead (`init(..., threshold_param="raw")`, as SAELens >= 6.48 and dictionary_learning train it).
The loss is piecewise constant in theta, so theta learns from *pseudo*-derivatives (a kernel-density
estimate of the derivative of the expected loss); everything else gets its true gradient, and the
penalties train theta only. Derivations: docs/derivations/jumprelu.md (the paper's loss) and
docs/derivations/jumprelu_recipes.md (quadratic, frequency, raw theta).

`forward` + `backward` are the plain, dense reference. `forward_backward` and `loss_and_grads`
run the same math on a row-sparse path on NumPy when few latents fire
(`_forward_backward_sparse`, at the bottom); a test holds the two equal.
"""

import dataclasses
import math

import numpy

from minisae.sae.common import (as_input, check_params, check_prefixes, decode, fire_counts,
                                init_dictionary, prefix_decode, prefix_decoder_gradients,
                                prefix_squared_error, scalar, segments, sparse_prefix_decode,
                                sparse_prefix_decoder_grad, sparse_prefix_parts,
                                sparse_prefix_sampled)
from minisae.sae.penalties import frequency_penalty, pre_act_penalty, sparsity_penalty, tanh_penalty
from minisae.sae.sparse import (by_column, column_sums, entries_above, sparse_fire_counts,
                                sparse_t_matmul)
from minisae.threads import in_background
from minisae.xp import xp_of

ARCHITECTURE = "jumprelu"
PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "log_threshold")  # the paper: log theta trained
PARAM_NAMES_RAW = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")   # threshold_param="raw"
PENALTIES = ("l0", "quadratic", "tanh")
THRESHOLD_INIT = 0.001  # theta at init (Gemma Scope recipe)
SPARSE_MAX_DENSITY = 0.06  # the sparse path is taken up to this fraction of B*M entries stored

__all__ = ["ARCHITECTURE", "PARAM_NAMES", "PARAM_NAMES_RAW", "PENALTIES", "Hyper", "param_names",
           "init", "encode", "decode", "forward", "backward", "forward_backward", "loss_and_grads",
           "dtheta_ste", "kernel_window", "sparsity_penalty", "frequency_penalty"]


def param_names(threshold_param="log"):
    """PARAM_NAMES ("log": log_threshold trained) or PARAM_NAMES_RAW ("raw": threshold trained)."""
    if threshold_param not in ("log", "raw"):
        raise ValueError(f"jumprelu: threshold_param must be 'log' or 'raw', found {threshold_param!r}")
    return PARAM_NAMES if threshold_param == "log" else PARAM_NAMES_RAW


def init(d_in, d_sae, *, seed=0, xp=numpy, dtype="float32", threshold_param="log",
         threshold_init=THRESHOLD_INIT):
    """Unit-norm He-uniform decoder rows, W_enc = W_dec^T, b_enc = b_dec = 0, theta = threshold_init
    (0.001), held as log_threshold (threshold_param="log", the paper) or threshold ("raw")."""
    names = param_names(threshold_param)
    if not float(threshold_init) > 0.0:
        raise ValueError(f"jumprelu.init: expected threshold_init > 0, found {threshold_init!r}")
    p = init_dictionary(d_in, d_sae, seed=seed, xp=xp, dtype=dtype)
    theta0 = float(threshold_init) if threshold_param == "raw" else math.log(threshold_init)
    return {
        "W_enc": p["W_enc"],                                  # (D, M)
        "b_enc": xp.zeros((d_sae,), dtype=dtype),             # (M,)
        "W_dec": p["W_dec"],                                  # (M, D)
        "b_dec": p["b_dec"],                                  # (D,)
        names[4]: xp.full((d_sae,), theta0, dtype=dtype),     # (M,) log_threshold or threshold
    }


def _check(params, x):
    """Checked params and x; returns (x, raw) with raw True when theta itself is trained."""
    raw = isinstance(params, dict) and "threshold" in params
    check_params(params, PARAM_NAMES_RAW if raw else PARAM_NAMES, ARCHITECTURE)
    return as_input(params, x, ARCHITECTURE), raw


def _theta(params, raw, xp):
    return params["threshold"] if raw else xp.exp(params["log_threshold"])  # (M,)


@dataclasses.dataclass(frozen=True)
class Hyper:
    """The loss options, checked once. Defaults are the paper's recipe."""
    sparsity_coeff: float          # lambda
    bandwidth: float = 0.001       # epsilon of the rectangle kernel
    pre_enc_bias: bool = True      # x_c = x - b_dec (else x_c = x)
    penalty: str = "l0"            # "l0" | "quadratic"
    target_l0: float | None = None  # L0*, needed by the quadratic penalty
    freq_coeff: float = 0.0        # weight of the frequency penalty (0 = off)
    freq_target: float = 0.1       # firing fraction above which a latent is penalised
    prefixes: tuple | None = None  # Matryoshka prefix sizes m_1 < ... (M appended); None = plain
    # SAELens' options (named divergences from the paper; the dense path only):
    tanh_scale: float = 4.0        # c of penalty="tanh": lambda * sum_i tanh(c f_i ||d_i||)
    pre_act_coeff: float = 0.0     # coeff * sum_{i dead} relu(theta_i - pre_i) ||d_i|| (0 = off)
    dead_mask: object = None       # (M,) bool, the dead latents of the pre-activation loss
    ste_to_input: bool = False     # also pass the threshold's pseudo-derivative to pi (negated)

    @property
    def saelens_options(self):
        return self.penalty == "tanh" or self.pre_act_coeff > 0.0 or self.ste_to_input

    @classmethod
    def of(cls, **kw):
        try:
            h = cls(**kw)
        except TypeError as e:
            raise TypeError(f"jumprelu: {e}; the options are {[f.name for f in dataclasses.fields(cls)]}") from None
        if not float(h.sparsity_coeff) >= 0.0:
            raise ValueError(f"jumprelu: expected sparsity_coeff >= 0, found {h.sparsity_coeff!r}")
        if not float(h.bandwidth) > 0.0:
            raise ValueError(f"jumprelu: expected bandwidth > 0, found {h.bandwidth!r}")
        if h.penalty not in PENALTIES:
            raise ValueError(f"jumprelu: penalty must be one of {PENALTIES}, found {h.penalty!r}")
        if h.penalty == "quadratic" and not (h.target_l0 is not None and float(h.target_l0) > 0.0):
            raise ValueError(f"jumprelu: penalty='quadratic' needs target_l0 > 0, found {h.target_l0!r}")
        if not float(h.freq_coeff) >= 0.0 or not 0.0 <= float(h.freq_target) <= 1.0:
            raise ValueError(f"jumprelu: expected freq_coeff >= 0 and 0 <= freq_target <= 1, "
                             f"found {h.freq_coeff!r}, {h.freq_target!r}")
        if not float(h.tanh_scale) > 0.0 or not float(h.pre_act_coeff) >= 0.0:
            raise ValueError(f"jumprelu: expected tanh_scale > 0 and pre_act_coeff >= 0, "
                             f"found {h.tanh_scale!r}, {h.pre_act_coeff!r}")
        if float(h.pre_act_coeff) > 0.0 and h.dead_mask is None:
            raise ValueError("jumprelu: pre_act_coeff > 0 needs dead_mask (the latents it revives)")
        return dataclasses.replace(
            h, sparsity_coeff=float(h.sparsity_coeff), bandwidth=float(h.bandwidth),
            tanh_scale=float(h.tanh_scale), pre_act_coeff=float(h.pre_act_coeff),
            ste_to_input=bool(h.ste_to_input),
            pre_enc_bias=bool(h.pre_enc_bias), freq_coeff=float(h.freq_coeff),
            freq_target=float(h.freq_target),
            target_l0=None if h.target_l0 is None else float(h.target_l0))

    def with_latents(self, M):
        """This Hyper with `prefixes` checked against M latents (a tuple ending at M)."""
        return dataclasses.replace(self, prefixes=check_prefixes(self.prefixes, M, ARCHITECTURE))


def _encoder_pre(params, x, pre_enc_bias):
    """x_c (B, D) and pre = x_c @ W_enc + b_enc (B, M), a fresh array later steps may overwrite."""
    x_c = x - params["b_dec"] if pre_enc_bias else x  # (B, D)
    pre = x_c @ params["W_enc"]  # (B, D) @ (D, M) -> (B, M)
    pre += params["b_enc"]  # (B, M)
    return x_c, pre


def encode(params, x, *, pre_enc_bias=True):
    """f (B, M) for inputs x (B, D)."""
    x, raw = _check(params, x)
    xp = xp_of(x)
    _, pre = _encoder_pre(params, x, pre_enc_bias)
    pi = xp.maximum(pre, 0.0, out=pre)  # (B, M)
    return pi * (pi > _theta(params, raw, xp))  # (B, M)


# ----------------------------------------------------------------------------------------------
# plain forward / backward


def forward(params, x, **hyper):
    """(out, cache): out has loss, mse, l0, sparsity, freq (0-d), f (B, M), xhat (B, D).
    hyper: sparsity_coeff (required) and the other fields of `Hyper`."""
    x, raw = _check(params, x)
    h = Hyper.of(**hyper).with_latents(params["W_enc"].shape[1])
    x_c, pre = _encoder_pre(params, x, h.pre_enc_bias)
    return _forward_from_pre(params, x, x_c, pre, h, raw)


def _forward_from_pre(params, x, x_c, pre, h, raw):
    xp = xp_of(x)
    (B, M), dtype = pre.shape, x.dtype
    dead = None
    if h.pre_act_coeff > 0.0:  # the dead latents' pre-activations, before the ReLU overwrites pre
        dead_mask = xp.asarray(h.dead_mask)
        if dead_mask.shape != (M,) or dead_mask.dtype != bool:
            raise ValueError(f"jumprelu dead_mask: expected a bool array of shape ({M},), found "
                             f"{dead_mask.dtype} {tuple(dead_mask.shape)}")
        dead = xp.flatnonzero(dead_mask)  # (Nd,)
        pre_dead = pre[:, dead]  # (B, Nd) a copy
    pi = xp.maximum(pre, 0.0, out=pre)  # (B, M) ReLU, in place
    theta = _theta(params, raw, xp)  # (M,)
    active = pi > theta  # (B, M) H(pi - theta), strict
    f = pi * active  # (B, M)
    xhats = prefix_decode(f, params["W_dec"], params["b_dec"], h.prefixes)  # S x (B, D)
    total, mse, errs = prefix_squared_error(x, xhats)  # sum over prefixes; the full SAE's; x - xhat_j
    l0_b = active.sum(axis=1, dtype=dtype)  # (B,) L0 of each token
    sparsity, da_b = sparsity_penalty(l0_b, h, xp)  # da_b (B,)
    freq, da_i = 0.0, None
    if h.freq_coeff > 0.0:
        freq, da_i = frequency_penalty(active.sum(axis=0, dtype=dtype), h, B)  # da_i (M,)
    cache = {"x_c": x_c, "pi": pi, "theta": theta, "active": active, "f": f,
             "err": errs[-1], "errs_inner": errs[:-1],  # x - xhat; x - xhat_j of the inner prefixes
             "da_b": da_b, "da_i": da_i, "hyper": h, "raw": raw, "s_tanh": None, "pre_act": None}
    pre_act = 0.0
    if h.penalty == "tanh" or dead is not None:
        cache["norms"] = norms = xp.sqrt((params["W_dec"] * params["W_dec"]).sum(axis=1))  # (M,)
    if h.penalty == "tanh":
        sparsity, cache["s_tanh"] = tanh_penalty(f, norms, h, B)  # s_tanh (B, M)
    if dead is not None:
        pre_act, *parts = pre_act_penalty(pre_dead, theta[dead], norms[dead], h.pre_act_coeff, B)
        cache["pre_act"] = (dead, *parts)  # dpre (B, Nd), dtheta (Nd,), dnorm (Nd,)
    out = {"loss": scalar(total + sparsity + freq + pre_act, dtype, xp), "mse": scalar(mse, dtype, xp),
           "matryoshka": scalar(total - mse, dtype, xp), "l0": scalar(l0_b.sum() / B, dtype, xp),
           "sparsity": scalar(sparsity, dtype, xp), "freq": scalar(freq, dtype, xp),
           "pre_act": scalar(pre_act, dtype, xp), "f": f, "xhat": xhats[-1]}
    return out, cache


def kernel_window(pi, theta, bandwidth):
    """K((pi - theta)/eps) as a boolean: the rectangle kernel, 1 on the open interval
    (-1/2, 1/2), i.e. theta - eps/2 < pi < theta + eps/2."""
    half = 0.5 * bandwidth
    return (pi > theta - half) & (pi < theta + half)


def dtheta_ste(window_df_sum, window_da_sum, theta, bandwidth):
    """Pseudo-derivative of the loss in theta: *not the derivative of the forward* (which is 0
    almost everywhere in theta), but a kernel-density estimate of the derivative of the
    expected loss. Per entry, with K the rectangle kernel and eps the bandwidth,

        d JumpReLU_theta(pi) / d theta := -(theta / eps) K((pi - theta) / eps)
        d H(pi - theta)      / d theta := -(1 / eps)     K((pi - theta) / eps)

    so dL/dtheta_i = -(1/eps) * [theta_i * sum_b K_bi dL/df_bi + sum_b K_bi dL/da_bi], where
    dL/da_bi is what the penalties pass to the indicator a_bi = H(pi_bi - theta_i) (lambda/B for
    the paper's L0). Takes the two column sums (M,) and returns dL/dtheta (M,).
    """
    return (theta * window_df_sum + window_da_sum) * (-1.0 / bandwidth)


def _window_da_sum(window, da_b, da_i, dtype):
    """sum_b K_bi (da_b[b] + da_i[i]) (M,) from the (B, M) window."""
    xp = xp_of(window)
    s = xp.where(window, da_b[:, None], 0.0).sum(axis=0)  # (M,)
    if da_i is not None:
        s += da_i * window.sum(axis=0, dtype=dtype)  # (M,)
    return s


def backward(params, cache):
    """Gradients of forward's loss: true ones for W_enc, b_enc, W_dec, b_dec; for the threshold
    the pseudo-derivative of `dtheta_ste` (chained through theta = exp(log_threshold) unless
    theta is trained raw)."""
    xp = xp_of(cache["f"])
    W_enc, W_dec, h = params["W_enc"], params["W_dec"], cache["hyper"]
    x_c, pi, theta, active, f = (cache[k] for k in ("x_c", "pi", "theta", "active", "f"))
    # forward was: loss = sum_j mse_j + penalties, mse_j = sum_bd (x - xhat_j)^2 / B,
    # xhat_j = f[:, :m_j] @ W_dec[:m_j] + b_dec (one prefix, m_1 = M, without Matryoshka);
    # segment s (latents [m_{s-1}, m_s)) is in prefixes s..S and gets G_s = sum_{j>=s} dxhat_j
    G = prefix_decoder_gradients(cache["errs_inner"] + [cache["err"]], h.prefixes)  # S x (B, D)
    dW_dec = xp.empty_like(W_dec)  # (M, D)
    df = xp.empty_like(f)  # (B, M)
    for (s, e), G_s in zip(segments(h.prefixes), G):
        dW_dec[s:e] = f[:, s:e].T @ G_s  # (m, B) @ (B, D) -> (m, D)
        df[:, s:e] = G_s @ W_dec[s:e].T  # (B, D) @ (D, m) -> (B, m)
    db_dec = G[0].sum(axis=0)  # (D,) b_dec is in every prefix
    dnorm = None  # d loss / d ||d_i|| of the SAELens penalties
    if cache["s_tanh"] is not None:  # forward was: sparsity = (lambda/B) sum tanh(c f ||d||)
        df += cache["s_tanh"] * cache["norms"]  # (B, M)
        dnorm = (cache["s_tanh"] * f).sum(axis=0)  # (M,)
    # forward was: f = pi * a, a = H(pi - theta), the penalties of a; the theta part
    window = kernel_window(pi, theta, h.bandwidth)  # (B, M)
    dtheta = dtheta_ste(xp.where(window, df, 0.0).sum(axis=0),  # (M,)
                        _window_da_sum(window, cache["da_b"], cache["da_i"], theta.dtype),  # (M,)
                        theta, h.bandwidth)
    if h.ste_to_input:  # SAELens' option: each entry's theta pseudo-derivative, negated, to pi
        da = cache["da_b"][:, None] + (0.0 if cache["da_i"] is None else cache["da_i"])  # (B, M)
        ste = xp.where(window, theta * df + da, 0.0) * (1.0 / h.bandwidth)  # (B, M)
        # forward was: pi = ReLU(pre): window entries with pre <= 0 (theta < eps/2) get nothing
        dpre = (df * active + ste) * (pi > 0.0)  # (B, M)
    else:
        # ... and the pi part: d f/d pi = a; the penalties' steps pass nothing to pi
        dpi = xp.multiply(df, active, out=df)  # (B, M)
        # forward was: pi = ReLU(pre); where a = 1, pre = pi > theta > 0, so ReLU' = 1
        dpre = dpi  # (B, M)
    if cache["pre_act"] is not None:  # forward was: coeff/B sum_dead relu(theta - pre) ||d||
        dead, dpre_dead, dtheta_dead, dnorm_dead = cache["pre_act"]
        dpre[:, dead] += dpre_dead  # (B, Nd)
        dtheta[dead] += dtheta_dead  # (Nd,) a true gradient
        dnorm = xp.zeros_like(theta) if dnorm is None else dnorm
        dnorm[dead] += dnorm_dead  # (Nd,)
    if dnorm is not None:  # forward was: ||d_i|| = sqrt(sum_d W_dec[i, d]^2)
        dW_dec += (dnorm / cache["norms"])[:, None] * W_dec  # (M, D)
    # forward was: pre = x_c @ W_enc + b_enc
    dW_enc = x_c.T @ dpre  # (D, B) @ (B, M) -> (D, M)
    db_enc = dpre.sum(axis=0)  # (M,)
    if h.pre_enc_bias:
        # forward was: x_c = x - b_dec; sum_b d x_c = (sum_b dpre) @ W_enc^T
        db_dec = db_dec - W_enc @ db_enc  # (D, M) @ (M,) -> (D,)
    grads = {"W_enc": dW_enc, "b_enc": db_enc, "W_dec": dW_dec, "b_dec": db_dec}
    if cache["raw"]:
        grads["threshold"] = dtheta  # (M,)
    else:  # forward was: theta = exp(log_threshold)
        grads["log_threshold"] = theta * dtheta  # (M,)
    return grads


def forward_backward(params, x, *, path="auto", dense_f=True, **hyper):
    """(out, grads): forward's out and backward's grads in one call. path: "dense" (forward
    then backward), "sparse" (NumPy only), or "auto": sparse on NumPy when at most
    SPARSE_MAX_DENSITY of the batch's entries are active or in the kernel window, else dense.
    The sparse path builds the dense out["f"] (one (B, M) scatter) only when dense_f is true.
    out also has "fired" (M,) int64: on how many of the batch's tokens each latent fired."""
    if path not in ("auto", "dense", "sparse"):
        raise ValueError(f"jumprelu.forward_backward: path must be 'auto', 'dense' or 'sparse', "
                         f"found {path!r}")
    x, raw = _check(params, x)
    h = Hyper.of(**hyper).with_latents(params["W_enc"].shape[1])
    xp = xp_of(x)
    if path == "sparse" and xp is not numpy:
        raise ValueError("jumprelu.forward_backward: path='sparse' runs on NumPy arrays only; "
                         f"found {xp.__name__} arrays (use 'auto' or 'dense')")
    if path == "sparse" and h.saelens_options:
        raise ValueError("jumprelu.forward_backward: the SAELens options (penalty='tanh', "
                         "pre_act_coeff, ste_to_input) run on the dense path only")
    x_c, pre = _encoder_pre(params, x, h.pre_enc_bias)
    if xp is numpy and path != "dense" and not h.saelens_options:
        limit = None if path == "sparse" else int(SPARSE_MAX_DENSITY * pre.size)
        stored = entries_above(pre, _stored_from(_theta(params, raw, xp), h.bandwidth, pre.dtype),
                               limit)  # None: too many for the sparse path
        if stored is not None:
            del pre  # (B, M): the sparse path needs only the stored entries
            return _forward_backward_sparse(params, x, x_c, stored, h, raw, dense_f)
    out, cache = _forward_from_pre(params, x, x_c, pre, h, raw)
    out["fired"] = fire_counts(out["f"])  # (M,)
    return out, backward(params, cache)


def loss_and_grads(params, x, *, path="auto", **hyper):
    """(loss, grads) of `forward` / `backward`, through `forward_backward` (same paths).
    hyper: sparsity_coeff, bandwidth=0.001, pre_enc_bias=True, penalty="l0", target_l0=None,
    freq_coeff=0.0, freq_target=0.1, prefixes=None (see `Hyper`)."""
    out, grads = forward_backward(params, x, path=path, dense_f=False, **hyper)
    return out["loss"], grads


# ----------------------------------------------------------------------------------------------
# sparse path (NumPy): the same math, touching only the entries that are active or in the window


def _stored_from(theta, bandwidth, dtype):
    """lo (M,): the stored entries are those with pre > lo, where pi = ReLU(pre) is active or in
    the kernel window, i.e. pi > theta - eps/2. Where theta - eps/2 >= 0 that is
    pre > theta - eps/2; where it is < 0, every entry (lo = -inf)."""
    lo = theta - 0.5 * bandwidth  # (M,)
    return numpy.where(lo < 0.0, -numpy.inf, lo).astype(dtype)  # (M,)


def _forward_backward_sparse(params, x, x_c, stored, h, raw, dense_f):
    """stored = entries_above(pre, lo): the N stored entries of the batch, row-major."""
    W_enc, W_dec, b_dec = params["W_enc"], params["W_dec"], params["b_dec"]
    (B, M), dtype = (x.shape[0], W_enc.shape[1]), x.dtype
    theta = _theta(params, raw, numpy)  # (M,)
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
