"""A few threads for NumPy work that releases the GIL: elementwise passes, gathers, compiled
sparse products and small BLAS calls, split into pieces that each write their own part of the
result. The matrix products of BLAS already use the cores; these are the passes between them.

How many threads: as many as NumPy's BLAS uses (threadpoolctl; 1 without it), so a process held
to one BLAS thread (OPENBLAS_NUM_THREADS=1, as `minisae compare`'s workers are, or inside
threadpoolctl's threadpool_limits) runs these on one thread too: on the calling thread, with no
pool. Work is split into a handful of pieces per thread (never one task per row), so a core that
another process keeps busy delays one piece, not every row. Splitting never changes a number:
each piece computes its part exactly as the whole would.
"""

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

PIECES_PER_THREAD = 4  # more pieces than threads, so a thread slowed by another process does less
_optional = {}
_pools = {}  # thread count (or "background", one thread) -> ThreadPoolExecutor
_pool_lock = threading.Lock()


def blas_controller():
    """A threadpoolctl controller for NumPy's BLAS, or None without threadpoolctl."""
    if "threadpoolctl" not in _optional:
        try:
            from threadpoolctl import ThreadpoolController
            _optional["threadpoolctl"] = ThreadpoolController()
        except ImportError:
            _optional["threadpoolctl"] = None
    return _optional["threadpoolctl"]


def threads():
    """How many threads to split work over: NumPy's BLAS thread count, or 1 without threadpoolctl.
    Read it before holding BLAS to one thread (it would read 1 there)."""
    ctl = blas_controller()
    if ctl is None:
        return 1
    counts = [lib.num_threads for lib in ctl.select(user_api="blas").lib_controllers]
    return max(1, min(max(counts, default=1), os.cpu_count() or 1))


def _forget_pools():
    _pools.clear()  # a forked child has none of its parent's threads


os.register_at_fork(after_in_child=_forget_pools)


def _executor(n):
    """The pool of n threads, or of one for "background" (made on first use, kept)."""
    with _pool_lock:
        if n not in _pools:
            workers = 1 if n == "background" else n
            _pools[n] = ThreadPoolExecutor(workers, thread_name_prefix=f"minisae-{n}")
        return _pools[n]


def run(fn, bounds, n):
    """fn(lo, hi) for each piece [bounds[i], bounds[i + 1]): on the calling thread when there is
    one piece, else on a pool of n threads (the calling thread waits; the first error is raised)."""
    if len(bounds) <= 2:
        fn(bounds[0], bounds[-1])
        return
    pool = _executor(n)
    tasks = [pool.submit(fn, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    for task in tasks:
        task.result()


def even_pieces(n_items, n, min_items):
    """Bounds [0 = p_0 < ... < p_P = n_items] of about equal pieces for n threads, each piece at
    least min_items long (one piece, [0, n_items], when n is 1 or there is too little work)."""
    pieces = min(n * PIECES_PER_THREAD, n_items // max(min_items, 1)) if n > 1 else 1
    if pieces <= 1:
        return [0, n_items]
    return sorted(set(round(i * n_items / pieces) for i in range(pieces + 1)))


def in_background(fn, *args, **kwargs):
    """Start fn(*args, **kwargs) on a thread of its own and return a future (call .result());
    with one thread (see `threads`) it runs now, on the calling thread. Used to overlap two
    products that do not depend on each other. What it calls may use the pools; a pool's
    threads never wait on anything, so this cannot deadlock."""
    if threads() == 1:
        done = Future()
        done.set_result(fn(*args, **kwargs))
        return done
    return _executor("background").submit(fn, *args, **kwargs)
