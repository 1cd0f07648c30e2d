"""The pieces of a Gemma block, each on one array, as transformers' eager code computes them.

    rms_norm         y = x * rsqrt(mean(x^2) + eps) * (1 + w)          Gemma2RMSNorm
    rope_tables      cos, sin of t * theta^(-2i/d) for t < T              rotary embedding tables
    apply_rope       x * cos + rotate_half(x) * sin, pairs (i, i + d/2)   apply_rotary_pos_emb
    scores_to_probs  softmax(c tanh(s * scale / c) + mask) over keys      eager_attention_forward
    linear           x @ W.T with W stored [out, in]                      nn.Linear without bias
    gelu_tanh_       0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))    gelu_pytorch_tanh

Dimension legend as in model.py: N tokens, D hidden, I intermediate, T positions (Tq queries),
n heads, d head_dim. NumPy or CuPy arrays. The NumPy fast paths of these pieces (cache-sized
blocks of rows on the threads, the same numbers) are in layers_fast.py; model.py calls those.
"""

import math

import numpy

from minisae.xp import get_xp, xp_of


def rms_norm(x, w1, eps, xp, out=None):
    """x * rsqrt(mean(x^2) + eps) * (1 + w) over the last axis, into `out` when given; `w1` is
    (1 + w), precomputed once per weight."""
    if xp is numpy:  # Gemma2RMSNorm._norm: x.pow(2).mean(-1), as numpy.mean computes it ...
        ms = numpy.add.reduce(x * x, axis=-1, keepdims=True)  # (N, 1)
        numpy.true_divide(ms, numpy.intp(x.shape[-1]), out=ms, casting="unsafe")  # ... without its overhead
    else:
        ms = xp.mean(x * x, axis=-1, keepdims=True)  # (N, 1)
    r = 1.0 / xp.sqrt(ms + eps)  # (N, 1)  rsqrt(... + eps)
    if out is None:
        return (x * r) * w1  # (N, D)  output * (1.0 + weight): Gemma's (1 + w)
    xp.multiply(x, r, out=out)
    out *= w1
    return out


def rope_tables(T, head_dim, theta, xp, dtype, factor=1.0):
    """cos, sin (T, 1, d) for positions 0..T-1, inv_freq_i = theta^(-2i/d) / factor, all in `dtype`.

    factor != 1 is linear RoPE scaling (positions divided by factor; Gemma 3 4B+ global layers).
    """
    exponent = xp.arange(0, head_dim, 2, dtype=dtype) / head_dim  # (d/2,)  arange(0, dim, 2) / dim
    inv_freq = 1.0 / (theta ** exponent)  # (d/2,)  compute_default_rope_parameters (float32, not float64)
    if factor != 1.0:
        inv_freq = inv_freq / xp.asarray(factor, dtype=dtype)  # _compute_linear_scaling_rope_parameters
    pos = xp.arange(T, dtype=dtype)  # (T,)  position_ids from 0, no offset
    freqs = pos[:, None] * inv_freq[None, :]  # (T, d/2)  position_ids.float() * inv_freq
    emb = xp.concatenate([freqs, freqs], axis=-1)[:, None, :]  # (T, 1, d)  cat(freqs, freqs)
    return xp.cos(emb), xp.sin(emb)  # (T, 1, d) each, computed in float32


def apply_rope(x, cos, sin, xp, out=None):
    """x (..., n, d) rotated by "rotate_half": pairs (i, i + d/2), not adjacent pairs; cos and sin
    (..., 1, d) broadcast against x's leading axes; into `out` when given."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (..., n, d/2) each
    out = xp.multiply(x, cos, out=out)  # (..., n, d)  q * cos
    out[..., :half] -= x2 * sin[..., :half]  # + rotate_half(q) * sin; rotate_half = cat(-x2, x1)
    out[..., half:] += x1 * sin[..., half:]  # (same IEEE result as adding (-x2) * sin)
    return out


def scores_to_probs(s, mask, scale, cap, xp):
    """In place on attention scores s (..., Tq, T): scale, soft-cap, additive mask (Tq, T),
    float32 softmax over the keys."""
    s *= scale  # matmul(q, kᵀ) * scaling, scaling = query_pre_attn_scalar ** -0.5 (not head_dim)
    if cap is not None:
        s /= cap  # attention soft-cap c * tanh(s / c), c = attn_logit_softcapping ...
        xp.tanh(s, out=s)
        s *= cap  # ... applied BEFORE the mask (eager_attention_forward)
    s += mask  # (T, T) additive: 0 where visible, finfo.min where masked
    s -= s.max(axis=-1, keepdims=True)  # softmax(dim=-1, dtype=float32)
    xp.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


LINEAR_SWAP_MAX_TOKENS = 256  # up to this many tokens, linear() runs (W @ x.T).T (measured below)


def linear(x, W, *, c_order=True):
    """x @ W.T for x (N, in) and a weight W (out, in): (N, out).

    The same product either way; for N <= LINEAR_SWAP_MAX_TOKENS it is computed as (W @ x.T).T,
    which OpenBLAS runs 1.4-2.3x faster for N = 16-128 with Gemma 2 2B's MLP weight (9216, 2304)
    and no slower at 512 (docs/benchmarks.md). That result is a transposed (Fortran-ordered)
    view; with c_order it is copied to C order (for the residual stream), otherwise left as is
    for a caller that reshapes (which copies anyway) or only runs elementwise passes over it.
    """
    if x.shape[0] <= LINEAR_SWAP_MAX_TOKENS:
        y = (W @ x.T).T  # (out, in) @ (in, N) -> (out, N), viewed as (N, out)
        return module_of(x).ascontiguousarray(y) if c_order else y
    return x @ W.T  # (N, in) @ (in, out) -> (N, out)


def gelu_tanh_(x, xp, scratch=None):
    """In place: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GELU's tanh form (gelu_pytorch_tanh).
    scratch: an array shaped like x for the intermediate (default: a new one)."""
    inner = xp.multiply(x, x, out=scratch)  # (N, I)
    inner *= x  # x^3
    inner *= 0.044715
    inner += x
    inner *= math.sqrt(2.0 / math.pi)
    xp.tanh(inner, out=inner)
    inner += 1.0
    x *= inner
    x *= 0.5
    return x


def module_of(a):
    """numpy or cupy for `a`, also when CuPy was imported directly rather than through get_xp."""
    if type(a).__module__.startswith("cupy"):
        return get_xp("cupy")
    return xp_of(a)
