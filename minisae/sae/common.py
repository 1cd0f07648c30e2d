"""Pieces every SAE variant shares: input checks, the decoder, the squared error, initialisation,
the geometric median (TopK's b_dec init), exact top-k selection, and Matryoshka's nested prefixes
(dense, and on the row-sparse path of `minisae.sae.sparse`).

Dimensions: B tokens in the batch, D = d_in, M = d_sae latents, N stored (non-zero) entries of a
sparse (B, M) matrix. Layout as in the released files: `x @ W_enc` with W_enc (D, M), `f @ W_dec`
with W_dec (M, D); the rows of W_dec are the latent directions.

Every function takes arrays of one module `xp` (NumPy or CuPy, read off the arrays with
`xp_of`) and one float dtype, and keeps that dtype: scalars enter the math as Python floats.
"""

import math

import numpy

from minisae import threads
from minisae.sae.sparse import sampled_matmul, sparse_matmul, sparse_t_matmul
from minisae.xp import xp_of

# ----------------------------------------------------------------------------------------------
# checks


def check_params(params, names, architecture):
    """Raise a ValueError unless `params` has exactly `names` with consistent shapes."""
    if not isinstance(params, dict):
        raise TypeError(f"{architecture} params: expected a dict of arrays, "
                        f"found {type(params).__name__}")
    missing = [k for k in names if k not in params]
    extra = [k for k in params if k not in names]
    if missing or extra:
        raise ValueError(f"{architecture} params: expected keys {list(names)}, "
                         f"missing {missing}, unexpected {extra}")
    D, M = params["W_enc"].shape
    expected = {"W_enc": (D, M), "W_dec": (M, D), "b_dec": (D,)}
    for k in names:
        expected.setdefault(k, (M,))
    for k in names:
        if tuple(params[k].shape) != expected[k]:
            raise ValueError(f"{architecture} params[{k!r}]: expected shape {expected[k]} "
                             f"(from W_enc {(D, M)}), found {tuple(params[k].shape)}")
        if params[k].dtype != params["W_enc"].dtype:
            raise ValueError(f"{architecture} params[{k!r}]: expected dtype "
                             f"{params['W_enc'].dtype} (that of W_enc), found {params[k].dtype}")


def as_input(params, x, architecture):
    """x as a (B, D) array on the params' module and in their dtype (a no-op when it already is)."""
    W_enc = params["W_enc"]
    xp = xp_of(W_enc)
    x = xp.asarray(x, dtype=W_enc.dtype)
    if x.ndim != 2 or x.shape[1] != W_enc.shape[0]:
        raise ValueError(f"{architecture} input x: expected shape (B, {W_enc.shape[0]}) "
                         f"(B tokens, d_in from W_enc), found {tuple(x.shape)}")
    return x


def scalar(value, dtype, xp):
    """A 0-d array of `dtype` on `xp` (NumPy reductions return NumPy scalars, not arrays)."""
    return xp.asarray(value, dtype=dtype).reshape(())


# ----------------------------------------------------------------------------------------------
# decoder and squared error


def decode(params, f):
    """xhat = f @ W_dec + b_dec: latents (B, M) back to inputs (B, D)."""
    W_dec, b_dec = params["W_dec"], params["b_dec"]
    f = xp_of(W_dec).asarray(f, dtype=W_dec.dtype)
    return f @ W_dec + b_dec  # (B, M) @ (M, D) -> (B, D)


def squared_error(x, xhat):
    """mse = mean over the batch of the sum over dimensions of (x - xhat)^2; and err = x - xhat."""
    err = x - xhat  # (B, D)
    mse = (err * err).sum() / x.shape[0]
    return mse, err


def squared_error_backward(err, scale=1.0):
    """d(scale * mse)/d xhat, given err = x - xhat from `squared_error`."""
    # forward was: mse = sum_bd err^2 / B with err = x - xhat
    return err * (-2.0 * float(scale) / err.shape[0])  # (B, D)


# ----------------------------------------------------------------------------------------------
# initialisation (random numbers on the host with NumPy, then moved: CPU and GPU start identical)


def unit_rows(a):
    """Rows of `a` scaled to unit L2 norm (zero rows stay zero)."""
    xp = xp_of(a)
    norms = xp.sqrt((a * a).sum(axis=1, keepdims=True))  # (M, 1)
    return a / xp.maximum(norms, numpy.finfo(a.dtype).tiny)


def init_dictionary(d_in, d_sae, *, seed, xp, dtype):
    """W_dec He-uniform (bound sqrt(6 / d_in)) then unit rows, W_enc = W_dec^T, b_dec = 0.

    The He bound sets only the scale, which the row normalisation removes: the directions are
    uniform in the cube, normalised. Drawn in float64 on the host, then cast and moved to xp.
    """
    if int(d_in) < 1 or int(d_sae) < 1:
        raise ValueError(f"init: expected d_in >= 1 and d_sae >= 1, "
                         f"found d_in={d_in}, d_sae={d_sae}")
    rng = numpy.random.default_rng(seed)
    bound = math.sqrt(6.0 / d_in)
    W_dec = unit_rows(rng.uniform(-bound, bound, size=(d_sae, d_in)))  # (M, D)
    return {
        "W_enc": xp.asarray(numpy.ascontiguousarray(W_dec.T), dtype=dtype),  # (D, M)
        "W_dec": xp.asarray(W_dec, dtype=dtype),                              # (M, D)
        "b_dec": xp.zeros((d_in,), dtype=dtype),                              # (D,)
    }


def geometric_median(x, *, iters=100, tol=1e-7, xp=None):
    """argmin_y sum_b ||x_b - y|| over a sample x (B, D), by Weiszfeld's iteration.

    Starts at the mean; each step is the average of the points weighted by 1 / ||x_b - y||
    (distances floored at a tiny value so a point sitting on y does not divide by zero); stops
    when a step moves y by less than tol * (1 + ||y||). Computed in float64, returned in x's dtype.
    """
    xp = xp_of(x) if xp is None else xp
    x = xp.asarray(x)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"geometric_median: expected a sample of shape (B, D) with B >= 1, "
                         f"found {tuple(x.shape)}")
    out_dtype = x.dtype if x.dtype.kind == "f" else numpy.float64
    x64 = x.astype(numpy.float64)  # (B, D)
    y = x64.mean(axis=0)  # (D,)
    for _ in range(int(iters)):
        dist = xp.sqrt(((x64 - y) ** 2).sum(axis=1))  # (B,)
        w = 1.0 / xp.maximum(dist, 1e-12)  # (B,)
        y_new = (w[:, None] * x64).sum(axis=0) / w.sum()  # (D,)
        step = float(xp.sqrt(((y_new - y) ** 2).sum()))
        y = y_new
        if step <= tol * (1.0 + float(xp.sqrt((y * y).sum()))):
            break
    return y.astype(out_dtype)


# ----------------------------------------------------------------------------------------------
# top-k selection per row (TopK, AuxK; BatchTopK runs top_k on its flattened batch)
#
# The rule, exactly: row b keeps the k entries with the largest values; among entries equal to
# the k-th largest value, those with the lowest column index. `top_k_plain` says it in one line
# (a stable sort); `top_k` gives the same answer without sorting or partitioning whole rows.

TOPK_SAMPLE_STRIDE = 8  # top_k estimates each row's threshold from every 8th column
TOPK_PIECE_ENTRIES = 1 << 20  # top_k splits rows over threads in pieces of at least this many entries


def top_k_plain(a, k):
    """(idx, vals), each (B, K): the top-k of each row of a (B, M) by the rule above, columns in
    ascending order. A full stable sort of every row: the readable reference."""
    xp = xp_of(a)
    idx = xp.sort(xp.argsort(-a, axis=1, kind="stable")[:, :k], axis=1)  # (B, K)
    return idx, xp.take_along_axis(a, idx, axis=1)


def _select_in_candidates(vals, cols, k):
    """The top-k rule applied to candidate arrays vals, cols (R, C) whose columns ascend along
    each row (C >= k real candidates per row; padding is -inf with any column): (R, K) x 2."""
    xp = xp_of(vals)
    C = vals.shape[1]
    kth = xp.partition(vals, C - k, axis=1)[:, C - k: C - k + 1]  # (R, 1) the k-th largest
    above = vals > kth  # (R, C)
    tied = vals == kth  # (R, C)
    keep = above | tied  # (R, C) right for every row whose ties all fit
    need = k - xp.count_nonzero(above, axis=1)  # (R,) how many ties to keep, >= 1
    crowded = xp.flatnonzero(xp.count_nonzero(tied, axis=1) > need)  # rows with ties to drop
    if crowded.size:  # keep the lowest columns among their ties
        t = tied[crowded]  # (R', C)
        keep[crowded] = above[crowded] | (t & (xp.cumsum(t, axis=1) <= need[crowded, None]))
    return cols[keep].reshape(-1, k), vals[keep].reshape(-1, k)  # row-major: k per row


def top_k(a, k):
    """(idx, vals), each (B, K): the same as top_k_plain(a, k), exactly (ties included).

    On NumPy, for k well below M: each row's threshold t_b is read off a strided sample of its
    columns (every TOPK_SAMPLE_STRIDE-th) at a rank that leaves a margin of a few standard
    deviations, so that usually between k and ~2k entries of the row are >= t_b. Those
    candidates are gathered (one compare pass over (B, M)) and the exact rule is applied to
    them alone; the rare rows with fewer than k candidates are done on the whole row. Cost: a
    pass over (B, M) and work on (B, ~2k), instead of partitioning (B, M). NaN counts as -inf.
    """
    xp = xp_of(a)
    B, M = a.shape
    k = int(k)
    if not 1 <= k <= M:
        raise ValueError(f"top_k: expected 1 <= k <= M = {M}, found {k}")
    if xp is not numpy or B == 0:
        return _top_k_rows(a, k)
    # rows are independent: pieces of rows on the threads (minisae.threads), the same numbers
    n = threads.threads()
    bounds = threads.even_pieces(B, n, max(1, TOPK_PIECE_ENTRIES // max(M, 1)))
    if len(bounds) <= 2:
        return _top_k_rows(a, k)
    idx = numpy.empty((B, k), dtype=numpy.int64)  # (B, K)
    vals = numpy.empty((B, k), dtype=a.dtype)  # (B, K)

    def piece(r0, r1):
        idx[r0:r1], vals[r0:r1] = _top_k_rows(a[r0:r1], k)

    threads.run(piece, bounds, n)
    return idx, vals


def scatter_rows(values, idx, n_cols):
    """Dense (B, n_cols) with values (B, K) at columns idx (B, K) of each row, zeros elsewhere."""
    xp = xp_of(values)
    out = xp.zeros((values.shape[0], n_cols), dtype=values.dtype)  # (B, n_cols)
    out[xp.arange(values.shape[0])[:, None], idx] = values
    return out


def batch_topk_mask(pi, n_keep):
    """(B, M) bool: the n_keep largest entries of pi over the whole batch. Entries equal to the
    n_keep-th largest value are kept in row-major order until exactly n_keep are kept."""
    xp = xp_of(pi)
    flat = pi.reshape(-1)  # (B*M,)
    size = flat.shape[0]
    if n_keep >= size:
        return xp.ones(pi.shape, dtype=bool)
    # top_k's rule on the flattened batch as one row: ties go to the lowest flat index (row-major)
    idx, _ = top_k(flat[None, :], n_keep)  # (1, N)
    keep = xp.zeros(size, dtype=bool)  # (B*M,)
    keep[idx[0]] = True
    return keep.reshape(pi.shape)  # (B, M)


def min_kept(z, n_pos, xp, dtype):
    """The smallest kept positive activation: the smallest positive entry of z (z >= 0, its n_pos
    non-zero entries are the kept ones through the ReLU); 0-d, NaN when n_pos is 0. No boolean-mask
    gather (on CuPy that waits for the device to learn the result's size)."""
    if z.size == 0:
        return scalar(math.nan, dtype, xp)
    low = xp.where(z > 0.0, z, math.inf).min()  # 0-d
    return scalar(xp.where(n_pos > 0, low, math.nan), dtype, xp)


def _top_k_rows(a, k):
    """top_k on one block of rows (the algorithm above)."""
    xp = xp_of(a)
    B, M = a.shape
    if xp is not numpy or M < 4 * TOPK_SAMPLE_STRIDE * k or B == 0:
        full = xp.where(xp.isnan(a), -xp.inf, a)  # (B, M)
        return _select_in_candidates(full, xp.broadcast_to(xp.arange(M), (B, M)), k)
    sample = a[:, ::TOPK_SAMPLE_STRIDE]  # (B, S) strided view
    S = sample.shape[1]
    expected = k * S / M  # how many of the top k fall in the sample, on average
    rank = min(S, int(math.ceil(expected + 4.0 * math.sqrt(expected) + 4)))
    thresh = numpy.partition(sample, S - rank, axis=1)[:, S - rank]  # (B,) rank-th largest
    flat = numpy.flatnonzero(a >= thresh[:, None])  # (N,) candidates, row-major; never NaN
    r, c = numpy.divmod(flat, M)  # (N,) row, column
    counts = numpy.bincount(r, minlength=B)  # (B,)
    bad = numpy.flatnonzero(counts < k)  # rows with too few candidates: done on the whole row
    if bad.size:
        keep = counts[r] >= k  # (N,)
        flat, r, c = flat[keep], r[keep], c[keep]
        counts[bad] = 0
    width = max(int(counts.max()), k)
    start = numpy.zeros(B, dtype=numpy.int64)  # (B,) index in flat of each row's first candidate
    numpy.cumsum(counts[:-1], out=start[1:])
    slot = r * width + (numpy.arange(flat.size) - start[r])  # (N,) place in the (B, width) arrays
    cand_vals = numpy.full((B, width), -numpy.inf, dtype=a.dtype)  # (B, width)
    cand_cols = numpy.zeros((B, width), dtype=numpy.int64)  # (B, width)
    cand_vals.ravel()[slot] = a.ravel()[flat]
    cand_cols.ravel()[slot] = c
    if not bad.size:
        return _select_in_candidates(cand_vals, cand_cols, k)
    idx = numpy.empty((B, k), dtype=numpy.int64)  # (B, K)
    vals = numpy.empty((B, k), dtype=a.dtype)  # (B, K)
    good = numpy.flatnonzero(counts >= k)  # (R,)
    idx[good], vals[good] = _select_in_candidates(cand_vals[good], cand_cols[good], k)
    full = numpy.where(numpy.isnan(a[bad]), -numpy.inf, a[bad])  # (R', M)
    idx[bad], vals[bad] = _select_in_candidates(full, numpy.broadcast_to(numpy.arange(M), full.shape), k)
    return idx, vals


def fire_counts(f):
    """Per latent, how many tokens of the batch it fired on: (f != 0).sum(axis=0), (M,) int64."""
    return xp_of(f).count_nonzero(f, axis=0).astype("int64")  # (M,)


# ----------------------------------------------------------------------------------------------
# Matryoshka decoding (Bussmann et al. 2025, arXiv 2503.17547): the loss sums the squared error of
# the reconstructions from nested prefixes of the latents, m_1 < m_2 < ... < m_S = M:
#     xhat_j = f[:, :m_j] @ W_dec[:m_j] + b_dec,    mse = sum_j mean_b ||x_b - xhat_j,b||^2
# Latent i lies in every prefix with m_j > i, so its decoder row gets gradient from each of them.
# Segment s holds the latents [m_{s-1}, m_s) (m_0 = 0): it is in prefixes s, s+1, ..., S.


def check_prefixes(prefixes, n_latents, where):
    """The prefix sizes as a tuple of ints, strictly increasing, ending at M = n_latents (M is
    appended when the last given size is smaller: the full SAE is always the last prefix).
    None stands for (M,), the plain loss."""
    if prefixes is None:
        return (int(n_latents),)
    try:
        sizes = [int(m) for m in prefixes]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: prefixes must be a sequence of integers, found {prefixes!r}") from None
    if sizes and sizes[-1] != n_latents:
        sizes.append(int(n_latents))
    if not sizes or sizes[0] < 1 or any(b <= a for a, b in zip(sizes, sizes[1:])) or sizes[-1] != n_latents:
        raise ValueError(f"{where}: prefixes must increase strictly from >= 1 to at most d_sae={n_latents}, "
                         f"found {tuple(prefixes)}")
    return tuple(sizes)


def prefix_decode(f, W_dec, b_dec, prefixes):
    """[xhat_1, ..., xhat_S], each (B, D): the reconstructions from the nested prefixes."""
    xhat, out, start = b_dec, [], 0
    for end in prefixes:
        xhat = xhat + f[:, start:end] @ W_dec[start:end]  # (B, m) @ (m, D) -> (B, D)
        out.append(xhat)
        start = end
    return out


def prefix_squared_error(x, xhats):
    """(total, mse, errs): total = sum_j mse_j with mse_j = mean_b ||x_b - xhat_j,b||^2, mse = mse_S
    (the full SAE's, the last prefix) and errs [x - xhat_j]."""
    total, errs = 0.0, []
    for xhat in xhats:
        mse, err = squared_error(x, xhat)
        total, errs = total + mse, errs + [err]
    return total, mse, errs


def prefix_decoder_gradients(errs, prefixes):
    """[G_1, ..., G_S]: G_s = sum_{j >= s} dmse/dxhat_j (B, D), the gradient reaching the decoder
    output of segment s (whose latents are in prefixes s..S); G_1 is also db_dec's sum."""
    out, acc = [], None
    for err in reversed(errs):
        d = squared_error_backward(err)  # (B, D)
        acc = d if acc is None else acc + d
        out.append(acc)
    return out[::-1]


def segments(prefixes):
    """[(start, end)] of the latents first added by each prefix."""
    return list(zip((0,) + tuple(prefixes[:-1]), prefixes))


def segment_entries(rows, cols, n_rows, start, end):
    """(sel, rowptr) of the stored entries (row-major) with start <= col < end: their positions
    among the N entries and the row pointer of that sub-matrix."""
    sel = numpy.flatnonzero((cols >= start) & (cols < end))  # (n,)
    return sel, numpy.searchsorted(rows[sel], numpy.arange(n_rows + 1))  # (n,), (B + 1,)


# --- Matryoshka prefixes on the row-sparse path ---------------------------------------------------
# `parts` lists, per segment of latents first added by a prefix, (start, end, sel, rowptr): the
# stored entries of that segment (sel None = all of them, when there is a single prefix).

def sparse_prefix_parts(rows, cols, rowptr, n_rows, n_latents, prefixes):
    """The per-segment views of the stored entries: [(start, end, sel, rowptr)]."""
    if len(prefixes) == 1:
        return [(0, n_latents, None, rowptr)]
    return [(s, e) + segment_entries(rows, cols, n_rows, s, e) for s, e in segments(prefixes)]


def sparse_prefix_decode(parts, cols, values, W_dec, b_dec):
    """[xhat_1, ..., xhat_S], each (B, D): prefix_decode for the stored entries `values` (N,)."""
    if len(parts) == 1:  # plain loss: all entries at once
        return [sparse_matmul(parts[0][3], cols, values, W_dec) + b_dec]  # (B, M) @ (M, D) -> (B, D)
    xhats, acc = [], b_dec
    for s, e, sel, rp in parts:
        acc = acc + sparse_matmul(rp, cols[sel], values[sel], W_dec)  # (B, D)
        xhats.append(acc)
    return xhats


def sparse_prefix_sampled(parts, cols, G, W_dec):
    """(N,): (G_s @ W_dec.T)[rows, cols] for each stored entry, G_s the gradient reaching its segment."""
    if len(parts) == 1:
        return sampled_matmul(parts[0][3], cols, G[0], W_dec)  # (N,)
    out = numpy.empty(cols.shape[0], dtype=W_dec.dtype)  # (N,)
    for (s, e, sel, rp), G_s in zip(parts, G):
        out[sel] = sampled_matmul(rp, cols[sel], G_s, W_dec)  # (n,)
    return out


def sparse_prefix_decoder_grad(parts, rows, cols, values, G, W_dec, grouped=None):
    """(M, D): d loss / d W_dec, row block s:e from its segment's entries and G_s. grouped:
    by_column of all the entries (used by the plain loss, whose one segment is all of them)."""
    if len(parts) == 1:  # plain loss: all entries at once
        return sparse_t_matmul(rows, cols, W_dec.shape[0], [(values, G[0])], grouped=grouped)[0]  # (M, D)
    dW_dec = numpy.empty_like(W_dec)  # (M, D)
    for (s, e, sel, rp), G_s in zip(parts, G):
        dW_dec[s:e] = sparse_t_matmul(rows[sel], cols[sel] - s, e - s, [(values[sel], G_s)])[0]
    return dW_dec
