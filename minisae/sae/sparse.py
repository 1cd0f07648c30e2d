"""Row-sparse matrix products: the NumPy fast path of every SAE variant's training step.

With L0 around 1 % of the latents, the (B, M) latents of a batch, their gradient and the window
of JumpReLU's pseudo-derivative touch only N << B * M entries. The training step then needs one
dense product (the encoder's) and a few products with a sparse (B, M) matrix, each costing
N * D multiply-adds instead of B * M * D. This module holds those products.

Dimensions: B tokens in the batch, D = d_in, M = d_sae latents, N stored (non-zero) entries of a
sparse (B, M) matrix. NumPy arrays only (CuPy runs the dense path).
"""

import contextlib
import math

import numpy

from minisae import threads

# ----------------------------------------------------------------------------------------------
# row-sparse products (NumPy fast path). A sparse (B, M) matrix is held as its N stored entries
# in row-major order: rows (N,), cols (N,), values (N,), and rowptr (B + 1,) with the entries of
# row b at rowptr[b]:rowptr[b+1]. Dense equivalents are given in each docstring.
#
# Each product has several implementations, chosen by `impl` (None = the fastest available):
#   "loop"    the plain version: a Python loop over rows (or latents) handing each row to BLAS
#             (numpy.dot). Readable, but from D ~ 2000 OpenBLAS wakes a second thread for every
#             call, and on a busy machine every call then waits for it: 3-8x slower at D = 2304.
#   "blas1"   the same loop with each BLAS call held to one thread (threadpoolctl, optional)
#   "einsum"  the same loop with numpy.einsum, which never calls BLAS: NumPy only
#   "scipy"   a compiled CSR product (scipy.sparse, optional), no Python loop
# All but "loop" split the work into pieces run on a few threads (`minisae/threads.py`).
# Measured (reference/bench_sparse.py, docs/benchmarks.md): scipy is fastest for A @ W and A.T @ E;
# for the sampled product (no scipy equivalent) the one-thread BLAS loop, then einsum.
# Tests hold every implementation, on one thread and on several, equal to the dense products.

SPARSE_IMPLS = ("loop", "blas1", "einsum", "scipy")
MIN_PIECE_ENTRIES = 8192  # fewer stored entries than this per piece are not worth a task
SAMPLED_BLOCK = 1 << 17  # W elements gathered per block of rows in sampled_matmul's stacked product
_optional = {}


def _scipy_sparse():
    """scipy.sparse, or None when SciPy is not installed (pip install 'minisae[fast]')."""
    if "scipy" not in _optional:
        try:
            import scipy.sparse
            _optional["scipy"] = scipy.sparse
        except ImportError:
            _optional["scipy"] = None
    return _optional["scipy"]


def _pick(impl, choices, what):
    """The implementation to run: `impl` if given (checked), else the first available of choices."""
    if impl is None:
        for name in choices:
            if name == "scipy" and _scipy_sparse() is None:
                continue
            if name == "blas1" and threads.blas_controller() is None:
                continue
            return name
        return "loop"
    if impl not in SPARSE_IMPLS:
        raise ValueError(f"{what}: impl must be one of {SPARSE_IMPLS} or None, found {impl!r}")
    if impl == "scipy" and _scipy_sparse() is None:
        raise ValueError(f"{what}: impl='scipy' needs SciPy (pip install 'minisae[fast]')")
    if impl == "blas1" and threads.blas_controller() is None:
        raise ValueError(f"{what}: impl='blas1' needs threadpoolctl (pip install 'minisae[fast]')")
    return impl


def _one_blas_thread(impl):
    """Context holding NumPy's BLAS to one thread for impl 'blas1'; does nothing otherwise."""
    if impl == "blas1":
        return threads.blas_controller().limit(limits=1, user_api="blas")
    return contextlib.nullcontext()


def _split(ptr, impl):
    """(bounds, n_threads): pieces [0 = p_0 < ... < p_P = len(ptr) - 1] of the rows of pointer
    array ptr holding about equal numbers of entries (one piece when single-threaded, and always
    for "loop"), and the threads to run them on. Call it before BLAS is held to one thread."""
    n = len(ptr) - 1
    n_threads = 1 if impl == "loop" else threads.threads()
    bounds = threads.even_pieces(int(ptr[-1]), n_threads, MIN_PIECE_ENTRIES)  # in entries
    if len(bounds) <= 2 or n <= 1:
        return [0, n], 1
    rows = numpy.searchsorted(ptr, bounds[1:-1])  # (P - 1,) the first row at or after each cut
    return sorted(set([0, n] + rows.tolist())), n_threads


def _run_pieces(piece, ptr, impl):
    """piece(lo, hi) over the rows of pointer array ptr, split for the threads (see _split)."""
    bounds, n_threads = _split(ptr, impl)
    with _one_blas_thread(impl):
        threads.run(piece, bounds, n_threads)


def _weighted_sum(v, rows, out, impl):
    """out = v @ rows for v (n,) and rows (n, D): BLAS, or numpy.einsum for impl "einsum"."""
    if impl == "einsum":
        numpy.einsum("n,nd->d", v, rows, out=out)
    else:
        numpy.dot(v, rows, out=out)


def _csr(values, indices, ptr, lo, hi, n_cols):
    """The rows lo:hi of the CSR matrix (values, indices, ptr) as a scipy csr_array (views)."""
    s, e = int(ptr[lo]), int(ptr[hi])
    return _scipy_sparse().csr_array((values[s:e], indices[s:e], ptr[lo:hi + 1] - s),
                                     shape=(hi - lo, n_cols))


def _widest(ptr, lo, hi):
    """The most entries any of the rows lo:hi of pointer array ptr (a Python list) holds."""
    return max([ptr[b + 1] - ptr[b] for b in range(lo, hi)] + [0])


def _gather_rows(W, idx, buf, impl):
    """W[idx] (n, D), written into the front of buf without a new allocation (not for "loop")."""
    if impl == "loop":
        return W[idx]
    out = buf[:idx.shape[0]]
    W.take(idx, axis=0, out=out, mode="clip")  # idx is in range; "clip" skips a buffered copy
    return out


def sparse_from_mask(mask):
    """(rows, cols, rowptr) of the True entries of a (B, M) boolean mask, row-major."""
    B, M = mask.shape
    flat = numpy.flatnonzero(mask)  # (N,)
    rows, cols = numpy.divmod(flat, M)  # (N,), (N,)
    rowptr = numpy.searchsorted(rows, numpy.arange(B + 1))  # (B + 1,)
    return rows, cols, rowptr, flat


def entries_above(a, lo, max_entries=None):
    """(rows, cols, rowptr, flat, values): the entries of a (B, M) with a > lo (M,), row-major,
    as sparse_from_mask(a > lo) returns them, and a's values there; None when there are more
    than max_entries (the pieces after that stop early). One pass over a, on the threads in
    pieces of rows, without building the (B, M) mask: a[b, i] > lo[i] is exact."""
    B, M = a.shape
    n_threads = threads.threads()
    bounds = threads.even_pieces(B, n_threads, max(1, 4 * MIN_PIECE_ENTRIES // max(M, 1)))  # rows
    limit = math.inf if max_entries is None else max_entries
    starts = bounds[:-1]
    found, counts = [None] * len(starts), [0] * len(starts)  # per piece (fixed-size lists)

    def piece(r0, r1):
        if sum(counts) > limit:  # already too many: the caller goes dense
            return
        i = starts.index(r0)
        blk = a[r0:r1]  # (R, M) view
        above = blk > lo  # (R, M)
        counts[i] = int(numpy.count_nonzero(above))
        if sum(counts) <= limit:
            flat = numpy.flatnonzero(above)  # (n,) within the block
            found[i] = (flat + r0 * M, blk.ravel()[flat])

    threads.run(piece, bounds, n_threads)
    if any(f is None for f in found) or sum(counts) > limit:
        return None
    flat = numpy.concatenate([f for f, _ in found])  # (N,)
    rows, cols = numpy.divmod(flat, M)  # (N,), (N,)
    rowptr = numpy.zeros(B + 1, dtype=numpy.int64)  # (B + 1,)
    numpy.cumsum(numpy.bincount(rows, minlength=B), out=rowptr[1:])
    return rows, cols, rowptr, flat, numpy.concatenate([v for _, v in found])


def by_column(rows, cols, n_rows, n_cols):
    """(order, rows_c, colptr): the N row-major entries regrouped by column, rows ascending in
    each (a stable sort by column): entry order[j] is the j-th, rows_c = rows[order], and column
    i's entries are order[colptr[i]:colptr[i+1]]. SciPy's CSR-to-CSC conversion (a counting
    sort, O(N + M)) when installed, else numpy.argsort."""
    sp = _scipy_sparse()
    if sp is None or cols.shape[0] == 0:
        order = numpy.argsort(cols, kind="stable")  # (N,)
        return order, rows[order], numpy.searchsorted(cols[order], numpy.arange(n_cols + 1))
    rowptr = numpy.zeros(n_rows + 1, dtype=numpy.int64)  # (B + 1,)
    numpy.cumsum(numpy.bincount(rows, minlength=n_rows), out=rowptr[1:])
    ids = sp.csr_array((numpy.arange(cols.shape[0], dtype=numpy.int64), cols, rowptr),
                       shape=(n_rows, n_cols)).tocsc()  # data: the entries' positions
    return ids.data, ids.indices, ids.indptr


def sparse_matmul(rowptr, cols, values, W, *, impl=None):
    """A @ W for sparse A (B, M) with W (M, D): dense result (B, D). impl: see above."""
    impl = _pick(impl, ("scipy", "blas1", "einsum"), "sparse_matmul")
    B, (M, D) = rowptr.shape[0] - 1, W.shape
    out = numpy.empty((B, D), dtype=W.dtype)  # (B, D)
    ptr = rowptr.tolist()

    def piece(lo, hi):
        if impl == "scipy":
            out[lo:hi] = _csr(values, cols, rowptr, lo, hi, M) @ W  # (hi - lo, D)
            return
        buf = numpy.empty((_widest(ptr, lo, hi), D), dtype=W.dtype)  # one row's W rows
        for b in range(lo, hi):
            s, e = ptr[b], ptr[b + 1]
            Wb = _gather_rows(W, cols[s:e], buf, impl)  # (n, D) the rows of the latents in row b
            _weighted_sum(values[s:e], Wb, out[b], impl)  # (n,) @ (n, D) -> (D,)

    _run_pieces(piece, rowptr, impl)
    return out


def sampled_matmul(rowptr, cols, E, W, *, impl=None):
    """(E @ W.T)[rows, cols] for E (B, D) and W (M, D): only the stored entries, (N,).
    E may be a list of K such matrices: then a list of K results, each W row gathered once.
    The W rows of several batch rows are gathered at once (one `take` per block of about
    SAMPLED_BLOCK elements), then one BLAS call per row. When every row holds the same number n
    of entries (TopK's z), "blas1" runs a block as one stacked product (r, n, D) @ (r, D, K)
    instead: the same BLAS call per row (the same numbers) without a Python step per row."""
    impl = _pick(impl, ("blas1", "einsum"), "sampled_matmul")
    if impl == "scipy":
        raise ValueError("sampled_matmul: SciPy has no sampled product; use 'blas1', 'einsum' or 'loop'")
    several = isinstance(E, (list, tuple))
    Es = numpy.stack(E, axis=1) if several else E[:, None, :]  # (B, K, D)
    B, K, D = Es.shape
    out = numpy.empty((cols.shape[0], K), dtype=W.dtype)  # (N, K)
    ptr = rowptr.tolist()
    n = ptr[-1] // B if B else 0  # entries per row, when they are all alike
    uniform = (impl == "blas1" and n > 0 and ptr[-1] == n * B and Es.flags.c_contiguous  # (a strided Es:
               and bool((numpy.diff(rowptr) == n).all()))  # matmul's sums would not be the per-row dot's)

    def row_product(Wb, b, s, e):  # out[s:e] = Wb @ E_k[b] for row b's W rows Wb (n, D)
        if impl == "einsum":
            numpy.einsum("nd,kd->nk", Wb, Es[b], out=out[s:e])
        elif K == 1:
            numpy.dot(Wb, Es[b, 0], out=out[s:e, 0])  # (n, D) @ (D,) -> (n,)
        else:
            numpy.dot(Wb, Es[b].T, out=out[s:e])  # (n, D) @ (D, K) -> (n, K)

    def piece_rows(lo, hi):
        if impl == "loop":
            for b in range(lo, hi):
                row_product(W[cols[ptr[b]:ptr[b + 1]]], b, ptr[b], ptr[b + 1])
            return
        per = max(1, SAMPLED_BLOCK // max(D, 1))  # W rows gathered at once, whole batch rows
        buf = numpy.empty((max(per, _widest(ptr, lo, hi)), D), dtype=W.dtype)
        b0 = lo
        while b0 < hi:  # batch rows b0..b1 whose entries s..e fit the buffer (at least one row)
            b1 = b0 + 1
            while b1 < hi and ptr[b1 + 1] - ptr[b0] <= per:
                b1 += 1
            s, e = ptr[b0], ptr[b1]
            Wg = _gather_rows(W, cols[s:e], buf, impl)  # (e - s, D) the W rows of those entries
            for b in range(b0, b1):
                row_product(Wg[ptr[b] - s:ptr[b + 1] - s], b, ptr[b], ptr[b + 1])  # (n, D) row b's
            b0 = b1

    def piece_blocks(lo, hi):  # rows of n entries each, r at a time
        r = max(1, SAMPLED_BLOCK // (n * D))
        buf = numpy.empty((r, n, D), dtype=W.dtype)  # (r, n, D) the W rows of r batch rows
        for b0 in range(lo, hi, r):
            b1 = min(b0 + r, hi)
            Wb = buf[:b1 - b0]
            W.take(cols[b0 * n:b1 * n].reshape(b1 - b0, n), axis=0, out=Wb, mode="clip")
            numpy.matmul(Wb, Es[b0:b1].transpose(0, 2, 1),
                         out=out[b0 * n:b1 * n].reshape(b1 - b0, n, K))  # (r, n, D) @ (r, D, K)

    _run_pieces(piece_blocks if uniform else piece_rows, rowptr, impl)
    return [out[:, j].copy() for j in range(K)] if several else out[:, 0]  # (N,) each, contiguous


def sparse_t_matmul(rows, cols, n_cols, pairs, *, impl=None, transposed=(), grouped=None):
    """[A_k.T @ E_k for (A_k values (N,), E_k (B, D_k)) in pairs], all A_k sharing one pattern.

    Each result is dense (M, D_k) with M = n_cols; for the pairs whose index is in `transposed`
    it is E_k.T @ A_k instead, C-ordered (D_k, M) (e.g. an encoder gradient x.T @ dpre), written
    block by block of latents so that no (M, D_k) intermediate and transposed copy are needed.
    The entries are regrouped by column (latent) once: that is A.T in CSR form. Then each
    latent's rows of E_k are gathered and weighted by its values (loops), or one compiled CSR
    product per pair and piece of latents (scipy). grouped: by_column's result for these
    entries, when the caller regrouped them already (two calls on one pattern).
    """
    impl = _pick(impl, ("scipy", "blas1", "einsum"), "sparse_t_matmul")
    if not pairs:
        return []
    B = pairs[0][1].shape[0]
    order, rows_c, colptr = grouped or by_column(rows, cols, B, n_cols)  # (N,) (N,) (M + 1,)
    vals_c = [values[order] for values, _ in pairs]  # each (N,)
    flip = transposed if impl == "scipy" else ()  # the loops write (M, D_k) and transpose after
    outs = [numpy.empty((E.shape[1], n_cols) if j in flip else (n_cols, E.shape[1]), dtype=E.dtype)
            for j, (_, E) in enumerate(pairs)]  # (D_k, M) or (M, D_k)
    ptr = colptr.tolist()

    def piece_scipy(lo, hi):
        for j, (v, (_, E), out) in enumerate(zip(vals_c, pairs, outs)):
            if j not in transposed:
                out[lo:hi] = _csr(v, rows_c, colptr, lo, hi, B) @ E  # (hi - lo, D_k)
                continue
            step = max(1, (1 << 18) // max(E.shape[1], 1))  # latents per block (~1 MB results)
            for i in range(lo, hi, step):
                out[:, i:min(i + step, hi)] = (_csr(v, rows_c, colptr, i, min(i + step, hi), B) @ E).T

    def piece_loop(lo, hi):
        bufs = [numpy.empty((_widest(ptr, lo, hi), E.shape[1]), dtype=E.dtype) for _, E in pairs]
        for i in range(lo, hi):
            s, e = ptr[i], ptr[i + 1]
            r = rows_c[s:e]
            for v, (_, E), out, buf in zip(vals_c, pairs, outs, bufs):
                Er = _gather_rows(E, r, buf, impl)  # (n, D_k) the tokens latent i fired on
                _weighted_sum(v[s:e], Er, out[i], impl)  # (n,) @ (n, D_k) -> (D_k,)

    _run_pieces(piece_scipy if impl == "scipy" else piece_loop, colptr, impl)
    if impl == "scipy":
        return outs
    return [numpy.ascontiguousarray(o.T) if j in transposed else o for j, o in enumerate(outs)]


def sparse_fire_counts(cols, values, n_cols):
    """fire_counts of a sparse (B, M) matrix from its stored entries: (M,) int64."""
    return numpy.bincount(cols[values != 0], minlength=n_cols).astype(numpy.int64)  # (M,)


def column_sums(cols, values, n_cols, dtype):
    """A.sum(axis=0) for sparse A: (M,), accumulated in float64, returned in `dtype`."""
    return numpy.bincount(cols, weights=values, minlength=n_cols).astype(dtype)
