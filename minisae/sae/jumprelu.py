"""JumpReLU SAE (Rajamanoharan et al. 2024, arXiv 2407.14435): forward, hand-written backward.

Dimensions: B tokens in the batch, D = d_in, M = d_sae latents.

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

`forward` + `backward` are the plain, dense reference, read top to bottom. `forward_backward` and
`loss_and_grads` run the same math through minisae/sae/jumprelu_fast.py (on NumPy a row-sparse
path when few latents fire, else the dense one sharing the encoder's product and reusing its
buffers); tests hold the fast paths equal to these.
"""

import dataclasses
import math

import numpy

from minisae.sae import jumprelu_fast
from minisae.sae.common import (as_input, check_params, check_prefixes, decode, fire_counts,
                                init_dictionary, prefix_decode, prefix_decoder_gradients,
                                prefix_squared_error, scalar, segments)
from minisae.sae.penalties import (dtheta_ste, frequency_penalty, kernel_da_sum, kernel_window,
                                   pre_act_penalty, sparsity_penalty, tanh_penalty)
from minisae.xp import xp_of

ARCHITECTURE = "jumprelu"
PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "log_threshold")  # the paper: log theta trained
PARAM_NAMES_RAW = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")   # threshold_param="raw"
PENALTIES = ("l0", "quadratic", "tanh")
THRESHOLD_INIT = 0.001  # theta at init (Gemma Scope recipe)

__all__ = ["ARCHITECTURE", "PARAM_NAMES", "PARAM_NAMES_RAW", "PENALTIES", "Hyper", "param_names",
           "init", "encode", "decode", "forward", "backward", "forward_backward", "loss_and_grads",
           "dtheta_ste", "kernel_window", "sparsity_penalty", "frequency_penalty", "theta_of"]


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


def theta_of(params, raw, xp):
    """theta (M,): the trained threshold, or exp(log_threshold)."""
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


def encode(params, x, *, pre_enc_bias=True):
    """f (B, M) for inputs x (B, D)."""
    x, raw = _check(params, x)
    xp = xp_of(x)
    x_c = x - params["b_dec"] if pre_enc_bias else x  # (B, D)
    pre = x_c @ params["W_enc"] + params["b_enc"]  # (B, D) @ (D, M) -> (B, M)
    pi = xp.maximum(pre, 0.0)  # (B, M)
    return pi * (pi > theta_of(params, raw, xp))  # (B, M)


# ----------------------------------------------------------------------------------------------
# plain forward / backward


def forward(params, x, **hyper):
    """(out, cache): out has loss, mse, l0, sparsity, freq (0-d), f (B, M), xhat (B, D).
    hyper: sparsity_coeff (required) and the other fields of `Hyper`."""
    x, raw = _check(params, x)
    xp = xp_of(x)
    (B, D), M, dtype = x.shape, params["W_enc"].shape[1], x.dtype
    h = Hyper.of(**hyper).with_latents(M)
    x_c = x - params["b_dec"] if h.pre_enc_bias else x  # (B, D)
    pre = x_c @ params["W_enc"] + params["b_enc"]  # (B, D) @ (D, M) -> (B, M)
    pi = xp.maximum(pre, 0.0)  # (B, M) ReLU
    theta = theta_of(params, raw, xp)  # (M,)
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
    # SAELens' options (named divergences): the tanh penalty, the dead latents' pre-activation loss
    pre_act = 0.0
    if h.penalty == "tanh" or h.pre_act_coeff > 0.0:
        cache["norms"] = norms = xp.sqrt((params["W_dec"] * params["W_dec"]).sum(axis=1))  # (M,)
    if h.penalty == "tanh":
        sparsity, cache["s_tanh"] = tanh_penalty(f, norms, h, B)  # s_tanh (B, M)
    if h.pre_act_coeff > 0.0:
        dead = _dead_latents(h.dead_mask, M, xp)  # (Nd,)
        pre_act, *parts = pre_act_penalty(pre[:, dead], theta[dead], norms[dead], h.pre_act_coeff, B)
        cache["pre_act"] = (dead, *parts)  # dpre (B, Nd), dtheta (Nd,), dnorm (Nd,)
    out = {"loss": scalar(total + sparsity + freq + pre_act, dtype, xp), "mse": scalar(mse, dtype, xp),
           "matryoshka": scalar(total - mse, dtype, xp), "l0": scalar(l0_b.sum() / B, dtype, xp),
           "sparsity": scalar(sparsity, dtype, xp), "freq": scalar(freq, dtype, xp),
           "pre_act": scalar(pre_act, dtype, xp), "f": f, "xhat": xhats[-1]}
    return out, cache


def _dead_latents(dead_mask, M, xp):
    """The indices (Nd,) of the dead latents of `dead_mask`, a bool array (M,)."""
    dead_mask = xp.asarray(dead_mask)
    if dead_mask.shape != (M,) or dead_mask.dtype != bool:
        raise ValueError(f"jumprelu dead_mask: expected a bool array of shape ({M},), found "
                         f"{dead_mask.dtype} {tuple(dead_mask.shape)}")
    return xp.flatnonzero(dead_mask)  # (Nd,)


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
                        kernel_da_sum(window, cache["da_b"], cache["da_i"], theta.dtype),  # (M,)
                        theta, h.bandwidth)
    if h.ste_to_input:  # SAELens' option: each entry's theta pseudo-derivative, negated, to pi
        da = cache["da_b"][:, None] + (0.0 if cache["da_i"] is None else cache["da_i"])  # (B, M)
        ste = xp.where(window, theta * df + da, 0.0) * (1.0 / h.bandwidth)  # (B, M)
        # forward was: pi = ReLU(pre): window entries with pre <= 0 (theta < eps/2) get nothing
        dpre = (df * active + ste) * (pi > 0.0)  # (B, M)
    else:
        # ... and the pi part: d f/d pi = a; the penalties' steps pass nothing to pi
        dpi = df * active  # (B, M)
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
    """(out, grads): forward's out and backward's grads in one call, through jumprelu_fast (the
    SAELens options: forward then backward). path: "dense", "sparse" (NumPy only), or "auto":
    sparse on NumPy when at most jumprelu_fast.SPARSE_MAX_DENSITY of the batch's entries are
    active or in the kernel window, else dense. The sparse path builds the dense out["f"] (one
    (B, M) scatter) only when dense_f is true.
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
    if not h.saelens_options:
        return jumprelu_fast.forward_backward(params, x, h, theta_of(params, raw, xp), raw, path=path,
                                              dense_f=dense_f)
    out, cache = forward(params, x, **hyper)
    out["fired"] = fire_counts(out["f"])  # (M,)
    return out, backward(params, cache)


def loss_and_grads(params, x, *, path="auto", **hyper):
    """(loss, grads) of `forward` / `backward`, through `forward_backward` (same paths).
    hyper: sparsity_coeff, bandwidth=0.001, pre_enc_bias=True, penalty="l0", target_l0=None,
    freq_coeff=0.0, freq_target=0.1, prefixes=None (see `Hyper`)."""
    out, grads = forward_backward(params, x, path=path, dense_f=False, **hyper)
    return out["loss"], grads
