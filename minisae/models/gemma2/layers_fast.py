"""The NumPy fast paths of layers.py: each pass runs over cache-sized blocks of rows, split over
threads (minisae.threads), every row computed exactly as the whole array would compute it (the
same numbers; tests/test_gemma2_model.py holds each bitwise equal to its plain piece). Off
NumPy, or for a layout they do not handle, they call the plain piece.

    rms_norm, apply_rope, attention_scores_to_probs   layers.py's, by blocks of rows
    gelu_tanh_times_                                  gelu_tanh_(g) * u in one trip through memory

Dimension legend as in model.py.
"""

import numpy

from minisae import threads

from . import layers
from .layers import module_of

PASS_BLOCK = 1 << 17  # elements per block of a blocked elementwise pass (512 KiB of float32: in L2)


def rms_norm(x, w1, eps):
    """x * rsqrt(mean(x^2) + eps) * (1 + w) over the last axis; `w1` is (1 + w), precomputed once
    per weight. On NumPy the passes run over cache-sized blocks of rows split over threads
    (by_row_blocks: every row is done exactly as the whole array would be, the same numbers)."""
    xp = module_of(x)
    if xp is not numpy or not x.flags.c_contiguous or x.dtype != w1.dtype or x.size <= PASS_BLOCK:
        return layers.rms_norm(x, w1, eps, xp)
    D = x.shape[-1]
    rows, out = x.reshape(-1, D), numpy.empty_like(x)  # (R, D) view, the result
    out_rows = out.reshape(-1, D)  # (R, D) view
    by_row_blocks(lambda r0, r1: layers.rms_norm(rows[r0:r1], w1, eps, numpy, out=out_rows[r0:r1]), rows.shape[0], D)
    return out


def by_row_blocks(fn, n_rows, row_elems, period=None):
    """fn(r0, r1) for consecutive blocks of rows [r0, r1) covering [0, n_rows): each about
    PASS_BLOCK elements (rows of row_elems each), so a block's passes run in cache; no block
    crosses a multiple of `period` rows (a head, a batch row); the blocks are split over threads
    (minisae.threads), each thread taking a contiguous run of them."""
    per_block = max(1, PASS_BLOCK // max(row_elems, 1))
    period = period or n_rows

    def piece(lo, hi):
        r0 = lo
        while r0 < hi:
            r1 = min(r0 + per_block, hi, (r0 // period + 1) * period)
            fn(r0, r1)
            r0 = r1

    n = threads.threads()
    threads.run(piece, threads.even_pieces(n_rows, n, per_block), n)


def apply_rope(x, cos, sin):
    """x (B, T, n, d) rotated by "rotate_half": pairs (i, i + d/2), not adjacent pairs; cos and
    sin (T, 1, d). On NumPy the passes run over cache-sized blocks of positions split over
    threads (by_row_blocks; the same numbers as the whole array)."""
    xp = module_of(x)
    if (xp is not numpy or x.ndim != 4 or not x.flags.c_contiguous or x.size <= PASS_BLOCK
            or not x.dtype == cos.dtype == sin.dtype):
        return layers.apply_rope(x, cos, sin, xp)
    B, T, n, d = x.shape
    rows, out = x.reshape(B * T, n, d), numpy.empty_like(x)  # (B*T, n, d) view, the result
    out_rows = out.reshape(B * T, n, d)  # (B*T, n, d) view

    def block(r0, r1):  # positions r0..r1 of one batch row: t0..t0 + r1 - r0
        t0 = r0 % T
        layers.apply_rope(rows[r0:r1], cos[t0:t0 + r1 - r0], sin[t0:t0 + r1 - r0], numpy, out=out_rows[r0:r1])

    by_row_blocks(block, B * T, n * d, period=T)
    return out


def attention_scores_to_probs(s, mask, scale, cap, xp):
    """In place on s (b, K, G, Tq, T): scale, soft-cap, mask (Tq, T), float32 softmax over keys. On NumPy
    the passes run over blocks of query rows that stay in cache, split over threads (every row
    is done exactly as the whole array would be: the same numbers)."""
    if xp is not numpy or not s.flags.c_contiguous:
        return layers.scores_to_probs(s, mask, scale, cap, xp)
    Tq, T = s.shape[-2], s.shape[-1]  # queries, keys (Tq < T for a block of queries)
    rows = s.reshape(-1, T)  # (R, T) view: row r is query position r % Tq of one head

    def block(r0, r1):  # query rows r0..r1 of one head: positions q0..q0 + r1 - r0
        q0 = r0 % Tq
        layers.scores_to_probs(rows[r0:r1], mask[q0:q0 + r1 - r0], scale, cap, numpy)

    by_row_blocks(block, rows.shape[0], T, period=Tq)
    return s


def gelu_tanh_times_(g, u, xp):
    """In place g = gelu_tanh(g) * u: the gated MLP's act(gate) * up, the same numbers as
    gelu_tanh_(g, xp); g *= u. On NumPy, with g and u laid out alike, the nine elementwise
    passes run block by block over cache-sized blocks (one trip through memory instead of nine)
    and the blocks are split over threads (minisae.threads)."""
    if xp is not numpy or g.strides != u.strides or not (g.flags.c_contiguous or g.flags.f_contiguous):
        layers.gelu_tanh_(g, xp)
        g *= u
        return g
    gf, uf = g.ravel(order="K"), u.ravel(order="K")  # (N*I,) views in memory order, alike

    def piece(lo, hi):
        scratch = numpy.empty(min(PASS_BLOCK, hi - lo), dtype=g.dtype)  # (block,)
        for s in range(lo, hi, PASS_BLOCK):
            e = min(s + PASS_BLOCK, hi)
            layers.gelu_tanh_(gf[s:e], numpy, scratch[:e - s])
            gf[s:e] *= uf[s:e]

    n = threads.threads()
    threads.run(piece, threads.even_pieces(gf.shape[0], n, PASS_BLOCK), n)
    return g
