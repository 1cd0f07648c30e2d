"""Optimiser pieces for SAE training: Adam, the unit-norm decoder constraint, and schedules.

Dimensions: M = d_sae latents, D = d_in. Params and grads are dicts of arrays with the same keys
(NumPy or CuPy, any float dtype); every update is in place and keeps the dtype.

Recipe (Gemma Scope: Lieberum et al. 2024, arXiv 2408.05147, App. A): Adam with (beta1, beta2)
= (0, 0.999), eps 1e-8; before the step remove from dW_dec the component parallel to each decoder
row, after the step renormalise each row; lr cosine-warmed from 0.1 * lr over 1,000 steps; the
sparsity coefficient warmed linearly from 0 over 10,000 steps. TopK (Gao et al., arXiv 2406.04093):
eps 6.25e-10, lr 2e-4 / sqrt(M / 2^14).
"""

import math

import numpy

from minisae import threads
from minisae.xp import xp_of

TOPK_ADAM_EPS = 6.25e-10

# ----------------------------------------------------------------------------------------------
# Adam


def adam_init(params):
    """Optimiser state: the step count and zeroed first and second moments per parameter."""
    return {"step": 0,
            "m": {k: xp_of(p).zeros_like(p) for k, p in params.items()},
            "v": {k: xp_of(p).zeros_like(p) for k, p in params.items()}}


def _adam_scalars(state, lr, betas, eps):
    b1, b2 = float(betas[0]), float(betas[1])
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"adam_update: expected betas in [0, 1), found {betas!r}")
    t = state["step"] + 1
    return b1, b2, float(lr) / (1.0 - b1 ** t), math.sqrt(1.0 - b2 ** t), float(eps)


def _param_step(step_size, lr_mult, name):
    """The step size of parameter `name`: step_size, times lr_mult[name] when given."""
    if lr_mult and name in lr_mult:
        return step_size * float(lr_mult[name])
    return step_size


def _check_adam_args(params, grads, state):
    if set(grads) != set(params) or set(state["m"]) != set(params):
        raise ValueError(f"adam_update: expected grads and state for exactly {sorted(params)}, "
                         f"found grads {sorted(grads)}, state {sorted(state['m'])}")
    for k, p in params.items():
        g = grads[k]
        if g.shape != p.shape or g.dtype != p.dtype:
            raise ValueError(f"adam_update: grads[{k!r}] expected {p.dtype} {tuple(p.shape)}, "
                             f"found {g.dtype} {tuple(g.shape)}")


def adam_update_plain(params, grads, state, *, lr, betas=(0.0, 0.999), eps=1e-8, lr_mult=None):
    """One bias-corrected Adam step (as torch.optim.Adam does it), written plainly; updates
    params and state in place but allocates temporaries. `adam_update` is the same arithmetic
    with none (a test holds the two bitwise equal):

        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2;   t <- t + 1
        p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    lr_mult: optional {name: factor}, a learning rate of factor * lr for that parameter (e.g.
    JumpReLU's threshold, minisae train --threshold-lr-mult); the others keep lr exactly.
    """
    _check_adam_args(params, grads, state)
    b1, b2, step_size, sqrt_bc2, eps = _adam_scalars(state, lr, betas, eps)
    state["step"] += 1
    for k, p in params.items():
        g, m, v = grads[k], state["m"][k], state["v"][k]
        xp = xp_of(p)
        m[...] = g if b1 == 0.0 else m * b1 + (1.0 - b1) * g  # b1 = 0: m is g (no 0 * m)
        v[...] = v * b2 + (1.0 - b2) * (g * g)
        p -= _param_step(step_size, lr_mult, k) * (m / (xp.sqrt(v) / sqrt_bc2 + eps))


ADAM_BLOCK_ELEMENTS = 1 << 17  # entries per block of `adam_update` on NumPy (512 KiB of float32: in L2)
# (2^17 against 2^15, rows 2^17 against 2^16: 0.85x the time at D 640 / M 4096, 0.85-0.91x at 512 / 8192,
# 0.91-0.94x at 2304 / 16,384, the same numbers; reference/bench_optim.py, 2026-12-06)


def adam_update(params, grads, state, *, lr, betas=(0.0, 0.999), eps=1e-8, lr_mult=None,
                unit_rows=None):
    """One bias-corrected Adam step, in place on params and state, with no temporaries: every
    operation writes into m, v, p or a small scratch buffer kept in the state (state["scratch"],
    never saved). Bitwise equal to `adam_update_plain` (the same operations in the same order).

    unit_rows: the name of a 2-D parameter whose rows are held at unit norm (the decoder,
    "W_dec"). Its gradient first loses, per row, the component along the row
    (`remove_parallel_decoder_grad`, in place on grads[unit_rows]), and after the step each row
    is renormalised (`normalize_decoder_rows`): bitwise what calling those two around this
    function gives, but on NumPy each block of rows goes through all three while it sits in the
    cache (one trip through memory instead of three), split over the threads.

    On NumPy the parameter is walked in blocks of ADAM_BLOCK_ELEMENTS entries, each taken
    through all the steps below while it sits in the CPU cache: the dozen elementwise passes
    then cost about one trip through memory instead of a dozen; a large parameter is split over
    as many threads as NumPy's BLAS uses (minisae.threads). (On a GPU: whole arrays.)

    Not restricted to the latents that fired: Adam's second moment v decays on every entry
    each step (v <- b2 v), and with b1 > 0 (TopK) so does m and hence the update of every
    parameter. With b1 = 0 (JumpReLU, Gated) a zero-gradient row would keep p unchanged, but at
    training batch sizes (thousands of tokens, L0 ~ 1 % of M) nearly every live latent fires in
    every batch, so a row-restricted update would save little besides the dead rows and cost
    gathers and scatters; it is not done.
    """
    _check_adam_args(params, grads, state)
    if unit_rows is not None and (unit_rows not in params or params[unit_rows].ndim != 2):
        raise ValueError(f"adam_update: unit_rows must name a 2-D parameter, found {unit_rows!r}")
    b1, b2, step_size, sqrt_bc2, eps = _adam_scalars(state, lr, betas, eps)
    state["step"] += 1
    scratch = state.setdefault("scratch", {})
    for k, p in params.items():
        g, m, v = grads[k], state["m"][k], state["v"][k]
        xp = xp_of(p)
        n = p.size
        param_step = _param_step(step_size, lr_mult, k)  # lr_mult: this parameter's factor
        if k == unit_rows and xp is numpy:
            _unit_rows_step(p, g, m, v, (b1, b2, sqrt_bc2, eps, param_step), scratch)
            continue
        if k == unit_rows:  # on a GPU: whole arrays, one pass after another
            remove_parallel_decoder_grad(p, g, out=g)
        step = ADAM_BLOCK_ELEMENTS if xp is numpy else max(n, 1)
        flat = [a.reshape(-1) for a in (p, g, m, v)]  # views (a copy only for a strided g)
        if any(not a.flags.c_contiguous for a in (p, m, v)):
            raise ValueError(f"adam_update: params[{k!r}] and its moments must be contiguous arrays")
        consts = (b1, b2, sqrt_bc2, eps, param_step)
        if n == 0:
            continue
        # on NumPy, large parameters are split into one contiguous range per thread (as many as
        # BLAS uses, minisae.threads): NumPy releases the GIL inside each operation
        bounds, n_threads = _thread_ranges(n, step if xp is numpy else n)
        tmps = _scratch_blocks(scratch, len(bounds) - 1, (min(step, n),), p.dtype, xp)
        threads.run(lambda lo, hi: _adam_range(flat, tmps[bounds.index(lo)], lo, hi, step, consts, xp),
                    bounds, n_threads)
        if k == unit_rows:
            normalize_decoder_rows(p)


def _adam_range(flat, tmp, lo, hi, step, consts, xp):
    """adam_update's arithmetic on entries lo:hi of the flat (p, g, m, v), block by block."""
    b1, b2, sqrt_bc2, eps, param_step = consts
    p, g, m, v = flat
    for s in range(lo, hi, step):
        e = min(s + step, hi)
        pb, gb, mb, vb, t = p[s:e], g[s:e], m[s:e], v[s:e], tmp[: e - s]
        if b1 == 0.0:  # m <- g (the recipe's beta1 = 0: one copy instead of three passes)
            mb[...] = gb
        else:  # m <- b1 m + (1 - b1) g
            mb *= b1
            xp.multiply(gb, 1.0 - b1, out=t)
            mb += t
        vb *= b2  # v <- b2 v + (1 - b2) g^2
        xp.multiply(gb, gb, out=t)
        t *= 1.0 - b2
        vb += t
        xp.sqrt(vb, out=t)  # t <- step_size * m / (sqrt(v) / sqrt_bc2 + eps)
        t /= sqrt_bc2
        t += eps
        xp.divide(mb, t, out=t)
        t *= param_step
        pb -= t


def _thread_ranges(n, step):
    """(bounds, n_threads): n items in one range per thread (as many as BLAS uses, at most one
    per block of `step`), each starting at a multiple of step; [0, n] on a single thread."""
    n_threads = min(threads.threads(), -(-n // step)) if n and step else 1
    return sorted(set([(n * i // n_threads) // step * step for i in range(n_threads)] + [n])), n_threads


def _scratch_blocks(scratch, count, shape, dtype, xp):
    """`count` scratch arrays of `shape`, one per thread range, kept in `scratch` across steps."""
    out = []
    for i in range(count):
        key = (i, shape, str(dtype), xp.__name__)
        if key not in scratch:
            scratch[key] = xp.empty(shape, dtype=dtype)
        out.append(scratch[key])
    return out


def _unit_rows_step(p, g, m, v, consts, scratch):
    """adam_update's step for its unit_rows parameter p (M, D) on NumPy: per block of rows, the
    gradient projection, Adam, and the renormalisation, on the threads by ranges of rows."""
    if any(not a.flags.c_contiguous for a in (p, g, m, v)):
        raise ValueError("adam_update: the unit_rows parameter, its gradient and moments must be "
                         "contiguous arrays")
    M, D = p.shape
    rows = _row_blocks(p)[0].stop if M else 1  # rows per block (about ROW_BLOCK_ELEMENTS entries)
    bounds, n_threads = _thread_ranges(M, rows)
    tmps = _scratch_blocks(scratch, len(bounds) - 1, (rows, D), p.dtype, numpy)

    def run_range(lo, hi):
        tmp = tmps[bounds.index(lo)]
        for r in range(lo, hi, rows):
            blk = slice(r, min(r + rows, hi))
            t = tmp[: blk.stop - blk.start]  # (rows, D)
            remove_parallel_decoder_grad(p[blk], g[blk], out=g[blk], tmp=t)
            flat = [a[blk].reshape(-1) for a in (p, g, m, v)]  # views: the block's rows are contiguous
            _adam_range(flat, t.reshape(-1), 0, flat[0].shape[0], flat[0].shape[0], consts, numpy)
            normalize_decoder_rows(p[blk], tmp=t)

    if M:
        threads.run(run_range, bounds, n_threads)


# ----------------------------------------------------------------------------------------------
# the unit-norm decoder constraint
#
# Plain versions first (readable, allocate (M, D) temporaries); then the ones training uses,
# which run over blocks of rows with a small scratch block and write in place. Both sum each
# row the same way, so a test holds them bitwise equal.

ROW_BLOCK_ELEMENTS = 1 << 17  # rows per block of the in-place versions: about this many entries


def remove_parallel_decoder_grad_plain(W_dec, dW_dec):
    """dW_dec minus, per row, its component along that row of W_dec (M, D): the gradient of
    the loss restricted to the tangent space of unit-norm rows. A new array."""
    xp = xp_of(W_dec)
    sq_norms = (W_dec * W_dec).sum(axis=1, keepdims=True)  # (M, 1)
    dots = (dW_dec * W_dec).sum(axis=1, keepdims=True)  # (M, 1)
    coeff = dots / xp.maximum(sq_norms, numpy.finfo(W_dec.dtype).tiny)  # (M, 1)
    return dW_dec - coeff * W_dec  # (M, D)


def normalize_decoder_rows_plain(W_dec):
    """Scale each row of W_dec (M, D) to unit L2 norm, in place (a zero row stays zero);
    allocates (M, D) temporaries."""
    xp = xp_of(W_dec)
    norms = xp.sqrt((W_dec * W_dec).sum(axis=1, keepdims=True))  # (M, 1)
    W_dec /= xp.maximum(norms, numpy.finfo(W_dec.dtype).tiny)


def _row_blocks(a):
    """Slices of about ROW_BLOCK_ELEMENTS entries over the rows of a (M, D); one on a GPU."""
    M, D = a.shape
    step = M if xp_of(a) is not numpy else max(1, ROW_BLOCK_ELEMENTS // max(D, 1))
    return [slice(i, min(i + step, M)) for i in range(0, M, step)]


def remove_parallel_decoder_grad(W_dec, dW_dec, *, out=None, tmp=None):
    """`remove_parallel_decoder_grad_plain`, written into `out` (may be dW_dec itself; a new
    array when None) block by block, with one small scratch block and no (M, D) temporary.
    tmp: a scratch block to use (at least a block's rows, D columns)."""
    xp = xp_of(W_dec)
    out = xp.empty_like(dW_dec) if out is None else out
    tiny = numpy.finfo(W_dec.dtype).tiny
    blocks = _row_blocks(W_dec)
    if tmp is None:
        tmp = xp.empty_like(W_dec[blocks[0]]) if blocks else None  # (rows, D)
    for blk in blocks:
        W, dW, t = W_dec[blk], dW_dec[blk], tmp[: blk.stop - blk.start]
        sq_norms = xp.multiply(W, W, out=t).sum(axis=1, keepdims=True)  # (rows, 1)
        dots = xp.multiply(dW, W, out=t).sum(axis=1, keepdims=True)  # (rows, 1)
        dots /= xp.maximum(sq_norms, tiny, out=sq_norms)
        xp.multiply(dots, W, out=t)
        xp.subtract(dW, t, out=out[blk])
    return out


def normalize_decoder_rows(W_dec, *, tmp=None):
    """`normalize_decoder_rows_plain`, block by block with one small scratch block (tmp: one
    to use, at least a block's rows, D columns)."""
    xp = xp_of(W_dec)
    tiny = numpy.finfo(W_dec.dtype).tiny
    blocks = _row_blocks(W_dec)
    if tmp is None:
        tmp = xp.empty_like(W_dec[blocks[0]]) if blocks else None  # (rows, D)
    for blk in blocks:
        W, t = W_dec[blk], tmp[: blk.stop - blk.start]
        norms = xp.multiply(W, W, out=t).sum(axis=1, keepdims=True)  # (rows, 1)
        xp.sqrt(norms, out=norms)
        W /= xp.maximum(norms, tiny, out=norms)


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


FLOAT32_SQUARE_MAX = math.sqrt(numpy.finfo(numpy.float32).max)  # |g| above this overflows g² in float32


def nonfinite_cause(params, state, *, sparsity_coeff=None):
    """Why a run went non-finite, in words, read off the parameters and Adam's moments: a second
    moment that overflowed (a gradient above 1.8e19 in float32: Adam's update of that parameter
    becomes 0, then NaN), a first moment or parameter that is NaN/inf, or, when all are finite,
    the learning rate (the loss overflowed from finite parameters)."""
    for k in params:
        v = state["v"][k]
        if not bool(xp_of(v).isfinite(v).all()):
            lam = f" (sparsity_coeff = {sparsity_coeff:g} scales it)" if sparsity_coeff is not None else ""
            return (f"the gradient of {k} exceeded {FLOAT32_SQUARE_MAX:.2g}, so its square overflowed Adam's "
                    f"{v.dtype} second moment{lam}; use a smaller sparsity coefficient or --dtype float64")
    for k, p in params.items():
        if not (bool(xp_of(p).isfinite(p).all()) and bool(xp_of(p).isfinite(state["m"][k]).all())):
            return f"{k} (or its Adam first moment) became NaN or inf; try a lower learning rate"
    return "the parameters are finite, the loss overflowed; try a lower learning rate"
