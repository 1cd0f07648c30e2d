"""Optimiser pieces for SAE training: Adam, the unit-norm decoder constraint, and schedules.

Dimensions: M = d_sae latents, D = d_in. Params and grads are dicts of arrays with the same keys
(NumPy or CuPy, any float dtype); every update is in place and keeps the dtype.

Recipe (Gemma Scope, SPEC section 4): Adam with (beta1, beta2) = (0, 0.999), eps 1e-8; before
the step remove from dW_dec the component parallel to each decoder row, after the step
renormalise each row; lr cosine-warmed from 0.1 * lr over 1,000 steps; the sparsity coefficient
warmed linearly from 0 over 10,000 steps. TopK (Gao et al.): eps 6.25e-10, lr 2e-4 / sqrt(M / 2^14).
"""

import math

import numpy

from minisae.xp import xp_of

TOPK_ADAM_EPS = 6.25e-10

# ----------------------------------------------------------------------------------------------
# Adam


def adam_init(params):
    """Optimiser state: the step count and zeroed first and second moments per parameter."""
    return {"step": 0,
            "m": {k: xp_of(p).zeros_like(p) for k, p in params.items()},
            "v": {k: xp_of(p).zeros_like(p) for k, p in params.items()}}


def adam_update(params, grads, state, *, lr, betas=(0.0, 0.999), eps=1e-8):
    """One bias-corrected Adam step, in place on params and state (as torch.optim.Adam does it):

        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2;   t <- t + 1
        p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """
    if set(grads) != set(params) or set(state["m"]) != set(params):
        raise ValueError(f"adam_update: expected grads and state for exactly {sorted(params)}, "
                         f"found grads {sorted(grads)}, state {sorted(state['m'])}")
    b1, b2 = float(betas[0]), float(betas[1])
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"adam_update: expected betas in [0, 1), found {betas!r}")
    state["step"] += 1
    t = state["step"]
    step_size = float(lr) / (1.0 - b1 ** t)
    sqrt_bc2 = math.sqrt(1.0 - b2 ** t)
    eps = float(eps)
    for k, p in params.items():
        g, m, v = grads[k], state["m"][k], state["v"][k]
        if g.shape != p.shape or g.dtype != p.dtype:
            raise ValueError(f"adam_update: grads[{k!r}] expected {p.dtype} {tuple(p.shape)}, "
                             f"found {g.dtype} {tuple(g.shape)}")
        xp = xp_of(p)
        m *= b1
        m += (1.0 - b1) * g
        v *= b2
        v += (1.0 - b2) * (g * g)
        update = xp.sqrt(v)  # (same shape as p) then, in place: step_size * m / denom
        update /= sqrt_bc2
        update += eps
        xp.divide(m, update, out=update)
        update *= step_size
        p -= update


# ----------------------------------------------------------------------------------------------
# the unit-norm decoder constraint


def remove_parallel_decoder_grad(W_dec, dW_dec):
    """dW_dec minus, per row, its component along that row of W_dec (M, D): the gradient of
    the loss restricted to the tangent space of unit-norm rows. A new array."""
    xp = xp_of(W_dec)
    sq_norms = (W_dec * W_dec).sum(axis=1, keepdims=True)  # (M, 1)
    dots = (dW_dec * W_dec).sum(axis=1, keepdims=True)  # (M, 1)
    coeff = dots / xp.maximum(sq_norms, numpy.finfo(W_dec.dtype).tiny)  # (M, 1)
    return dW_dec - coeff * W_dec  # (M, D)


def normalize_decoder_rows(W_dec):
    """Scale each row of W_dec (M, D) to unit L2 norm, in place (a zero row stays zero)."""
    xp = xp_of(W_dec)
    norms = xp.sqrt((W_dec * W_dec).sum(axis=1, keepdims=True))  # (M, 1)
    W_dec /= xp.maximum(norms, numpy.finfo(W_dec.dtype).tiny)


# ----------------------------------------------------------------------------------------------
# schedules (step counts from 0: the first update uses lr_at(0))


def lr_at(step, *, lr, warmup_steps=1000, warmup_start=0.1, total_steps=None, decay_frac=0.0):
    """Learning rate at `step`: cosine warm-up from warmup_start * lr to lr over warmup_steps,
    then constant; with total_steps and decay_frac > 0, a linear decay to 0 over the last
    decay_frac of total_steps (reaching 0 at step = total_steps)."""
    if step < 0 or warmup_steps < 0 or not 0.0 <= decay_frac <= 1.0:
        raise ValueError(f"lr_at: expected step >= 0, warmup_steps >= 0, 0 <= decay_frac <= 1, "
                         f"found step={step}, warmup_steps={warmup_steps}, decay_frac={decay_frac}")
    factor = 1.0
    if step < warmup_steps:
        ramp = 0.5 * (1.0 - math.cos(math.pi * step / warmup_steps))  # 0 -> 1
        factor = warmup_start + (1.0 - warmup_start) * ramp
    if decay_frac > 0.0:
        if total_steps is None or total_steps <= 0:
            raise ValueError(f"lr_at: decay_frac={decay_frac} needs total_steps > 0, "
                             f"found {total_steps}")
        decay_steps = decay_frac * total_steps
        decay_start = total_steps - decay_steps
        if step > decay_start:
            factor *= max(0.0, (total_steps - step) / decay_steps)
    return float(lr) * factor


def sparsity_coeff_at(step, *, coeff, warmup_steps=10000):
    """The sparsity coefficient at `step`: linear from 0 at step 0 to coeff at warmup_steps."""
    if step < 0 or warmup_steps < 0:
        raise ValueError(f"sparsity_coeff_at: expected step >= 0 and warmup_steps >= 0, "
                         f"found step={step}, warmup_steps={warmup_steps}")
    if warmup_steps == 0:
        return float(coeff)
    return float(coeff) * min(1.0, step / warmup_steps)


def topk_lr(d_sae):
    """Gao et al.'s learning-rate scaling: 2e-4 / sqrt(d_sae / 2^14)."""
    return 2e-4 / math.sqrt(d_sae / 2 ** 14)
