"""Row-sparse matrix products: the NumPy fast path of every SAE variant's training step.

With L0 around 1 % of the latents, the (B, M) latents of a batch, their gradient and the window
of JumpReLU's pseudo-derivative touch only N << B * M entries. The training step then needs one
dense product (the encoder's) and a few products with a sparse (B, M) matrix, each costing
N * D multiply-adds instead of B * M * D. This module holds those products.

Dimensions: B tokens in the batch, D = d_in, M = d_sae latents, N stored (non-zero) entries of a
sparse (B, M) matrix. NumPy arrays only (CuPy runs the dense path).
"""

import contextlib

import numpy

# ----------------------------------------------------------------------------------------------
# row-sparse products (NumPy fast path). A sparse (B, M) matrix is held as its N stored entries
# in row-major order: rows (N,), cols (N,), values (N,), and rowptr (B + 1,) with the entries of
# row b at rowptr[b]:rowptr[b+1]. Dense equivalents are given in each docstring.
#
# Each product has several implementations, chosen by `impl` (None = the fastest available):
#   "loop"    the plain version: a Python loop over rows (or latents) handing each row to BLAS
#             (numpy.dot). Readable, but from D ~ 2000 OpenBLAS wakes a second thread for every
#             call, and on a busy machine every call then waits for it: 3-8x slower at D = 2304.
#   "blas1"   the same loop with BLAS held to one thread (threadpoolctl, optional)
#   "einsum"  the same loop with numpy.einsum, which never calls BLAS: NumPy only, one thread
#   "scipy"   a compiled CSR product (scipy.sparse, optional), one thread, no Python loop
# Measured (reference/bench_sparse.py, docs/benchmarks.md): scipy is fastest for A @ W and A.T @ E;
# for the sampled product (no scipy equivalent) the one-thread BLAS loop, then einsum.
# Tests hold every implementation equal to the dense products.

SPARSE_IMPLS = ("loop", "blas1", "einsum", "scipy")
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


def _blas_controller():
    """A threadpoolctl controller for NumPy's BLAS, or None without threadpoolctl."""
    if "threadpoolctl" not in _optional:
        try:
            from threadpoolctl import ThreadpoolController
            _optional["threadpoolctl"] = ThreadpoolController()
        except ImportError:
            _optional["threadpoolctl"] = None
    return _optional["threadpoolctl"]


def _pick(impl, choices, what):
    """The implementation to run: `impl` if given (checked), else the first available of choices."""
    if impl is None:
        for name in choices:
            if name == "scipy" and _scipy_sparse() is None:
                continue
            if name == "blas1" and _blas_controller() is None:
                continue
            return name
        return "loop"
    if impl not in SPARSE_IMPLS:
        raise ValueError(f"{what}: impl must be one of {SPARSE_IMPLS} or None, found {impl!r}")
    if impl == "scipy" and _scipy_sparse() is None:
        raise ValueError(f"{what}: impl='scipy' needs SciPy (pip install 'minisae[fast]')")
    if impl == "blas1" and _blas_controller() is None:
        raise ValueError(f"{what}: impl='blas1' needs threadpoolctl (pip install 'minisae[fast]')")
    return impl


def _one_blas_thread(impl):
    """Context holding NumPy's BLAS to one thread for impl 'blas1'; does nothing otherwise."""
    if impl == "blas1":
        return _blas_controller().limit(limits=1, user_api="blas")
    return contextlib.nullcontext()


def sparse_from_mask(mask):
    """(rows, cols, rowptr) of the True entries of a (B, M) boolean mask, row-major."""
    B, M = mask.shape
    flat = numpy.flatnonzero(mask)  # (N,)
    rows, cols = numpy.divmod(flat, M)  # (N,), (N,)
    rowptr = numpy.searchsorted(rows, numpy.arange(B + 1))  # (B + 1,)
    return rows, cols, rowptr, flat


def sparse_matmul(rowptr, cols, values, W, *, impl=None):
    """A @ W for sparse A (B, M) with W (M, D): dense result (B, D). impl: see above."""
    impl = _pick(impl, ("scipy", "blas1", "einsum"), "sparse_matmul")
    B = rowptr.shape[0] - 1
    if impl == "scipy":
        A = _scipy_sparse().csr_array((values, cols, rowptr), shape=(B, W.shape[0]))
        return numpy.asarray(A @ W, dtype=W.dtype)  # (B, D)
    out = numpy.empty((B, W.shape[1]), dtype=W.dtype)  # (B, D)
    ptr = rowptr.tolist()
    with _one_blas_thread(impl):
        for b in range(B):
            s, e = ptr[b], ptr[b + 1]
            if impl == "einsum":
                numpy.einsum("n,nd->d", values[s:e], W[cols[s:e]], out=out[b])
            else:
                numpy.dot(values[s:e], W[cols[s:e]], out=out[b])  # (n,) @ (n, D) -> (D,)
    return out


def sampled_matmul(rowptr, cols, E, W, *, impl=None):
    """(E @ W.T)[rows, cols] for E (B, D) and W (M, D): only the stored entries, (N,)."""
    impl = _pick(impl, ("blas1", "einsum"), "sampled_matmul")
    if impl == "scipy":
        raise ValueError("sampled_matmul: SciPy has no sampled product; use 'blas1', 'einsum' or 'loop'")
    out = numpy.empty(cols.shape[0], dtype=W.dtype)  # (N,)
    ptr = rowptr.tolist()
    with _one_blas_thread(impl):
        for b in range(rowptr.shape[0] - 1):
            s, e = ptr[b], ptr[b + 1]
            if impl == "einsum":
                numpy.einsum("nd,d->n", W[cols[s:e]], E[b], out=out[s:e])
            else:
                numpy.dot(W[cols[s:e]], E[b], out=out[s:e])  # (n, D) @ (D,) -> (n,)
    return out


def sparse_t_matmul(rows, cols, n_cols, pairs, *, impl=None, transposed=()):
    """[A_k.T @ E_k for (A_k values (N,), E_k (B, D_k)) in pairs], all A_k sharing one pattern.

    Each result is dense (M, D_k) with M = n_cols; for the pairs whose index is in `transposed`
    it is E_k.T @ A_k instead, C-ordered (D_k, M) (e.g. an encoder gradient x.T @ dpre), written
    block by block of latents so that no (M, D_k) intermediate and transposed copy are needed.
    The entries are regrouped by column (latent) once: that is A.T in CSR form. Then each
    latent's rows of E_k are gathered and weighted by its values (loops), or one compiled CSR
    product per pair (scipy).
    """
    impl = _pick(impl, ("scipy", "blas1", "einsum"), "sparse_t_matmul")
    order = numpy.argsort(cols, kind="stable")  # (N,)
    rows_c = rows[order]  # (N,)
    colptr = numpy.searchsorted(cols[order], numpy.arange(n_cols + 1))  # (M + 1,)
    vals_c = [values[order] for values, _ in pairs]  # each (N,)
    if impl == "scipy":
        sparse = _scipy_sparse()
        B = pairs[0][1].shape[0] if pairs else 0
        outs = []
        for j, (v, (_, E)) in enumerate(zip(vals_c, pairs)):
            At = sparse.csr_array((v, rows_c, colptr), shape=(n_cols, B))  # (M, B) = A.T
            if j not in transposed:
                outs.append(numpy.asarray(At @ E, dtype=E.dtype))  # (M, D_k)
                continue
            out = numpy.empty((E.shape[1], n_cols), dtype=E.dtype)  # (D_k, M)
            step = max(1, (1 << 18) // max(E.shape[1], 1))  # latents per block (~1 MB results)
            for i in range(0, n_cols, step):
                out[:, i:i + step] = (At[i:i + step] @ E).T  # (blk, D_k) written as (D_k, blk)
            outs.append(out)
        return outs
    outs = [numpy.empty((n_cols, E.shape[1]), dtype=E.dtype) for _, E in pairs]  # each (M, D_k)
    ptr = colptr.tolist()
    with _one_blas_thread(impl):
        for i in range(n_cols):
            s, e = ptr[i], ptr[i + 1]
            r = rows_c[s:e]
            for v, (_, E), out in zip(vals_c, pairs, outs):
                if impl == "einsum":
                    numpy.einsum("n,nd->d", v[s:e], E[r], out=out[i])
                else:
                    numpy.dot(v[s:e], E[r], out=out[i])  # (n,) @ (n, D_k) -> (D_k,)
    return [numpy.ascontiguousarray(o.T) if j in transposed else o for j, o in enumerate(outs)]


def sparse_fire_counts(cols, values, n_cols):
    """fire_counts of a sparse (B, M) matrix from its stored entries: (M,) int64."""
    return numpy.bincount(cols[values != 0], minlength=n_cols).astype(numpy.int64)  # (M,)


def column_sums(cols, values, n_cols, dtype):
    """A.sum(axis=0) for sparse A: (M,), accumulated in float64, returned in `dtype`."""
    return numpy.bincount(cols, weights=values, minlength=n_cols).astype(dtype)
