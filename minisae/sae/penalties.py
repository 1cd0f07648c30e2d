"""JumpReLU's sparsity penalties, each with the pieces of its gradient, and the threshold's
pseudo-derivative (used by minisae/sae/jumprelu.py and its fast path, minisae/sae/jumprelu_fast.py).

Dimensions: B tokens, M latents, Nd dead latents. a_bi = H(pi_bi - theta_i) are the indicators,
f = pi * a the JumpReLU output, d_i row i of W_dec.

Penalties on the indicators (their gradient reaches theta only, through the pseudo-derivative
`dtheta_ste`; each returns its value and dL/da):
    sparsity_penalty   "l0" (the paper) and "quadratic" (Gemma Scope 2, Eq. 5), per token
    frequency_penalty  minisae's frequency penalty on latents firing too often, per latent
Penalties on the activations (SAELens' options, named divergences; true gradients where they exist):
    tanh_penalty       "tanh": lambda * sum_i tanh(c * f_bi * ||d_i||) (Anthropic, Jan. 2025)
    pre_act_penalty    coeff * sum_{i dead} relu(theta_i - pre_bi) * ||d_i|| (Anthropic, SAELens)
The threshold's pseudo-derivative (the paper's straight-through estimator):
    kernel_window      K((pi - theta) / eps), the rectangle kernel, as a boolean
    dtheta_ste         dL/dtheta from the kernel's column sums
Derivations: docs/derivations/jumprelu.md (the pseudo-derivative), jumprelu_recipes.md (the penalties).
"""

from minisae.xp import xp_of


def sparsity_penalty(l0_b, h, xp):
    """(value, da_b): value = mean_b P(L0_b) for the per-token counts l0_b (B,) and
    da_b (B,) = dvalue/da_bi, the same for every latent i of token b.
        l0:        P = lambda L0_b,                    dP/da_bi = lambda
        quadratic: P = lambda (2/L0*) (L0_b - L0*)^2,  dP/da_bi = lambda (4/L0*) (L0_b - L0*)
        tanh:      no term on the indicators (value 0, da_b = 0; see tanh_penalty)
    (dL0_b/da_bi = 1; the 1/B of the batch mean is in da_b.)"""
    B = l0_b.shape[0]
    if h.penalty == "l0":
        return h.sparsity_coeff * float(l0_b.sum()) / B, xp.full(B, h.sparsity_coeff / B, dtype=l0_b.dtype)
    if h.penalty == "tanh":
        return 0.0, xp.zeros(B, dtype=l0_b.dtype)
    c = h.sparsity_coeff * 2.0 / h.target_l0
    u = l0_b - h.target_l0  # (B,)
    return c * float((u * u).sum()) / B, u * (2.0 * c / B)  # (B,)


def frequency_penalty(count_i, h, B):
    """(value, da_i): F = freq_coeff * sum_i max(p_i - freq_target, 0)^2 with p_i = count_i / B the
    firing fraction of latent i (count_i = sum_b a_bi, (M,)), and da_i (M,) = dF/da_bi =
    2 freq_coeff max(p_i - freq_target, 0) / B, the same for every token b. minisae's design."""
    over = count_i * (1.0 / B) - h.freq_target  # (M,)
    over *= over > 0.0
    return h.freq_coeff * float((over * over).sum()), over * (2.0 * h.freq_coeff / B)  # (M,)


def tanh_penalty(f, norms, h, B):
    """(value, s): value = (lambda/B) sum_bi tanh(c f_bi ||d_i||), c = tanh_scale, for f (B, M) and
    the decoder row norms (M,); s (B, M) = (lambda/B) c (1 - tanh^2(c f ||d||)), so that
    dvalue/df_bi = s_bi ||d_i|| and dvalue/d||d_i|| = sum_b s_bi f_bi."""
    t = xp_of(f).tanh(h.tanh_scale * f * norms)  # (B, M)
    value = h.sparsity_coeff * float(t.sum()) / B
    return value, (1.0 - t * t) * (h.sparsity_coeff * h.tanh_scale / B)  # (B, M)


def pre_act_penalty(pre_dead, theta_dead, norms_dead, coeff, B):
    """(value, dpre, dtheta, dnorm) of coeff * (1/B) sum_b sum_{i dead} relu(theta_i - pre_bi) ||d_i||
    for the dead latents' pre-activations pre_dead (B, Nd) (before the ReLU): true gradients,
    dpre (B, Nd) = -(coeff/B) ||d_i|| [theta_i > pre_bi], dtheta (Nd,) = -sum_b dpre,
    dnorm (Nd,) = (coeff/B) sum_b relu(theta_i - pre_bi)."""
    gap = theta_dead - pre_dead  # (B, Nd)
    below = gap > 0.0  # (B, Nd)
    gap *= below  # relu
    value = coeff * float((gap * norms_dead).sum()) / B
    dpre = below * (norms_dead * (-coeff / B))  # (B, Nd)
    return value, dpre, -dpre.sum(axis=0), gap.sum(axis=0) * (coeff / B)


# ----------------------------------------------------------------------------------------------
# the threshold's pseudo-derivative


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


def kernel_da_sum(window, da_b, da_i, dtype):
    """sum_b K_bi (da_b[b] + da_i[i]) (M,) from the (B, M) window."""
    xp = xp_of(window)
    s = xp.where(window, da_b[:, None], 0.0).sum(axis=0)  # (M,)
    if da_i is not None:
        s += da_i * window.sum(axis=0, dtype=dtype)  # (M,)
    return s
