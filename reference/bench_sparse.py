"""Row-sparse product implementations side by side: which one the SAE sparse paths should use.

For each shape (B tokens, D = d_in, M latents, a random pattern with `density` of B*M stored),
times the three products of minisae/sae/sparse.py with every implementation available (and,
in a second table, the top-k selection `common.top_k` against argpartition on whole rows):

  A @ W          sparse_matmul     (B, M) sparse times (M, D)         -> (B, D)
  (E @ W.T)[A]   sampled_matmul    only the stored entries of (B, M)  -> (N,)
  A.T @ E        sparse_t_matmul   two products sharing the pattern   -> 2 x (M, D)

and, as the yardstick, one dense (B, D) @ (D, M) product (what the encoder costs). The rounds
are interleaved (every implementation once per round, in rotated order) and the table shows the
median; absolute times on a shared machine drift, ratios within a round much less.

Run (repository root; a few minutes on 2 cores; the M = 131,072 shapes need ~3 GB):
    python reference/bench_sparse.py --shapes 512x8192,2304x16384,2304x32768 --batch 2048
    python reference/bench_sparse.py --shapes 512x131072 --batch 1024 --repeats 2 --impls scipy,blas1,einsum
Needs only numpy (scipy and threadpoolctl for those implementations).
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import minisae  # noqa: E402,F401  first: its OpenBLAS setting applies only before NumPy loads
import numpy  # noqa: E402
from minisae import threads  # noqa: E402
from minisae.sae import common, sparse  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="512x8192,2304x16384,2304x32768",
                   help="comma-separated DxM (default %(default)s)")
    p.add_argument("--batch", type=int, default=2048, help="B (default %(default)s)")
    p.add_argument("--density", type=float, default=0.01, help="stored fraction (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default %(default)s)")
    p.add_argument("--impls", default=",".join(sparse.SPARSE_IMPLS),
                   help="implementations to time (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    args.impls = [s for s in args.impls.split(",") if s]
    for impl in args.impls:
        if impl not in sparse.SPARSE_IMPLS:
            p.error(f"--impls: unknown {impl!r}; expected some of {sparse.SPARSE_IMPLS}")
    return args


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None):
    args = parse_args(argv)
    impls = [i for i in args.impls if i != "scipy" or sparse._scipy_sparse() is not None]
    impls = [i for i in impls if i != "blas1" or threads.blas_controller() is not None]
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%MZ} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, numpy {numpy.__version__}, load average {os.getloadavg()[0]:.2f}; "
          f"B={args.batch}, density {args.density}, median of {args.repeats}")
    print("| D | M | N | product | " + " | ".join(f"{i} ms" for i in impls) + " | dense GEMM ms |")
    print("|---|---|---|---|" + "---:|" * (len(impls) + 1))
    for D, M in args.shapes:
        rng = numpy.random.default_rng(args.seed)
        mask = rng.random((args.batch, M), dtype=numpy.float32) < args.density  # (B, M)
        rows, cols, rowptr, _ = sparse.sparse_from_mask(mask)
        del mask
        vals = rng.standard_normal(rows.shape[0], dtype=numpy.float32)  # (N,)
        W = rng.standard_normal((M, D), dtype=numpy.float32)  # (M, D)
        E = rng.standard_normal((args.batch, D), dtype=numpy.float32)  # (B, D)
        Wt = numpy.ascontiguousarray(W.T)  # (D, M)
        jobs = {}
        for impl in impls:
            jobs[("A @ W", impl)] = lambda impl=impl: sparse.sparse_matmul(rowptr, cols, vals, W, impl=impl)
            if impl != "scipy":
                jobs[("(E @ W.T)[A]", impl)] = lambda impl=impl: sparse.sampled_matmul(rowptr, cols, E, W, impl=impl)
            jobs[("A.T @ E (x2)", impl)] = lambda impl=impl: sparse.sparse_t_matmul(
                rows, cols, M, [(vals, E), (vals, E)], impl=impl)
        jobs[("gemm", "-")] = lambda: E @ Wt
        times = {k: [] for k in jobs}
        keys = list(jobs)
        for r in range(args.repeats):
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                times[k].append(timed(jobs[k]))
        gemm = statistics.median(times[("gemm", "-")]) * 1e3
        for product in ("A @ W", "(E @ W.T)[A]", "A.T @ E (x2)"):
            cells = [f"{statistics.median(times[(product, i)]) * 1e3:.0f}" if (product, i) in times else "-"
                     for i in impls]
            print(f"| {D} | {M} | {rows.shape[0]} | {product} | " + " | ".join(cells) + f" | {gemm:.0f} |",
                  flush=True)
    print()
    print("Top-k selection per row of a (B, M) float32 array (k = density * M), median ms:")
    print("| B | M | k | argpartition (whole rows) | common.top_k | speed-up |")
    print("|---|---|---|---:|---:|---:|")
    for D, M in args.shapes:
        a = numpy.random.default_rng(args.seed).standard_normal((args.batch, M), dtype=numpy.float32)
        k = max(1, int(round(args.density * M)))
        t_part, t_top = [], []
        for r in range(args.repeats):
            t_part.append(timed(lambda: numpy.argpartition(a, M - k, axis=1)))
            t_top.append(timed(lambda: common.top_k(a, k)))
        tp, tt = statistics.median(t_part) * 1e3, statistics.median(t_top) * 1e3
        print(f"| {args.batch} | {M} | {k} | {tp:.0f} | {tt:.0f} | {tp / tt:.2f}x |", flush=True)
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
